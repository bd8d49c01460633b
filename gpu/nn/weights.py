"""The attention weights of dilated attention, formed densely (``need_weights=True``).

Dilated attention's output is linear in v: ``out(x) = sum_y W(x, y) v_y`` with

    W(x, y) = sum_i exp(lse_i(x) - L(x)) P_i(x, y),

``P_i`` the softmax of pattern i's masked scores (0 off its mask) and ``L`` the log-sum-exp
of the patterns' ``lse_i`` (spec §4). :func:`dilated_attention_weights` forms W for every
head: ``(b, h, n, n)``, O(h n²) time and memory, differentiable, so ``W @ v`` is the output
the kernels compute without ever forming it. A row with no key is 0. For
:class:`~ringsim.gpu.RingMultiheadDilatedAttention`'s ``need_weights=True``.
"""

from __future__ import annotations

import math

import torch

from ringsim.config import Pattern, check_qkv, make_config, segment_bounds, selected_in_segment


def pattern_mask(pattern: Pattern, n: int, is_causal: bool, device) -> torch.Tensor:
    """``(n, n)`` bool, True where query x may attend key y under ``pattern`` (spec §3)."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for start, stop in segment_bounds(pattern.segment_length, n):
        rows = torch.from_numpy(selected_in_segment(pattern, start, start, stop))
        mask[rows[:, None], rows[None, :]] = True
    if is_causal:
        mask &= torch.ones(n, n, dtype=torch.bool).tril()
    return mask.to(device)


def dilated_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    segment_lengths,
    dilation_rates,
    *,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """The weights W ``(b, h, n, n)`` with ``out = W @ v`` per head (module docstring).

    Args:
        q: ``(batch, seq_len, num_heads, head_dim)``; k: the same, or fewer heads
            (grouped-query attention: query head h reads K/V head ``h // ratio``).
        segment_lengths, dilation_rates, is_causal, mode, softmax_scale: as
            :func:`ringsim.gpu.dilated_attention`.
    Returns:
        W in q's dtype; each row sums to 1, or is 0 where the query has no key.
    """
    config = make_config(segment_lengths, dilation_rates, is_causal=is_causal, mode=mode,
                         softmax_scale=softmax_scale)  # fmt: skip
    _, n, h, d = check_qkv(q, k, k, allow_gqa=True)
    ratio, scale = h // k.shape[2], config.scale(d)
    masks: dict[Pattern, torch.Tensor] = {}
    heads = []
    for head, patterns in enumerate(config.head_patterns(h)):
        scores = scale * q[:, :, head] @ k[:, :, head // ratio].transpose(-1, -2)  # (b, n, n)
        probs, lses = [], []
        for pattern in patterns:
            if pattern not in masks:
                masks[pattern] = pattern_mask(pattern, n, config.is_causal, q.device)
            mask = masks[pattern]
            has_key = mask.any(-1)[:, None]  # (n, 1): rows with no key softmax over zeros
            safe = torch.where(has_key, scores.masked_fill(~mask, -math.inf), 0.0)
            probs.append(torch.softmax(safe, -1) * has_key)
            lses.append(torch.where(has_key[:, 0], torch.logsumexp(safe, -1), -math.inf))
        lse = torch.stack(lses)  # (patterns, b, n)
        total = torch.logsumexp(lse, 0)
        total = torch.where(torch.isfinite(total), total, 0.0)  # no key anywhere: weights 0
        mix = torch.exp(lse - total)  # exp(lse_i - L), 0 for a pattern with no key
        heads.append(sum(m[..., None] * p for m, p in zip(mix, probs)))
    return torch.stack(heads, dim=1)
