"""Shared pieces of the ring tests: running a case on the simulated ring, checking parity."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ringsim.cases import Case, fixed_cases, random_case
from ringsim.comm import SimulatedCluster
from ringsim.reference import ring_dilated_attention_shard
from ringsim.reference.parity import ParityReport, check_case
from ringsim.reference.simulate import shard
from ringsim.trace import RankTrace, Trace

WORLD_SIZES = (1, 2, 3, 4, 5, 8)


def ring_cases(world_sizes: Sequence[int] = WORLD_SIZES, per_size: int = 6, seed: int = 3
               ) -> list[Case]:
    """Hand-picked cases (across shards, ragged, causal with r > 1, empty rows) + random."""
    rng = np.random.default_rng(seed)
    return [c for p in world_sizes
            for c in fixed_cases(p) + [random_case(rng, p) for _ in range(per_size)]]


def run_ring(case: Case, q, k, v, wrap: Callable | None = None, timeout: float = 20.0):
    """Run ``case`` on the simulated cluster; ``wrap`` may wrap each rank's communicator.

    Returns global out, lse and the trace.
    """
    p = case.world_size
    shards = list(zip(shard(q, p), shard(k, p), shard(v, p)))
    traces = [RankTrace(r) for r in range(p)]

    def rank_main(comm):
        comm = wrap(comm) if wrap else comm
        return ring_dilated_attention_shard(
            *shards[comm.rank], case.segment_lengths, case.dilation_rates, comm=comm,
            **case.kwargs(), return_lse=True, trace=traces[comm.rank],
        )

    results = SimulatedCluster(p, timeout=timeout).run(rank_main)
    out = np.concatenate([r[0] for r in results], axis=1)
    lse = np.concatenate([r[1] for r in results], axis=-1)
    return out, lse, Trace.from_ranks(traces)


def ring_failures(cases: Sequence[Case], dtype=np.float64, wrap: Callable | None = None
                  ) -> list[str]:
    """Parity report lines of the cases that fail (empty: all pass)."""
    failures = []
    for i, case in enumerate(cases):
        q, k, v = case.inputs(seed=i, dtype=dtype)
        try:
            out, lse, _ = run_ring(case, q, k, v, wrap)
            report: ParityReport = check_case(case, out, lse, q, k, v)
        except Exception as err:  # a mutant may crash the ring: that is a detected failure
            failures.append(f"{case.describe()}: {type(err).__name__}: {err}")
            continue
        if not report.ok:
            failures.append(report.line())
    return failures
