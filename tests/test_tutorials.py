"""The tutorials (``tutorials/*.md``, MyST notebooks): their form, here; their run in
``test_docs.py``.

The site's build executes every tutorial once per test run (myst-nb, an error in any cell,
a failed ``assert`` included, fails the build), and ``test_docs.py`` checks that each one's
last cell printed its "passed" line: executing them here again cost 35 s of every run.
Needs the ``docs`` extra; skipped with the reason where it is absent. Tutorial 4 launches
``mpiexec`` itself when MPI is available and says why it skips those steps when not.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]-*.md"))


def read(path: Path):
    read_myst = pytest.importorskip("myst_nb.core.read", reason="pip install -e '.[docs]'")
    return read_myst.read_myst_markdown_notebook(path.read_text())


def test_tutorials_are_in_the_docs() -> None:
    numbers = {p.name[:2] for p in TUTORIALS}
    assert {"01", "02", "03", "04", "05", "06", "07"} <= numbers, sorted(numbers)
    link = ROOT / "docs" / "tutorials"
    assert link.is_symlink() and link.resolve() == (ROOT / "tutorials").resolve()
    toctree = (ROOT / "docs" / "tutorials.md").read_text()
    assert re.search(r"^tutorials/0\*$", toctree, re.MULTILINE), "the toctree globs tutorials/0*"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_ends_by_asserting(path: Path) -> None:
    cells = [c for c in read(path).cells if c.cell_type == "code"]
    assert cells and "assert " in cells[-1].source, f"{path.name}: the last cell must assert"
    title = next(c for c in read(path).cells if c.cell_type == "markdown").source
    assert title.startswith(f"# {int(path.name[:2])}. "), title.splitlines()[0]
