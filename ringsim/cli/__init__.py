"""The ``ringsim`` command line (the application layer): ``demo``, ``trace``, ``verify`` and
``plot``. :func:`main` is the console script; :mod:`.main` builds the parser, :mod:`.args`
holds the options every command shares, and each command lives in its own module."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
