"""The fixed parity cases, shared by the parity tests and the mutant tests.

:data:`PARITY_CASES` is the fixed list every mutant in ``mutants.py`` must fail on; the check
itself is the package's own (:func:`ringsim.reference.parity.function_failures`).
"""

from __future__ import annotations

from strategies import case as make_case

from ringsim.cases import Case

#: Deterministic configurations, each named for what it covers (see test_parity_cases_cover).
PARITY_CASES: tuple[Case, ...] = (
    make_case((8,), (1,), 16, num_heads=2, seed=101, label="one pattern, r=1"),
    make_case(
        (6, 12), (1, 2), 20, num_heads=3, is_causal=True, seed=102, label="causal, ragged, r>1"
    ),
    make_case((10,), (3,), 30, num_heads=3, seed=103, label="r does not divide w"),
    make_case((7,), (3,), 16, num_heads=3, is_causal=True, seed=104, label="causal, r∤w, ragged"),
    make_case((4, 6), (6, 3), 14, num_heads=6, seed=105, label="r > w, empty rows"),
    make_case(
        (4, 6),
        (6, 3),
        14,
        num_heads=6,
        is_causal=True,
        mode="grouped",
        seed=106,
        label="r > w, grouped, causal",
    ),
    make_case((64, 8), (2, 1), 24, num_heads=2, is_causal=True, seed=107, label="w > n, causal"),
    make_case(
        (4, 8, 16),
        (1, 2, 4),
        28,
        num_heads=5,
        is_causal=True,
        mode="grouped",
        seed=108,
        label="grouped, 5 heads / 3 pairs, causal, ragged",
    ),
    make_case(
        (3, 5, 7, 40),
        (1, 2, 3, 5),
        37,
        num_heads=6,
        batch=2,
        mode="grouped",
        seed=109,
        label="4 pairs, grouped, batch 2",
    ),
    make_case(
        (5, 9, 13, 50),
        (2, 3, 4, 7),
        45,
        num_heads=4,
        batch=2,
        is_causal=True,
        seed=110,
        label="4 pairs, longnet, batch 2, causal",
    ),
    make_case((1, 3), (1, 2), 5, num_heads=2, head_dim=1, seed=111, label="w=1, head_dim 1"),
    make_case((2,), (1,), 1, num_heads=1, head_dim=3, is_causal=True, seed=112, label="seq_len 1"),
    # lse in the thousands with gaps > 1e3 between the patterns of a row: exp(lse) overflows
    # float64, so only the stable merge survives (pitfall 8). float64 only: at lse ~ 1e3
    # one float32 ulp (6e-5) already exceeds the float32 tolerance.
    make_case(
        (2, 16),
        (1, 2),
        16,
        num_heads=2,
        head_dim=16,
        batch=2,
        softmax_scale=100.0,
        seed=113,
        label="high dynamic range",
    ),
)
