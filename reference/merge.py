"""Merging partial softmax results by their log-sum-exp, naive and stable side by side.

Two partial results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``, combine
into the result over the union of the keys:

    lse = log(exp(lse_a) + exp(lse_b))
    out = (exp(lse_a) * out_a + exp(lse_b) * out_b) / exp(lse)

:func:`merge_naive` evaluates exactly that and overflows once an lse passes ~709 (float64)
or ~88 (float32), and gives NaN for rows that are empty on both sides. :func:`merge_stable`
rewrites it with ``s = sigmoid(lse_b - lse_a)``, the weight of the new block:

    out = out_a - s * (out_a - out_b)
    lse = lse_a - logsigmoid(lse_a - lse_b)

which only ever exponentiates non-positive numbers (the form spec §5 prescribes; the same
rewrite is used by ring-flash-attention). Empty rows (lse = -inf) are handled explicitly.

Shapes: ``out`` is ``(..., n, h, d)`` and ``lse`` is ``(..., h, n)``, the package's layouts.
"""

from __future__ import annotations

import numpy as np


def per_row(x: np.ndarray) -> np.ndarray:
    """``(..., h, n)`` -> ``(..., n, h, 1)`` so a per-row value scales out's rows."""
    return np.swapaxes(x, -1, -2)[..., None]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` without overflow; 1 at +inf, 0 at -inf."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def logsigmoid(x: np.ndarray) -> np.ndarray:
    """``log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|))``; 0 at +inf, -inf at -inf."""
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def merge_naive(
    out: np.ndarray, lse: np.ndarray, block_out: np.ndarray, block_lse: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The textbook formula. For teaching and comparison only: it overflows (pitfall 8)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        new_lse = np.log(np.exp(lse) + np.exp(block_lse))
        new_out = (per_row(np.exp(lse)) * out + per_row(np.exp(block_lse)) * block_out) / per_row(
            np.exp(new_lse)
        )
    return new_out, new_lse


def merge_stable(
    out: np.ndarray, lse: np.ndarray, block_out: np.ndarray, block_lse: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``(block_out, block_lse)`` into the running ``(out, lse)``; returns new arrays.

    Args:
        out, block_out: ``(..., n, h, d)``; lse, block_lse: ``(..., h, n)``, float32 or wider.
    A row empty in the block (``block_lse = -inf``) keeps its state; a row empty so far takes
    the block; a row empty in both stays ``(0, -inf)``. NaN propagates (spec §7).
    """
    inf = np.inf
    with np.errstate(invalid="ignore"):
        weight = np.where(  # s = sigmoid(block_lse - lse), the share of the new block
            block_lse == -inf, 0.0, np.where(lse == -inf, 1.0, sigmoid(block_lse - lse))
        )
        new_lse = np.where(
            block_lse == -inf,
            lse,
            np.where(lse == -inf, block_lse, lse - logsigmoid(lse - block_lse)),
        )
    new_out = out - per_row(weight).astype(out.dtype) * (out - block_out)
    return new_out, new_lse.astype(lse.dtype)
