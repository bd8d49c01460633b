"""Optional dependencies: each is imported where it is needed, and a missing one is an
``ImportError`` of one line that names the extra to install.

- ``mpi``: mpi4py and the mpich wheel (``mpiexec``), for
  :class:`ringsim.comm.MPICommunicator` and the ``mpiexec`` checks;
- ``torch``: torch, for :mod:`ringsim.gpu`;
- ``triton``: Triton, for the mixing kernels of :mod:`ringsim.gpu` (CUDA, or its
  interpreter on the CPU);
- ``plot``: matplotlib, for :mod:`ringsim.figures` and ``ringsim plot``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: The extra that brings each optional top-level module.
EXTRA_OF = {"mpi4py": "mpi", "torch": "torch", "triton": "triton", "matplotlib": "plot"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra."""


def require(module: str, needed_by: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtra` naming the extra that
    installs it. A module that is installed but fails to import raises as it does."""
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != top:  # something the module itself needs: not ours to explain
            raise
        extra = EXTRA_OF[top]
        raise MissingExtra(
            f"{needed_by} needs {top}, which is not installed: pip install 'ringsim[{extra}]'"
        ) from None
