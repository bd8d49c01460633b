"""The one tolerance table (spec §9) and the error measure every parity check uses."""

from __future__ import annotations

from typing import Any

import numpy as np

#: Max abs error against the float64 dense-mask definition, unit-normal inputs (spec §9).
#: Keyed by dtype name; the same numbers hold for out and lse, and for every world size.
TOLERANCES: dict[str, float] = {"float64": 1e-10, "float32": 2e-5}

#: For bf16/fp16 (spec §9), the error may be at most this multiple of the error of the plain
#: dense-mask formula evaluated in that dtype on the same inputs, plus LOW_PRECISION_SLACK.
LOW_PRECISION_FACTORS: dict[str, float] = {"out": 2.0, "grad": 3.0}
LOW_PRECISION_SLACK = 1e-6


def dtype_name(dtype: Any) -> str:
    """``'float32'`` for ``np.float32``, ``np.dtype('float32')``, ``torch.float32`` or
    ``'float32'``."""
    text = str(dtype)
    if text.startswith("torch."):  # torch dtypes are not NumPy dtypes
        return text.removeprefix("torch.")
    return np.dtype(dtype).name


def tolerance(dtype: Any) -> float:
    """The spec §9 bound for float32/float64 results; raises ``KeyError`` for other dtypes."""
    name = dtype_name(dtype)
    if name not in TOLERANCES:
        raise KeyError(
            f"dtype: no fixed tolerance for {name}; low-precision results use "
            "low_precision_bound(naive_error)"
        )
    return TOLERANCES[name]


def low_precision_bound(naive_error: float, kind: str = "out") -> float:
    """spec §9's bound for bf16/fp16: ``factor * naive_error + 1e-6``."""
    return LOW_PRECISION_FACTORS[kind] * float(naive_error) + LOW_PRECISION_SLACK


def max_abs_error(actual: Any, expected: Any) -> float:
    """Max abs difference, where equal infinities count as 0 and NaN as infinite error.

    A NaN on either side gives ``inf`` unless both sides are NaN at that element (a NaN
    input is expected to propagate, spec §7).
    """
    diff = abs_errors(actual, expected)
    return float(diff.max()) if diff.size else 0.0


def abs_errors(actual: Any, expected: Any) -> np.ndarray:
    """Element by element, the error :func:`max_abs_error` takes the largest of (float64)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"actual: shape {a.shape} differs from expected {e.shape}")
    same = (a == e) | (np.isnan(a) & np.isnan(e))  # covers -inf == -inf
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - e))
    return np.where(np.isnan(diff), np.inf, diff)
