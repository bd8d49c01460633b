"""The attention weights of dilated attention, formed densely (``need_weights=True``).

Dilated attention's output is linear in v: ``out(x) = sum_y W(x, y) v_y`` with

    W(x, y) = sum_i exp(lse_i(x) - L(x)) P_i(x, y),

``P_i`` the softmax of pattern i's masked scores (0 off its mask) and ``L`` the log-sum-exp
of the patterns' ``lse_i`` (spec §4). :func:`dilated_attention_weights` forms W for every
head: ``(b, h, n, n)``, O(h n²) time and memory, differentiable, so ``W @ v`` is the output
the kernels compute without ever forming it. A row with no key is 0. For
:class:`~ringsim.gpu.RingMultiheadDilatedAttention`'s ``need_weights=True``, and its one
exact path for a general ``attn_mask`` (:func:`score_bias`: a bias on every score of a pair
that a pattern attends); the checks of its masks are here too (:func:`is_causal_mask`,
:func:`check_attn_mask`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ringsim.config import Pattern, check_qkv, make_config, segment_bounds, selected_in_segment


def is_causal_mask(mask: Any, seq_len: int) -> bool:
    """Whether ``mask`` is ``nn.MultiheadAttention``'s causal ``attn_mask`` for ``seq_len``
    positions: ``(seq_len, seq_len)``, masking exactly the keys after each query (bool True
    there, or float ``-inf`` there and 0 elsewhere)."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (seq_len, seq_len):
        return False
    after = torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, after))
    if not mask.is_floating_point():
        return False
    return bool((mask[after] == -math.inf).all() and (mask[~after] == 0).all())


def check_attn_mask(mask: Any, b: int, heads: int, n: int, device, ring: bool) -> torch.Tensor:
    """A general ``attn_mask`` (not the causal one): ``(n, n)`` or ``(b * heads, n, n)``, bool
    or float, on the inputs' device; on one device only (``ring``: refused)."""
    if ring:
        raise NotImplementedError(
            "attn_mask: a ring applies a causal mask (is_causal) only: a general mask "
            "spans every pair of the sequence; pass None or a causal mask, or run "
            "without a group"
        )
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask: expected bool or float, got {mask.dtype}")
    if tuple(mask.shape) not in ((n, n), (b * heads, n, n)):
        raise ValueError(
            f"attn_mask: shape must be (seq, seq) = {(n, n)} or (batch * num_heads, seq, "
            f"seq) = {(b * heads, n, n)}, got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"attn_mask: must be on the inputs' device ({device}), got {mask.device}")
    return mask


def pattern_mask(pattern: Pattern, n: int, is_causal: bool, device) -> torch.Tensor:
    """``(n, n)`` bool, True where query x may attend key y under ``pattern`` (spec §3)."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for start, stop in segment_bounds(pattern.segment_length, n):
        rows = torch.from_numpy(selected_in_segment(pattern, start, start, stop))
        mask[rows[:, None], rows[None, :]] = True
    if is_causal:
        mask &= torch.ones(n, n, dtype=torch.bool).tril()
    return mask.to(device)


def score_bias(q: torch.Tensor, key_padding_mask=None, attn_mask=None) -> torch.Tensor | None:
    """The bias on the scores ``(b, h, n, n)`` (broadcastable) of a key padding mask ``(b,
    n)`` and an ``attn_mask`` ``(n, n)`` or ``(b * h, n, n)``, as ``nn.MultiheadAttention``
    reads them: bool True = never attend (``-inf``), float = added. None if neither."""
    b, n, h, _ = q.shape
    bias = None
    pair_shape = (1, 1, n, n) if attn_mask is not None and attn_mask.dim() == 2 else (b, h, n, n)
    for mask, shape in ((key_padding_mask, (b, 1, 1, n)), (attn_mask, pair_shape)):
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                mask, -math.inf
            )
        mask = mask.to(q.dtype).reshape(shape)
        bias = mask if bias is None else bias + mask
    return bias


def dilated_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    segment_lengths,
    dilation_rates,
    *,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weights W ``(b, h, n, n)`` with ``out = W @ v`` per head (module docstring).

    Args:
        q: ``(batch, seq_len, num_heads, head_dim)``; k: the same, or fewer heads
            (grouped-query attention: query head h reads K/V head ``h // ratio``).
        segment_lengths, dilation_rates, is_causal, mode, softmax_scale: as
            :func:`ringsim.gpu.dilated_attention`.
        key_padding_mask: ``(batch, seq_len)``, bool True = padding or float added to each
            key's scores, as :func:`ringsim.gpu.dilated_attention` takes it.
        attn_mask: ``(seq_len, seq_len)`` or ``(batch * num_heads, seq_len, seq_len)``, bool
            True = never attend or float added to the score of each (query, key) pair, as
            ``nn.MultiheadAttention`` takes it; it applies where a pattern attends the pair.
    Returns:
        W in q's dtype; each row sums to 1, or is 0 where the query has no key.
    """
    config = make_config(segment_lengths, dilation_rates, is_causal=is_causal, mode=mode,
                         softmax_scale=softmax_scale)  # fmt: skip
    _, n, h, d = check_qkv(q, k, k, allow_gqa=True)
    ratio, scale = h // k.shape[2], config.scale(d)
    bias = score_bias(q, key_padding_mask, attn_mask)
    masks: dict[Pattern, torch.Tensor] = {}
    heads = []
    for head, patterns in enumerate(config.head_patterns(h)):
        scores = scale * q[:, :, head] @ k[:, :, head // ratio].transpose(-1, -2)  # (b, n, n)
        if bias is not None:
            scores = scores + bias[:, min(head, bias.shape[1] - 1)]
        probs, lses = [], []
        for pattern in patterns:
            if pattern not in masks:
                masks[pattern] = pattern_mask(pattern, n, config.is_causal, q.device)
            masked = scores.masked_fill(~masks[pattern], -math.inf)
            has_key = (masked > -math.inf).any(-1, keepdim=True)  # rows with no key: zeros
            safe = torch.where(has_key, masked, 0.0)
            probs.append(torch.softmax(safe, -1) * has_key)
            lses.append(torch.where(has_key[..., 0], torch.logsumexp(safe, -1), -math.inf))
        lse = torch.stack(lses)  # (patterns, b, n)
        total = torch.logsumexp(lse, 0)
        total = torch.where(torch.isfinite(total), total, 0.0)  # no key anywhere: weights 0
        mix = torch.exp(lse - total)  # exp(lse_i - L), 0 for a pattern with no key
        heads.append(sum(m[..., None] * p for m, p in zip(mix, probs)))
    return torch.stack(heads, dim=1)
