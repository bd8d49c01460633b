from ringsim.cli import main

raise SystemExit(main())
