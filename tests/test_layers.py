"""The layers hold (docs/architecture.md): every module of ``ringsim``'s base imports nothing
above it, and no library file takes part in an import circle.

Each base module is imported alone in a fresh interpreter, which fails if the NumPy reference,
the torch backend, the application layer (CLI, checks, conformance, figures), torch, mpi4py
or matplotlib came with it. The circles are read from the source (every ``import``, lazy ones
included).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The base layer: what every backend shares.
BASE = (
    "ringsim",
    "ringsim.agree",
    "ringsim.batches",
    "ringsim.cases",
    "ringsim.comm",
    "ringsim.comm.base",
    "ringsim.comm.checksum",
    "ringsim.comm.faults",
    "ringsim.comm.mpi",
    "ringsim.comm.simulated",
    "ringsim.comm.traced",
    "ringsim.comm.world",
    "ringsim.config",
    "ringsim.extras",
    "ringsim.gradrelay",
    "ringsim.launch",
    "ringsim.layout",
    "ringsim.plan",
    "ringsim.ringloop",
    "ringsim.tasks",
    "ringsim.tolerance",
    "ringsim.trace",
)
ABOVE = (
    "ringsim.reference",
    "ringsim.gpu",
    "ringsim.cli",
    "ringsim.checks",
    "ringsim.conformance",
    "ringsim.figures",
    "torch",
    "mpi4py",
    "matplotlib",
)
#: The three folders and the package each one is (pyproject.toml's package-dir).
FOLDERS = {"ringsim": "ringsim", "reference": "ringsim.reference", "gpu": "ringsim.gpu"}


def test_every_base_module_is_listed():
    """A new module in ringsim/ (outside the application's sub-packages) joins BASE."""
    found = {"ringsim"}
    for path in (ROOT / "ringsim").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[1] in ("cli", "checks", "conformance", "figures") or parts[-1] in (
            "__main__",
            "conform",  # python -m ringsim.conform: the CLI's entry point
        ):
            continue
        found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert found == set(BASE)


@pytest.mark.parametrize("module", BASE)
def test_base_module_imports_nothing_above_it(module):
    code = (
        f"import sys, {module}; "
        f"above = sorted(m for m in sys.modules if m.split('.')[0] in {{'torch', 'mpi4py', "
        f"'matplotlib'}} or m.startswith({ABOVE[:6]!r})); "
        "assert not above, above"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def module_graph() -> dict[str, set[str]]:
    """Every library module and the library modules it imports (anywhere in its source)."""
    files = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            name = ".".join((package, *parts))
            files[name] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                start = ".".join(base) if node.level else ""
                module = ".".join(x for x in (start, node.module or "") if x)
                targets |= {f"{module}.{a.name}" for a in node.names} | {module}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def test_no_import_circles_among_library_modules():
    """Two modules that import each other (a file cut in two halves); packages' re-exports
    of their own modules do not count."""
    graph = module_graph()
    circles = sorted(
        (a, b)
        for a, deps in graph.items()
        for b in deps
        if a < b and a in graph.get(b, ()) and not (b.startswith(a + ".") or a.startswith(b + "."))
    )
    assert not circles
