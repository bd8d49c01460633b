"""Sphinx configuration of the ringsim documentation.

Built offline: no intersphinx, nothing fetched at build time (the HTML pages load MathJax
from its CDN when a reader opens them). MyST markdown pages and notebooks (myst-nb): the
tutorials (``../tutorials``, linked here as ``docs/tutorials``) and a few pages are
executed on every build, and an error in any cell fails the build.

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import re

import ringsim

project = "ringsim"
author = "the ringsim authors"
copyright = "the ringsim authors"
release = version = ringsim.__version__

extensions = [
    "myst_nb",  # MyST markdown and executable MyST notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx-mathjax-offline",  # MathJax served from the built site: formulas render offline
]
# results/: the raw GPU outputs, summarised in gpu.md
exclude_patterns = ["_build", "results", "Thumbs.db", ".DS_Store", "**/.ipynb_checkpoints"]
html_theme = "furo"
html_title = f"ringsim {release}"

# --- MyST and notebooks ---------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "force"  # every build runs every notebook page and tutorial
nb_execution_raise_on_error = True  # a failing cell (a failed assert) fails the build
nb_execution_show_tb = True
nb_execution_timeout = 180
nb_merge_streams = True

# --- API reference --------------------------------------------------------------------------
autodoc_default_options = {"members": True, "undoc-members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# The public names of ringsim.comm and ringsim.reference are documented where users import
# them (``:imported-members:``), so an unqualified type hint like ``Send`` inside their home
# module matches both names of one object; Sphinx then links the first, which is right.
suppress_warnings = ["ref.python"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# "Note [Title]" followed by a dashed underline (the code's named notes, STYLE.md) would be
# a section title inside a docstring, which docutils rejects there: show it as a rubric.
_NOTE = re.compile(r"^Note \[(?P<title>[^\]]+)\]$")


def _named_notes(app, what, name, obj, options, lines: list[str]) -> None:
    for i in range(len(lines) - 1):
        match = _NOTE.match(lines[i])
        if match and set(lines[i + 1]) == {"-"}:
            lines[i] = f".. rubric:: Note [{match['title']}]"
            lines[i + 1] = ""


def setup(app) -> None:
    app.connect("autodoc-process-docstring", _named_notes)
