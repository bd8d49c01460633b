"""A missing optional dependency is one line naming the extra to install (they ended in
raw ModuleNotFoundError tracebacks)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ringsim import extras
from ringsim.extras import MissingExtra, require


@pytest.mark.parametrize(
    ("module", "extra"),
    [("torch", "torch"), ("mpi4py.MPI", "mpi"), ("matplotlib", "plot"), ("triton", "triton")],
)
def test_every_optional_module_names_its_extra(monkeypatch, module, extra):
    def missing(name, *args):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name.partition(".")[0])

    monkeypatch.setattr(extras.importlib, "import_module", missing)
    with pytest.raises(MissingExtra, match=rf"^x needs \w+, which is not installed: "
                                           rf"pip install 'ringsim\[{extra}\]'$"):  # fmt: skip
        require(module, "x")


def test_a_missing_dependency_of_an_installed_module_is_not_ours(monkeypatch):
    def broken(name, *args):
        raise ModuleNotFoundError("No module named 'libfoo'", name="libfoo")

    monkeypatch.setattr(extras.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="libfoo"):
        require("torch", "x")


def blocked(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter in which ``module`` cannot be imported."""
    prelude = f"import sys; sys.modules[{module!r}] = None; "
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_import_ringsim_gpu_without_torch():
    done = blocked("torch", "import ringsim.gpu")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("ringsim.extras.MissingExtra: ringsim.gpu needs torch, which is not "
                    "installed: pip install 'ringsim[torch]'"), done.stderr  # fmt: skip


def test_ringsim_plot_without_matplotlib_is_one_line(tmp_path):
    argv = ["plot", "masks", "--out", str(tmp_path)]
    code = f"from ringsim.cli import main; sys.exit(main({argv!r}))"
    done = blocked("matplotlib", code)
    assert done.returncode == 2
    assert done.stderr == ("ringsim: error: ringsim plot needs matplotlib, which is not "
                           "installed: pip install 'ringsim[plot]'\n")  # fmt: skip
