"""The dense-mask definition of dilated attention: spec §3, §4 taken literally.

This is the oracle every other path is checked against. It builds each pattern's full
``(n, n)`` boolean mask from global positions, takes a masked softmax per pattern, and mixes
the patterns by their log-sum-exp (LongNet eq. 10). It shares no code with the fast paths
beyond the head -> pattern mapping, uses no plan, and always computes in float64.
Memory is O(n^2): use it for checking, not for long sequences.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ringsim.config import Pattern, check_key_padding, validate

from .block import scaled_scores, weighted_values


def pattern_mask(pattern: Pattern, seq_len: int, *, is_causal: bool = False) -> np.ndarray:
    """Boolean ``(n, n)`` mask of one pattern: ``mask[x, y]`` is True when x may attend y.

    True means *attend*, everywhere in this package (pitfall 4). spec §3: x and y in the
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
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray,
    scale: float,
    bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention of one head under a boolean mask, in float64.

    Args:
        q, k, v: ``(b, n, d)``; mask: ``(n, n)`` (or ``(b, n, n)``) bool, True = attend.
        bias: ``(n, n)`` or ``(b, n, n)``, added to the allowed scores (``-inf``: not
            attended), or None.
    Returns:
        out ``(b, n, d)`` (0 on rows with no key) and lse ``(b, n)`` (-inf there).
    """
    masked = scaled_scores("bxd,byd->bxy", q, k, scale, mask)
    if bias is not None:
        masked = masked + bias
    weights, lse = normalized(masked, axis=-1)  # lse -inf for a row with no key
    probs = np.where(mask, weights, 0.0)
    return weighted_values(probs, v, "bxy,byd->bxd"), lse  # a masked NaN stays out


def normalized(logits: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``softmax(logits)`` along ``axis`` and its log-normaliser ``log sum exp(logits)``.

    Shifted by the largest logit and divided by the sum, so the weights sum to 1 whatever
    the logits' size: ``exp(l - logsumexp(l))`` loses ``log 2`` next to logits of 1e17 and
    gave two equal logits a weight of 1 each. All ``-inf``: weights 0, normaliser ``-inf``.
    """
    top = np.max(logits, axis=axis, keepdims=True)
    top = np.where(top == -np.inf, 0.0, top)
    shifted = np.exp(logits - top)
    total = shifted.sum(axis=axis, keepdims=True)
    weights = np.where(total == 0, 0.0, shifted / np.where(total == 0, 1.0, total))
    return weights, np.squeeze(top + np.log(total), axis=axis)


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
    on_head: Callable[[int], None] | None = None,
    key_padding_mask: np.ndarray | None = None,
    attn_bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The definition (spec §4): returns out ``(b, n, h, d)`` and lse ``(b, h, n)``, float64.

    ``on_head(h)``, if given, is called after each head is done (a progress bar: each head
    holds ``(b, n, n)`` arrays, seconds to minutes past n = 10K).

    Each head's patterns give ``(o_i, lse_i)`` from their masks; the head output is
    ``sum_i exp(lse_i - L) o_i`` with ``L = log sum_i exp(lse_i)`` (LongNet eq. 10), and 0 with
    ``L = -inf`` for a row no pattern gives a key. A key chosen twice counts twice. k and v
    may have fewer heads than q, ``(b, n, h_kv, d)``: query head i reads K/V head
    ``i // (h / h_kv)`` (grouped-query attention, spec §1). ``key_padding_mask (b, n)``
    bool, True = padding: a padded position is never a key of any pattern (spec §1).
    ``attn_bias`` ``(n, n)`` or ``(b, h, n, n)``: a bias on the score of each (query, key)
    pair, added where a pattern attends the pair (``-inf``: never attended; the multihead
    module's ``attn_mask``, spec §1).
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
        allow_gqa=True,
    )
    for name, x in (("q", q), ("k", k), ("v", v)):  # any real float, computed in float64
        if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
            raise TypeError(
                f"{name}: expected a numpy array of a real floating dtype, got "
                f"{getattr(x, 'dtype', type(x).__name__)}"
            )
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, n, h, d = q.shape
    pad = check_key_padding(key_padding_mask, b, n)
    pair_bias = check_attn_bias(attn_bias, b, h, n)
    keep = None if pad is None else ~pad[:, None, :]  # (b, 1, n): the keys that stay
    ratio = h // k.shape[2]  # query heads per K/V head (grouped-query attention)
    scale = config.scale(d)
    out = np.zeros((b, n, h, d))
    lse = np.full((b, h, n), -np.inf)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for head, patterns in enumerate(config.head_patterns(h)):
            parts = [
                masked_attention(
                    q[:, :, head],
                    k[:, :, head // ratio],
                    v[:, :, head // ratio],
                    pattern_mask(p, n, is_causal=config.is_causal)
                    & (True if keep is None else keep),
                    scale,
                    None if pair_bias is None else pair_bias[:, head],
                )
                for p in patterns
            ]
            lse_i = np.stack([part[1] for part in parts])  # (patterns, b, n)
            weights, total = normalized(lse_i, axis=0)  # L(x), -inf if no pattern has a key
            for (o_i, _), weight in zip(parts, weights):
                out[:, :, head] += weight[..., None] * o_i
            lse[:, head] = total
            if on_head is not None:
                on_head(head)
    return out, lse


def check_attn_bias(bias, b: int, h: int, n: int) -> np.ndarray | None:
    """``attn_bias`` as ``(1 or b, h, n, n)`` float64 (None stays None); a wrong shape or a
    NaN or ``+inf`` entry raises ``ValueError`` naming it."""
    if bias is None:
        return None
    bias = np.asarray(bias, dtype=np.float64)
    if bias.shape == (n, n):
        bias = np.broadcast_to(bias, (1, h, n, n))
    elif bias.shape != (b, h, n, n):
        raise ValueError(
            f"attn_bias: shape must be (seq_len, seq_len) = {(n, n)} or (batch, num_heads, "
            f"seq_len, seq_len) = {(b, h, n, n)}, got {bias.shape}"
        )
    if np.isnan(bias).any() or (bias == np.inf).any():
        raise ValueError("attn_bias: must not hold NaN or +inf")
    return bias
