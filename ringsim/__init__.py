"""ringsim: ring dilated attention, a NumPy reference, and a simulated cluster to run it on.

- :mod:`ringsim.config`: the configuration and its validation (spec §2, §3, §7);
- :mod:`ringsim.layout`: which positions each rank holds (contiguous, zigzag), and
  :func:`shard` / :func:`unshard` to cut global arrays into rank shards and back (spec §5);
- :mod:`ringsim.plan`: the ring plan, pure functions (spec §5);
- :mod:`ringsim.comm`: communicators, the simulated cluster and mpi4py;
- :mod:`ringsim.trace`: the trace of a ring run;
- :mod:`ringsim.reference`: the NumPy reference (dense definition, dilated, ring).

``ringsim.MPICommunicator`` imports mpi4py only when it is first used.
"""

from .comm import SimulatedCluster
from .config import DilatedConfig, Mode, Pattern, PatternGroup, make_config, validate
from .layout import Layout, shard, unshard
from .trace import Trace

__all__ = [
    "DilatedConfig",
    "Layout",
    "MPICommunicator",
    "Mode",
    "Pattern",
    "PatternGroup",
    "SimulatedCluster",
    "Trace",
    "make_config",
    "shard",
    "unshard",
    "validate",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "MPICommunicator":  # lazily: importing ringsim never imports mpi4py
        from .comm.mpi import MPICommunicator

        return MPICommunicator
    raise AttributeError(f"module 'ringsim' has no attribute {name!r}")
