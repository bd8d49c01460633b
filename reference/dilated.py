"""Single-process dilated attention, step by step (spec §2, §4).

For every pattern group (the heads sharing one ``(segment_length, dilation_rate, offset)``):

1. start from an empty result, ``(0, -inf)`` on every row;
2. for every segment, *select* the pattern's rows (global positions), run block attention
   on them, and *scatter* the result back to those positions;
3. merge the group's result into its heads' running ``(out, lse)`` with the stable merge.

Merging the patterns one by one with the LSE merge is LongNet's eq. 10: the merge is
associative, and each step weighs a pattern by its share of the softmax denominator.
"""

from __future__ import annotations

import numpy as np

from ringsim.config import (
    PatternGroup,
    check_flags,
    check_key_padding,
    segment_bounds,
    selected_in_segment,
    validate,
)

from .block import block_attention
from .merge import merge_stable
from .select import kv_of, scatter_rows, select_rows

FLOAT_DTYPES = (np.float32, np.float64)


def check_float(q: np.ndarray) -> None:
    """The reference computes in float32 or float64 NumPy arrays."""
    if not isinstance(q, np.ndarray):
        raise TypeError(f"q: expected a numpy.ndarray, got {type(q).__name__}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: dtype must be float32 or float64, got {q.dtype}")


def empty_result(b: int, n: int, h: int, d: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``out = 0`` ``(b, n, h, d)`` and ``lse = -inf`` ``(b, h, n)``: no key seen yet."""
    return np.zeros((b, n, h, d), dtype=dtype), np.full((b, h, n), -np.inf, dtype=dtype)


def padding(key_padding: np.ndarray | None, rows) -> dict:
    """``{"key_padding": key_padding[:, rows]}``, or nothing without a mask (so that the
    block functions' plain signature serves every call without one)."""
    return {} if key_padding is None else {"key_padding": key_padding[:, rows]}


def pattern_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    group: PatternGroup,
    *,
    is_causal: bool,
    scale: float,
    key_padding: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One pattern group over the whole sequence: out ``(b, n, H, d)``, lse ``(b, H, n)``;
    ``key_padding (b, n)``: True where a key is padding."""
    b, n, _, d = q.shape
    out, lse = empty_result(b, n, len(group.heads), d, q.dtype)  # step 1
    for seg_start, seg_stop in segment_bounds(group.pattern.segment_length, n):  # step 2
        rows = selected_in_segment(group.pattern, seg_start, seg_start, seg_stop)
        if rows.size == 0:
            continue  # the offset falls past this (short) segment: nothing selected
        kv = kv_of(group.heads, q.shape[2], k)  # the K/V heads the group reads
        block_out, block_lse = block_attention(
            select_rows(q, rows, group.heads),
            select_rows(k, rows, kv),
            select_rows(v, rows, kv),
            rows,
            rows,
            is_causal=is_causal,
            scale=scale,
            **padding(key_padding, rows),
        )
        scatter_rows(out, lse, rows, block_out, block_lse)
    return out, lse


def dilated_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    segment_lengths,
    dilation_rates,
    *,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: np.ndarray | None = None,
):
    """Dilated attention on one process (spec §6).

    Args:
        q, k, v: ``(batch, seq_len, num_heads, head_dim)``, float32 or float64, one dtype;
            k and v may have fewer heads, a divisor of q's (query head h reads K/V head
            ``h // (num_heads / num_kv_heads)``: grouped-query attention).
        segment_lengths, dilation_rates: positive ints, equal length (the pairs ``(w_i, r_i)``).
        is_causal: key y is visible to query x only if ``y <= x`` (global positions).
        mode: ``"longnet"`` (every head every pair) or ``"grouped"`` (spec §2).
        softmax_scale: defaults to ``1/sqrt(head_dim)``.
        return_lse: also return the natural-log lse ``(batch, num_heads, seq_len)``.
        key_padding_mask: ``(batch, seq_len)`` bool, True = padding: such a position is never
            a key (spec §1); a row left with no key gives 0 and lse -inf.
    Returns:
        out ``(batch, seq_len, num_heads, head_dim)`` in q's dtype, and lse if asked (-inf on
        rows with no key, whose out is 0).
    """
    check_flags(return_lse=return_lse)
    config = validate(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        mode=mode,
        softmax_scale=softmax_scale,
        allow_gqa=True,
    )
    check_float(q)
    b, n, h, d = q.shape
    pad = check_key_padding(key_padding_mask, b, n)
    scale = config.scale(d)
    out, lse = empty_result(b, n, h, d, q.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        for group in config.pattern_groups(h):
            group_out, group_lse = pattern_attention(
                q, k, v, group, is_causal=config.is_causal, scale=scale,
                **({} if pad is None else {"key_padding": pad}),
            )  # fmt: skip
            heads = list(group.heads)
            out[:, :, heads], lse[:, heads] = merge_stable(  # step 3
                out[:, :, heads], lse[:, heads], group_out, group_lse
            )
    return (out, lse) if return_lse else out
