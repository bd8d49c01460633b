"""The one parity check, shared by the parity tests and the mutant tests.

:func:`parity_failures` runs a dilated-attention function on seeded unit-normal inputs and
compares out and lse with the dense-mask definition (SPEC 3-4) under the SPEC 9 tolerance.
:data:`PARITY_CASES` is the fixed list every mutant in ``mutants.py`` must fail on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from strategies import case as make_case

from ringsim.cases import Case
from ringsim.reference import dense_dilated_attention
from ringsim.tolerance import max_abs_error, tolerance


def random_qkv(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: Any = np.float64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three unit-normal arrays of ``shape`` (``(b, n, h, d)``), drawn in float64, cast to dtype."""
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))  # type: ignore[return-value]


def case_inputs(case: Case, dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inputs of ``case``: q, k, v ``(b, n, h, d)`` drawn from ``case.seed`` alone."""
    return case.inputs(dtype=dtype)


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
    # float64, so only the stable merge survives (PITFALLS 8). float64 only: at lse ~ 1e3
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


def parity_failures(
    dilated_fn: Callable[..., Any], cases: Iterable[Case], dtype: Any = np.float64
) -> list[str]:
    """Compare ``dilated_fn`` with the dense-mask definition on every case; [] means pass.

    ``dilated_fn(q, k, v, segment_lengths, dilation_rates, is_causal=, mode=, softmax_scale=,
    return_lse=True)`` must return out ``(b, n, h, d)`` and lse ``(b, h, n)`` in the inputs'
    dtype. The definition is evaluated in float64 on the same (dtype-rounded) inputs; the
    bound is ``tolerance(dtype)`` (SPEC 9) for out and lse alike. Returns one line per problem.
    """
    dtype = np.dtype(dtype)  # tolerance() wants a dtype (or its name), not the scalar type
    tol = tolerance(dtype)
    failures: list[str] = []
    for case in cases:
        q, k, v = case_inputs(case, dtype)
        args = (q, k, v, case.segment_lengths, case.dilation_rates)
        expected_out, expected_lse = dense_dilated_attention(*args, **case.kwargs())
        try:
            out, lse = dilated_fn(*args, **case.kwargs(), return_lse=True)
        except Exception as err:  # a crash is a failure too; report it with the case
            failures.append(f"{case.describe()}: raised {type(err).__name__}: {err}")
            continue
        for name, actual, expected in (("out", out, expected_out), ("lse", lse, expected_lse)):
            actual = np.asarray(actual)
            if actual.shape != expected.shape:
                failures.append(
                    f"{case.describe()}: {name} shape {actual.shape} != {expected.shape}"
                )
                continue
            if actual.dtype != dtype:
                failures.append(f"{case.describe()}: {name} dtype {actual.dtype} != {dtype}")
            error = max_abs_error(actual, expected)
            if not error <= tol:
                failures.append(f"{case.describe()}: {name} max abs error {error:.3e} > {tol:.0e}")
    return failures
