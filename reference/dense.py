"""The dense-mask definition of dilated attention: SPEC 3-4 taken literally.

This is the oracle every other path is checked against. It builds each pattern's full
``(n, n)`` boolean mask from global positions, takes a masked softmax per pattern, and mixes
the patterns by their log-sum-exp (LongNet eq. 10). It shares no code with the fast paths
beyond the head -> pattern mapping, uses no plan, and always computes in float64.
Memory is O(n^2): use it for checking, not for long sequences.
"""

from __future__ import annotations

import numpy as np

from ringsim.config import Pattern, validate

from .block import scaled_scores, weighted_values


def pattern_mask(pattern: Pattern, seq_len: int, *, is_causal: bool = False) -> np.ndarray:
    """Boolean ``(n, n)`` mask of one pattern: ``mask[x, y]`` is True when x may attend y.

    True means *attend*, everywhere in this package (PITFALLS 4). SPEC 3: x and y in the
    same segment, both selected (``(x - segment_start) mod r == offset``), and ``y <= x``
    if causal.
    """
    pos = np.arange(seq_len)
    w_eff = pattern.effective_length(seq_len)
    segment = pos // w_eff
    selected = (pos - segment * w_eff) % pattern.dilation_rate == pattern.offset
    mask = (segment[:, None] == segment[None, :]) & selected[:, None] & selected[None, :]
    if is_causal:
        mask &= pos[None, :] <= pos[:, None]
    return mask


def masked_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention of one head under a boolean mask, in float64.

    Args:
        q, k, v: ``(b, n, d)``; mask: ``(n, n)`` bool, True = attend.
    Returns:
        out ``(b, n, d)`` (0 on rows with no key) and lse ``(b, n)`` (-inf there).
    """
    masked = scaled_scores("bxd,byd->bxy", q, k, scale, mask)
    lse = np.logaddexp.reduce(masked, axis=-1)  # -inf for a row with no key
    probs = np.where(mask, np.exp(masked - lse[..., None]), 0.0)
    return weighted_values(probs, v, "bxy,byd->bxd"), lse  # a masked NaN stays out


def dense_dilated_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    segment_lengths,
    dilation_rates,
    *,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The definition (SPEC 4): returns out ``(b, n, h, d)`` and lse ``(b, h, n)``, float64.

    Each head's patterns give ``(o_i, lse_i)`` from their masks; the head output is
    ``sum_i exp(lse_i - L) o_i`` with ``L = log sum_i exp(lse_i)`` (LongNet eq. 10), and 0 with
    ``L = -inf`` for a row no pattern gives a key. A key chosen twice counts twice.
    """
    config = validate(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        mode=mode,
        softmax_scale=softmax_scale,
    )
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, n, h, d = q.shape
    scale = config.scale(d)
    out = np.zeros((b, n, h, d))
    lse = np.full((b, h, n), -np.inf)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for head, patterns in enumerate(config.head_patterns(h)):
            parts = [
                masked_attention(
                    q[:, :, head],
                    k[:, :, head],
                    v[:, :, head],
                    pattern_mask(p, n, is_causal=config.is_causal),
                    scale,
                )
                for p in patterns
            ]
            lse_i = np.stack([part[1] for part in parts])  # (patterns, b, n)
            total = np.logaddexp.reduce(lse_i, axis=0)  # L(x), -inf if no pattern has a key
            for (o_i, _), l_i in zip(parts, lse_i):
                weight = np.where(l_i == -np.inf, 0.0, np.exp(l_i - total))
                out[:, :, head] += weight[..., None] * o_i
            lse[:, head] = total
    return out, lse
