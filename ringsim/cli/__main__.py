import sys

from ringsim.cli import main

sys.exit(main())
