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

from .base import Communicator, RankFailed
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
    """``run_rank(comm, trace)`` on ``world_size`` simulated ranks; results by rank, trace.

    A ``ValueError`` or ``TypeError`` a rank raised is about the input (the entry points
    check it all before any rank starts, except what only the data shows, such as a
    ``softmax_scale`` that overflows the scores): it is raised as itself, with the rank's
    failure as its cause, rather than as :class:`~ringsim.comm.RankFailed`.
    """
    traces = [RankTrace(rank) for rank in range(world_size)]
    try:
        results = SimulatedCluster(world_size, timeout=timeout, checksums=checksums).run(
            lambda comm: run_rank(comm, traces[comm.rank]), faults=faults
        )
    except RankFailed as failed:
        if type(failed.error) in (ValueError, TypeError):
            raise type(failed.error)(str(failed.error)) from failed
        raise
    return results, Trace.from_ranks(traces)
