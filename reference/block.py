"""Attention of one block of queries against one block of keys, returning ``(out, lse)``.

The unit every path is built from: the single-process reference calls it once per segment
and pattern, the ring once per step. Causality is decided by *global* positions, passed in
(pitfall 5): a block never knows where it sits in a compacted array.
"""

from __future__ import annotations

import numpy as np


def masked_scores(scores: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Scores with disallowed entries set to -inf; ``allowed`` True = attend (pitfall 4)."""
    if allowed is None:
        return scores
    return np.where(allowed, scores, -np.inf)


def scaled_scores(
    spec: str, q: np.ndarray, k: np.ndarray, scale: float, allowed: np.ndarray | None
) -> np.ndarray:
    """``scale * np.einsum(spec, q, k)``, disallowed entries -inf (``allowed`` broadcasts
    over the scores; None: all allowed).

    Raises ``ValueError`` naming ``softmax_scale`` where an allowed score of a finite query
    and a finite key overflows: its softmax would be NaN (inf - inf) where the definition's
    is not. A non-finite input row is not an overflow: its rows become NaN (spec §7).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        raw = scale * np.einsum(spec, q, k)
        if not np.isfinite(raw).all():  # a non-finite input, or an overflow?
            finite = [np.where(np.isfinite(x).all(axis=-1, keepdims=True), x, 0.0) for x in (q, k)]
            products = np.einsum(spec, *finite)
            overflow = ~np.isfinite(scale * products)
            if (overflow if allowed is None else overflow & allowed).any():
                raise ValueError(
                    f"softmax_scale: {scale:g} times the largest |q.k| "
                    f"({float(np.abs(products).max()):.3g}) overflows {q.dtype} (largest "
                    f"{np.finfo(q.dtype).max:.3g}); use a smaller softmax_scale or smaller inputs"
                )
    return masked_scores(raw, allowed)


def allowed_keys(
    q_positions: np.ndarray,
    k_positions: np.ndarray,
    is_causal: bool,
    key_padding: np.ndarray | None = None,
) -> np.ndarray | None:
    """Which (query, key) pairs of a block may attend (True = attend, pitfall 4): causal by
    global position (``y <= x``), and never a padded key (``key_padding (b, l)``, True =
    padding, spec §1). ``(m, l)`` or ``(b, 1, m, l)``, broadcasting over the scores
    ``(b, h, m, l)``; None when every pair may."""
    allowed = k_positions[None, :] <= q_positions[:, None] if is_causal else None
    if key_padding is None:
        return allowed
    keep = ~np.asarray(key_padding, dtype=bool)[:, None, None, :]  # (b, 1, 1, l)
    return keep if allowed is None else keep & allowed


def weighted_values(weights: np.ndarray, v: np.ndarray, spec: str) -> np.ndarray:
    """``np.einsum(spec, weights, v)`` (``spec`` sums over the keys) in which a key of weight
    0 contributes nothing even where its value is not finite (spec §7: only the rows that
    attend to a non-finite input are NaN; 0 x NaN would spread a masked key's NaN to every
    row of the block). A row that gives weight to a non-finite value is NaN.

    ``spec`` is ``"W,V->O"`` with the value's last index the head dim, absent from W.
    """
    finite = np.isfinite(v)
    if finite.all():
        return np.einsum(spec, weights, v)
    out = np.einsum(spec, weights, np.where(finite, v, 0.0))
    w_idx, rest = spec.split(",")
    v_idx, o_idx = rest.split("->")
    bad_value = (~finite).any(axis=-1).astype(out.dtype)  # per key (and batch, head)
    touched = np.einsum(f"{w_idx},{v_idx[:-1]}->{o_idx[:-1]}", (weights != 0).astype(out.dtype),
                        bad_value)  # fmt: skip
    return np.where(touched[..., None] > 0, np.nan, out)


def block_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_positions: np.ndarray,
    k_positions: np.ndarray,
    *,
    is_causal: bool,
    scale: float,
    key_padding: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention of the query rows over the key rows given.

    Args:
        q: ``(b, m, h, d)``; k, v: ``(b, l, h, d)``, one float dtype.
        q_positions: ``(m,)`` global positions of the query rows.
        k_positions: ``(l,)`` global positions of the key rows.
        is_causal: mask key y from query x unless ``y <= x`` (global positions).
        scale: multiplies the scores.
        key_padding: ``(b, l)`` bool, True where a key is padding: never attended.
    Returns:
        block_out ``(b, m, h, d)`` and block_lse ``(b, h, m)`` in q's dtype; a row with no
        allowed key gives ``(0, -inf)`` (pitfall 6).
    """
    allowed = allowed_keys(q_positions, k_positions, is_causal, key_padding)
    scores = scaled_scores("bmhd,blhd->bhml", q, k, scale, allowed)  # (b, h, m, l)
    with np.errstate(invalid="ignore", divide="ignore"):
        # 1. subtract each row's max so exp never overflows; an empty row's max is -inf,
        #    and -inf - -inf would be NaN, so such rows subtract 0 instead.
        row_max = scores.max(axis=-1, keepdims=True)
        row_max = np.where(row_max == -np.inf, 0.0, row_max)
        probs = np.exp(scores - row_max)  # unnormalised, (b, h, m, l)
        # 2. the denominator and the lse; log(0) = -inf marks an empty row.
        denom = probs.sum(axis=-1)  # (b, h, m)
        lse = row_max[..., 0] + np.log(denom)
        # 3. normalise; an empty row has denom 0 and gets 0 (NaN rows stay NaN).
        out = weighted_values(probs, v, "bhml,blhd->bmhd")
        rows = np.swapaxes(denom, -1, -2)[..., None]  # (b, m, h, 1)
        out = np.where(rows == 0, 0.0, out / rows)
    return out.astype(q.dtype), lse.astype(q.dtype)
