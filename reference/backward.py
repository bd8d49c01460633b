"""The backward pass of single-process dilated attention, exact in float64 (spec §4).

Forward, per head and query row: each pattern i gives ``(o_i, lse_i)`` over its keys, and the
patterns mix by their softmax denominators (LongNet eq. 10):

    out = sum_i w_i o_i,    w_i = exp(lse_i - L),    L = log sum_i exp(lse_i).

The gradients here are exact, *including through the weights* ``w_i`` (torchscale computes
them under no_grad: pitfall 14). Two forms, equal up to rounding:

1. :func:`dilated_attention_backward_chain`, the teaching form, runs the chain rule backwards
   through the forward: :func:`mix_backward` turns ``(dout, dL)`` into each pattern's
   ``(do_i, dlse_i)``, then :func:`block_attention_backward`, with each pattern's *own*
   ``(o_i, lse_i)``, turns those into dq, dk, dv.
2. :func:`dilated_attention_backward`, the fused form the ring uses, never looks at a
   pattern's own result: every block is given the FINAL ``(out, L, dout, dL)`` rows.

Note [one softmax over every pattern]
    The patterns of a row together are one softmax over the concatenation of their key lists
    (a key chosen by two patterns appears twice), because ``P_i * w_i`` is
    ``exp(s - lse_i) * exp(lse_i - L) = exp(s - L)``. The FlashAttention backward of that one
    softmax, with ``P = exp(s - L)``, ``dP = dout . v``, ``D = rowsum(dout * out)``:

        dS = P * (dP - D + dL),   dq = scale * dS @ k,   dk = scale * dS^T @ q,   dv = P^T @ dout

    is a sum of one term per block of keys, and each term needs only the block's q, k, v and
    the row's final out, L, dout, dL. So block_attention_backward called with the final
    ``(out, L)`` returns the block's *share* of the exact gradient, and the shares add up::

        keys of row x:  [ pattern 0, segment of x ][ pattern 1, segment of x ] ...
        dS of row x:    [ exp(s - L) (dP - D + dL) ][ exp(s - L) (dP - D + dL) ] ...
                        '---- one block call -----''---- one block call -----'

    The ring backward therefore runs block by block, exactly like the forward, with the global
    out and lse. The chain form agrees: mix_backward gives ``do_i = w_i dout`` and
    ``dlse_i = w_i (rowsum(dout * (o_i - out)) + dL)``, and then
    ``P_i (w_i dP - rowsum(do_i * o_i) + dlse_i) = exp(s - L) (dP - D + dL)``.

Shapes: out ``(b, n, h, d)``, lse ``(b, h, n)`` as everywhere in the package. A row with no key
(``lse = -inf``) gets no gradient, and never NaN (pitfall 6).
"""

from __future__ import annotations

import numpy as np

from ringsim.config import (
    DilatedConfig,
    PatternGroup,
    check_key_padding,
    segment_bounds,
    selected_in_segment,
    validate,
)

from .block import allowed_keys, scaled_scores
from .dilated import check_float, empty_result, padding, pattern_attention
from .select import kv_of, select_rows

Grads = tuple[np.ndarray, np.ndarray, np.ndarray]


def block_attention_backward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    dout: np.ndarray,
    q_positions: np.ndarray,
    k_positions: np.ndarray,
    *,
    is_causal: bool,
    scale: float,
    dlse: np.ndarray | None = None,
    key_padding: np.ndarray | None = None,
) -> Grads:
    """The backward of :func:`~ringsim.reference.block.block_attention` (FlashAttention's).

    Args:
        q: ``(b, m, h, d)``; k, v: ``(b, l, h, d)``, float32 or float64.
        out: ``(b, m, h, d)`` and lse: ``(b, h, m)``, the result the gradient is taken of:
            the block's own, or the final mixed out and L (Note [one softmax over every
            pattern]: then this is the block's share of the whole gradient).
        dout: ``(b, m, h, d)``, the gradient of the loss with respect to out.
        q_positions: ``(m,)``, k_positions: ``(l,)``, global positions of the rows.
        is_causal: key y is visible to query x only if ``y <= x`` (global positions).
        scale: multiplies the scores.
        dlse: ``(b, h, m)``, the gradient with respect to lse, or None for 0.
        key_padding: ``(b, l)`` bool, True where a key is padding (as the forward).
    Returns:
        dq ``(b, m, h, d)``, dk and dv ``(b, l, h, d)``, in q's dtype.
    """
    allowed = allowed_keys(q_positions, k_positions, is_causal, key_padding)
    scores = scaled_scores("bmhd,blhd->bhml", q, k, scale, allowed)  # (b, h, m, l)
    # 1. the probabilities from the given lse; a row with lse = -inf has no allowed key (or
    #    no key in any pattern) and gets P = 0, not exp(-inf - -inf) = NaN.
    empty = (lse == -np.inf)[..., None]  # (b, h, m, 1)
    probs = np.where(empty, 0.0, np.exp(scores - np.where(empty, 0.0, lse[..., None])))
    # 2. D = rowsum(dout * out), the softmax's correction term; dlse enters with the other sign.
    delta = np.einsum("bmhd,bmhd->bhm", dout, out)  # (b, h, m)
    if dlse is not None:
        delta = delta - dlse
    # 3. back through P = softmax(S) and S = scale * q.k.
    dprobs = np.einsum("bmhd,blhd->bhml", dout, v)  # (b, h, m, l)
    dscores = probs * (dprobs - delta[..., None])
    dq = scale * np.einsum("bhml,blhd->bmhd", dscores, k)
    dk = scale * np.einsum("bhml,bmhd->blhd", dscores, q)
    dv = np.einsum("bhml,bmhd->blhd", probs, dout)
    return dq.astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)


def mix_backward(
    outs: list[np.ndarray],
    lses: list[np.ndarray],
    out: np.ndarray,
    lse: np.ndarray,
    dout: np.ndarray,
    dlse: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The backward of mixing patterns by their lse (LongNet eq. 10).

    With ``w_i = exp(lse_i - L)``, ``out = sum_i w_i o_i`` and ``dw_i/dlse_j = w_i (δ_ij - w_j)``:

        do_i = w_i dout,    dlse_i = w_i (rowsum(dout * (o_i - out)) + dL).

    Args:
        outs: the patterns' ``o_i``, each ``(b, n, h, d)``; lses: their ``lse_i``, ``(b, h, n)``.
        out: ``(b, n, h, d)`` and lse: ``(b, h, n)``, the mixed result (``L``).
        dout: ``(b, n, h, d)``; dlse: ``(b, h, n)`` or None, the upstream gradients.
    Returns:
        ``(do_i, dlse_i)`` for every pattern, shaped like ``(o_i, lse_i)``. A pattern with
        ``lse_i = -inf`` on a row (weight 0), and a row with ``L = -inf``, get 0 there.
    """
    grads = []
    for o_i, lse_i in zip(outs, lses):
        with np.errstate(invalid="ignore"):  # -inf - -inf, discarded by the where
            weight = np.where(lse_i == -np.inf, 0.0, np.exp(lse_i - lse))  # (b, h, n)
        share = np.einsum("bnhd,bnhd->bhn", dout, o_i - out)
        if dlse is not None:
            share = share + dlse
        grads.append((np.einsum("bhn,bnhd->bnhd", weight, dout), weight * share))
    return grads


def check_backward_inputs(
    q: np.ndarray, out: np.ndarray, lse: np.ndarray, dout: np.ndarray, dlse: np.ndarray | None
) -> None:
    """out and dout are arrays shaped like q ``(b, n, h, d)``, lse and dlse ``(b, h, n)``, all
    of q's dtype (dlse may be None).

    Call after q has been validated; raises TypeError or ValueError naming the argument.
    """
    b, n, h, _ = q.shape
    for name, x, shape in (
        ("out", out, q.shape),
        ("dout", dout, q.shape),
        ("lse", lse, (b, h, n)),
        ("dlse", dlse, (b, h, n)),
    ):
        if x is None and name == "dlse":
            continue
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name}: expected a NumPy array, got {type(x).__name__}")
        if np.shape(x) != shape:
            raise ValueError(f"{name}: shape must be {shape}, got {np.shape(x)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: dtype must be q's ({q.dtype}), got {x.dtype}")


def validate_backward(q, k, v, out, lse, dout, dlse, segment_lengths, dilation_rates,
                      **kwargs) -> DilatedConfig:  # fmt: skip
    """The checks every backward entry point makes before any work: the forward's (spec §7,
    ``kwargs`` as :func:`ringsim.config.validate` takes them), q floating point, and out,
    lse, dout, dlse shaped for q (:func:`check_backward_inputs`). Returns the configuration."""
    config = validate(q, k, v, segment_lengths, dilation_rates, **kwargs, allow_gqa=True)
    check_float(q)
    check_backward_inputs(q, out, lse, dout, dlse)
    return config


def _group_backward(
    grads: Grads,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    dout: np.ndarray,
    dlse: np.ndarray | None,
    group: PatternGroup,
    config: DilatedConfig,
    key_padding: np.ndarray | None = None,
) -> None:
    """Add one pattern group's gradient into ``grads = (dq, dk, dv)`` ``(b, n, h, d)``.

    ``out, dout`` ``(b, n, h, d)`` and ``lse, dlse`` ``(b, h, n)`` are the result and its
    gradient that the group's blocks see: the final ones (fused form) or the group's own
    (chain form). Select / block backward / scatter-add, segment by segment.
    """
    heads = list(group.heads)
    kv = kv_of(heads, q.shape[2], k)  # the K/V head each query head reads
    scale = config.scale(q.shape[-1])
    for seg_start, seg_stop in segment_bounds(group.pattern.segment_length, q.shape[1]):
        rows = selected_in_segment(group.pattern, seg_start, seg_start, seg_stop)
        if rows.size == 0:
            continue  # the offset falls past this (short) segment: nothing selected
        block_grads = block_attention_backward(
            select_rows(q, rows, heads),
            select_rows(k, rows, kv),
            select_rows(v, rows, kv),
            select_rows(out, rows, heads),
            lse[:, heads][:, :, rows],
            select_rows(dout, rows, heads),
            rows,
            rows,
            is_causal=config.is_causal,
            scale=scale,
            dlse=None if dlse is None else dlse[:, heads][:, :, rows],
            **padding(key_padding, rows),
        )
        # rows are unique in a segment and heads in a group, so += adds each entry once;
        # query heads that share a K/V head add into it one after another (np.add.at)
        dq, dk, dv = block_grads
        grads[0][:, rows[:, None], np.array(heads)[None, :]] += dq
        for total, part in zip(grads[1:], (dk, dv)):
            np.add.at(total, (slice(None), rows[:, None], np.array(kv)[None, :]), part)


def dilated_attention_backward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, lse: np.ndarray,
    dout: np.ndarray, segment_lengths, dilation_rates, *, is_causal: bool = False,
    mode: str = "longnet", softmax_scale: float | None = None, dlse: np.ndarray | None = None,
    key_padding_mask: np.ndarray | None = None,
) -> Grads:  # fmt: skip
    """Gradients of :func:`~ringsim.reference.dilated.dilated_attention` (fused form).

    Args:
        q, k, v: ``(batch, seq_len, num_heads, head_dim)``, float32 or float64, one dtype;
            k and v may have fewer heads (grouped-query attention, as the forward).
        out: ``(batch, seq_len, num_heads, head_dim)`` and lse: ``(batch, num_heads, seq_len)``,
            what ``dilated_attention(..., return_lse=True)`` returned for these inputs.
        dout: ``(batch, seq_len, num_heads, head_dim)``, the gradient with respect to out.
        segment_lengths, dilation_rates, is_causal, mode, softmax_scale: as in the forward.
        dlse: ``(batch, num_heads, seq_len)``, the gradient with respect to lse, or None.
        key_padding_mask: ``(batch, seq_len)`` bool, True = padding, as the forward took it.
    Returns:
        dq shaped like q, dk and dv like k and v (summed over the query heads that share a
        K/V head), in q's dtype: the exact gradient,
        through the mixing weights too. Every block sees the final out and lse (Note [one
        softmax over every pattern]), so the patterns' own results are never needed.
    Raises:
        ValueError, TypeError: as the forward (spec §7); ValueError naming out, lse, dout or
        dlse when its shape is wrong.
    """
    config = validate_backward(
        q, k, v, out, lse, dout, dlse, segment_lengths, dilation_rates,
        is_causal=is_causal, mode=mode, softmax_scale=softmax_scale,
    )  # fmt: skip
    pad = check_key_padding(key_padding_mask, q.shape[0], q.shape[1])
    grads = (np.zeros_like(q), np.zeros_like(k), np.zeros_like(v))
    with np.errstate(invalid="ignore", over="ignore"):  # NaN inputs propagate (spec §7)
        for group in config.pattern_groups(q.shape[2]):
            _group_backward(grads, q, k, v, out, lse, dout, dlse, group, config, pad)
    return grads  # type: ignore[return-value]


def dilated_attention_backward_chain(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, lse: np.ndarray,
    dout: np.ndarray, segment_lengths, dilation_rates, *, is_causal: bool = False,
    mode: str = "longnet", softmax_scale: float | None = None, dlse: np.ndarray | None = None,
    key_padding_mask: np.ndarray | None = None,
) -> Grads:  # fmt: skip
    """The same gradients as :func:`dilated_attention_backward`, by the chain rule in two
    stages: back through the mix, then back through each pattern's blocks. Same arguments.

    It recomputes every pattern's own ``(o_i, lse_i)``, which the fused form does not need.
    """
    config = validate_backward(
        q, k, v, out, lse, dout, dlse, segment_lengths, dilation_rates,
        is_causal=is_causal, mode=mode, softmax_scale=softmax_scale,
    )  # fmt: skip
    pad = check_key_padding(key_padding_mask, q.shape[0], q.shape[1])
    b, n, h, d = q.shape
    groups = config.pattern_groups(h)
    grads = (np.zeros_like(q), np.zeros_like(k), np.zeros_like(v))
    with np.errstate(invalid="ignore", over="ignore"):
        # 1. forward again, keeping each group's own (o_i, lse_i) on all h heads: the heads
        #    outside the group get (0, -inf), weight 0, so every head mixes over all groups.
        outs, lses = [], []
        for group in groups:
            o_i, lse_i = empty_result(b, n, h, d, q.dtype)
            o_i[:, :, list(group.heads)], lse_i[:, list(group.heads)] = pattern_attention(
                q, k, v, group, is_causal=config.is_causal, scale=config.scale(d),
                **({} if pad is None else {"key_padding": pad}),
            )  # fmt: skip
            outs.append(o_i)
            lses.append(lse_i)
        # 2. back through the mix: (dout, dL) -> (do_i, dlse_i) for every group.
        mixed = mix_backward(outs, lses, out, lse, dout, dlse)
        # 3. back through each group's blocks, with its own result and upstream gradient.
        for group, o_i, lse_i, (do_i, dlse_i) in zip(groups, outs, lses, mixed):
            _group_backward(grads, q, k, v, o_i, lse_i, do_i, dlse_i, group, config, pad)
    return grads  # type: ignore[return-value]
