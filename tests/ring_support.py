"""Shared pieces of the ring tests: cases, the spec §5 closed form, and the ring suite.

:func:`ring_suite_failures` is what the ring mutants must fail: parity of the simulated
ring against the definition on many cases, and the trace's bytes against the closed form.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ringsim.cases import Case, fixed_cases, random_case
from ringsim.config import make_config
from ringsim.reference.parity import check_case
from ringsim.reference.simulate import run_case
from ringsim.trace import closed_form_bytes as closed_form

WORLD_SIZES = (1, 2, 3, 4, 5, 8)

ALIGNED = [  # (segment_lengths, dilation_rates, n, p, heads, mode): spec §5's aligned case
    ((8, 16, 32), (1, 2, 4), 32, 4, 4, "longnet"),
    ((4, 32), (2, 4), 32, 8, 6, "longnet"),
    ((12, 24), (3, 2), 24, 2, 5, "grouped"),
    ((36,), (3,), 36, 3, 3, "longnet"),
    ((6, 18, 36), (1, 3, 6), 36, 6, 7, "grouped"),
]


ZIGZAG_ALIGNED = [  # the same, for the zigzag layout: chunks of s = n / 2P = 6 positions
    ((24, 48), (1, 2), 48, 4, 4, "longnet"),  # a half of the sequence, the whole
    ((12, 36), (2, 3), 36, 3, 5, "grouped"),  # two chunks across the middle of P = 3
    ((3, 12, 96), (1, 3, 6), 96, 8, 6, "longnet"),  # inside a chunk, two chunks, all
    ((36,), (3,), 36, 3, 3, "longnet"),
    ((24, 72), (2, 6), 72, 6, 4, "grouped"),  # four chunks across the middle of P = 6
]

#: The aligned configurations of each layout (:func:`ringsim.trace.closed_form_bytes`).
ALIGNED_BY_LAYOUT = {"contiguous": ALIGNED, "zigzag": ZIGZAG_ALIGNED}


def ring_cases(
    world_sizes: Sequence[int] = WORLD_SIZES,
    per_size: int = 6,
    seed: int = 3,
    layout: str = "contiguous",
) -> list[Case]:
    """Hand-picked cases (across shards, ragged, causal with r > 1, empty rows) + random,
    in ``layout``."""
    rng = np.random.default_rng(seed)
    return [
        c
        for p in world_sizes
        for c in fixed_cases(p, layout)
        + [random_case(rng, p, layout=layout) for _ in range(per_size)]
    ]


def run_ring(case: Case, q, k, v):
    """``case`` on the simulated cluster: global out, lse and the trace."""
    return run_case(case, q, k, v, timeout=20.0)


def ring_failures(cases: Sequence[Case], dtype=np.float64) -> list[str]:
    """Parity report lines of the cases that fail (empty: all pass)."""
    failures = []
    for i, case in enumerate(cases):
        q, k, v = case.inputs(seed=i, dtype=dtype)
        try:
            out, lse, _ = run_ring(case, q, k, v)
            report = check_case(case, out, lse, q, k, v)
        except Exception as err:  # a mutant may break the ring outright: a detected failure
            failures.append(f"{case.describe()}: {type(err).__name__}: {err}")
            continue
        if not report.ok:
            failures.append(report.line())
    return failures


def byte_failures(
    causal_modes: Sequence[bool] = (False, True), layout: str = "contiguous"
) -> list[str]:
    """Aligned configurations whose traced bytes differ from the closed form."""
    failures = []
    for segs, rates, n, p, heads, mode in ALIGNED_BY_LAYOUT[layout]:
        for causal in causal_modes:
            case = Case(2, n, heads, 3, segs, rates, causal, mode, p, layout=layout)
            try:
                *_, trace = run_ring(case, *case.inputs(seed=5))
            except Exception as err:  # a mutant may break the ring outright: detected
                failures.append(f"{case.describe()}: {type(err).__name__}: {err}")
                continue
            config = make_config(segs, rates, is_causal=causal, mode=mode)
            for rank in range(p):
                want = closed_form(config, heads, 2, 3, n, p, rank, layout=layout)
                if trace.sent_bytes(rank) != want:
                    failures.append(
                        f"{case.describe()} rank {rank}: sent "
                        f"{trace.sent_bytes(rank)} bytes, closed form {want}"
                    )
    return failures


def ring_suite_failures() -> list[str]:
    """Everything a ring mutant must fail: parity at P = 1..8 and bytes, in each layout."""
    return (
        ring_failures(ring_cases(per_size=2))
        + byte_failures()
        + ring_failures(ring_cases(per_size=1, layout="zigzag"))
        + byte_failures(layout="zigzag")
    )
