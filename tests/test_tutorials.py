"""The tutorials (``tutorials/*.md``, MyST notebooks) run and assert their results.

Each tutorial is read with myst-nb's reader and executed cell by cell in a fresh Jupyter
kernel (nbclient), from the ``tutorials/`` folder; an error in any cell, a failed ``assert``
included, fails the test. Needs the ``docs`` extra (myst-nb brings nbclient and ipykernel);
skipped with the reason where it is absent. Tutorial 4 launches ``mpiexec`` itself when MPI
is available and says why it skips those steps when not.
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


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path: Path) -> None:
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[docs]'")
    pytest.importorskip("ipykernel", reason="pip install -e '.[docs]'")
    notebook = read(path)
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on failure
    last = [c for c in notebook.cells if c.cell_type == "code"][-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    assert "passed" in text, text
