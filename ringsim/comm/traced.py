"""Running one per-rank ring function on every rank of the simulated cluster, traced: what
the NumPy and the torch simulated rings (``ringsim.reference.simulate``,
``ringsim.gpu.ring.simulate``) run.

Shared by the NumPy and the torch backends: each gives its per-rank function (which reads
only its own shards) and gathers the results its own way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from ringsim.trace import RankTrace, Trace

from .base import Communicator
from .faults import Fault
from .simulated import SimulatedCluster

T = TypeVar("T")


def run_traced(
    world_size: int,
    run_rank: Callable[[Communicator, RankTrace], T],
    *,
    faults: Sequence[Fault] = (),
    timeout: float = 60.0,
    checksums: bool = False,
) -> tuple[list[T], Trace]:
    """``run_rank(comm, trace)`` on ``world_size`` simulated ranks; results by rank, trace."""
    traces = [RankTrace(rank) for rank in range(world_size)]
    results = SimulatedCluster(world_size, timeout=timeout, checksums=checksums).run(
        lambda comm: run_rank(comm, traces[comm.rank]), faults=faults
    )
    return results, Trace.from_ranks(traces)
