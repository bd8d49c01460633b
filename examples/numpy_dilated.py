"""Dilated attention in plain NumPy, written the "segment loop" way.

An independent, third-party style implementation (it does not import ringsim). For each
(segment length, dilation rate) pattern and each head it cuts the sequence into segments,
gathers the selected rows of each segment, attends among them, scatters the result back, and
finally mixes the patterns of a head with a numerically stable log-sum-exp merge.

Tensors are ``(batch, seq_len, num_heads, head_dim)``; the computation runs in the input
dtype. Check it with::

    ringsim conform examples/numpy_dilated.py:dilated_attention --returns out,lse \\
        --modes longnet,grouped

``dilated_attention_offsets_from_zero`` is the same code with a known bug kept on purpose.
"""

from __future__ import annotations

import numpy as np


def _head_patterns(num_heads, segment_lengths, dilation_rates, mode):
    """The (w, r, offset) patterns of every head, as a list indexed by head."""
    pairs = list(zip(segment_lengths, dilation_rates))
    if mode == "longnet":
        return [[(w, r, h % r) for w, r in pairs] for h in range(num_heads)]
    if mode != "grouped":
        raise ValueError(f"unknown mode {mode!r}")
    if num_heads < len(pairs):
        raise ValueError("grouped mode needs at least one head per pair")
    base, extra = divmod(num_heads, len(pairs))
    patterns = []
    for i, (w, r) in enumerate(pairs):
        size = base + (1 if i < extra else 0)
        patterns += [[(w, r, h % r)] for h in range(len(patterns), len(patterns) + size)]
    return patterns


def _attend(q, k, v, mask, scale):
    """Masked softmax attention of q (b, m, d) to k, v (b, m, d); rows with no key give 0, -inf."""
    s = np.where(mask, scale * np.einsum("bxd,byd->bxy", q, k), -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    tot = p.sum(axis=-1)
    safe = np.where(tot > 0, tot, 1)
    lse = np.where(tot > 0, m[..., 0] + np.log(safe), -np.inf)
    return np.einsum("bxy,byd->bxd", p, v) / safe[..., None], lse


def _pattern(q, k, v, w, r, o, is_causal, scale, from_segment):
    """One head under one pattern: out (b, n, d), lse (b, n)."""
    b, n = q.shape[:2]
    out = np.zeros_like(q)
    lse = np.full((b, n), -np.inf, dtype=q.dtype)
    w = min(w, n)
    for start in range(0, n, w):
        x = np.arange(start, min(start + w, n))
        origin = start if from_segment else 0  # the bug: count the offset from position 0
        idx = x[(x - origin) % r == o]
        if idx.size == 0:
            continue
        mask = np.ones((idx.size, idx.size), dtype=bool)
        if is_causal:
            mask = np.tril(mask)  # idx is sorted, so y <= x is the lower triangle
        out[:, idx], lse[:, idx] = _attend(q[:, idx], k[:, idx], v[:, idx], mask, scale)
    return out, lse


def _mix(outs, lses):
    """out = sum_i exp(lse_i - L) o_i, L = log sum_i exp(lse_i); 0 and -inf when all are -inf."""
    lses = np.stack(lses)  # (p, b, n)
    m = lses.max(axis=0)
    m = np.where(np.isfinite(m), m, 0)
    wts = np.exp(lses - m)
    tot = wts.sum(axis=0)
    safe = np.where(tot > 0, tot, 1)
    out = sum(wt[..., None] * o for wt, o in zip(wts, outs)) / safe[..., None]
    return out, np.where(tot > 0, m + np.log(safe), -np.inf)


def _dilated(q, k, v, segment_lengths, dilation_rates, is_causal, mode, softmax_scale, from_seg):
    b, n, h, d = q.shape
    scale = q.dtype.type(1.0 / np.sqrt(d) if softmax_scale is None else softmax_scale)
    out = np.zeros_like(q)
    lse = np.full((b, h, n), -np.inf, dtype=q.dtype)
    for head, patterns in enumerate(_head_patterns(h, segment_lengths, dilation_rates, mode)):
        qh, kh, vh = q[:, :, head], k[:, :, head], v[:, :, head]
        parts = [_pattern(qh, kh, vh, w, r, o, is_causal, scale, from_seg) for w, r, o in patterns]
        out[:, :, head], lse[:, head] = _mix(*zip(*parts))
    return out, lse


def dilated_attention(
    q, k, v, segment_lengths, dilation_rates, *, is_causal=False, mode="longnet", softmax_scale=None
):
    """Dilated attention: returns out ``(b, n, h, d)`` and lse ``(b, h, n)`` in the input dtype."""
    args = (segment_lengths, dilation_rates, is_causal, mode, softmax_scale)
    return _dilated(q, k, v, *args, from_seg=True)


def dilated_attention_offsets_from_zero(
    q, k, v, segment_lengths, dilation_rates, *, is_causal=False, mode="longnet", softmax_scale=None
):
    """The known bug "offsets from position zero", kept to demonstrate its diagnosis.

    Same as :func:`dilated_attention` except that a position x of a segment is selected when
    ``x mod r == offset`` (counted from the start of the sequence) instead of
    ``(x - segment_start) mod r == offset``. It agrees with the definition only when every
    segment starts at a multiple of r.
    """
    args = (segment_lengths, dilation_rates, is_causal, mode, softmax_scale)
    return _dilated(q, k, v, *args, from_seg=False)
