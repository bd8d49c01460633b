"""Dilated attention as a differentiable ``torch.nn.Module`` (LongNet mode).

An independent, third-party style implementation (it does not import ringsim). Tensors use the
``(batch, num_heads, seq_len, head_dim)`` layout of torch's ``scaled_dot_product_attention``.
Every head uses every (segment length, dilation rate) pattern with offset
``head mod rate``; each pattern is a dense boolean mask over the scores, and the patterns of a
head are mixed by the softmax of their log-sum-exps. Rows that a pattern (or every pattern)
gives no key are handled without NaN, in the forward and the backward pass. float16 and
bfloat16 inputs are computed in float32 and returned in their own dtype.

Check it with::

    ringsim conform examples/torch_module.py:attention --layout bhnd --backend torch --grad
"""

from __future__ import annotations

import torch
from torch import nn


def _pattern_mask(n, w, r, num_heads, is_causal, device):
    """(num_heads, n, n) mask: query x may attend key y under pattern (w, r, head mod r)."""
    pos = torch.arange(n, device=device)
    w = min(w, n)
    offsets = torch.arange(num_heads, device=device) % r
    selected = (pos % w % r)[None, :] == offsets[:, None]  # (h, n)
    same_segment = pos[:, None] // w == pos[None, :] // w  # (n, n)
    mask = same_segment & selected[:, :, None] & selected[:, None, :]
    if is_causal:
        mask = mask & (pos[None, :] <= pos[:, None])
    return mask


class DilatedAttention(nn.Module):
    """LongNet dilated attention over several (segment length, dilation rate) pairs."""

    def __init__(self, segment_lengths, dilation_rates, softmax_scale=None):
        super().__init__()
        if len(segment_lengths) != len(dilation_rates):
            raise ValueError("segment_lengths and dilation_rates must have the same length")
        self.segment_lengths = tuple(int(w) for w in segment_lengths)
        self.dilation_rates = tuple(int(r) for r in dilation_rates)
        self.softmax_scale = softmax_scale

    def forward(self, q, k, v, is_causal=False):
        """q, k, v: (b, h, n, d); returns out (b, h, n, d) in the dtype of q."""
        dtype = q.dtype
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        q, k, v = q.to(work), k.to(work), v.to(work)
        _, h, n, d = q.shape
        scale = d**-0.5 if self.softmax_scale is None else self.softmax_scale
        scores = scale * (q @ k.transpose(-1, -2))  # (b, h, n, n)

        outs, lses, any_key = [], [], None
        for w, r in zip(self.segment_lengths, self.dilation_rates):
            mask = _pattern_mask(n, w, r, h, is_causal, q.device)
            has_key = mask.any(-1)  # (h, n)
            # Rows with no key get all-zero scores, so that nothing below sees a row of -inf.
            s = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key[..., None], 0.0)
            probs = torch.softmax(s, dim=-1) * mask  # zero for rows with no key
            outs.append(probs @ v)
            lses.append(torch.logsumexp(s, dim=-1).masked_fill(~has_key, float("-inf")))
            any_key = has_key if any_key is None else any_key | has_key

        # Mix: weights exp(lse_i - L) = softmax over the patterns; rows with no key at all get
        # finite dummy lses (their outputs are all zero, so the output stays zero).
        lse = torch.stack(lses).masked_fill(~any_key, 0.0)  # (p, b, h, n)
        weights = torch.softmax(lse, dim=0)
        out = sum(wt[..., None] * o for wt, o in zip(weights, outs))
        return out.to(dtype)


def attention(q, k, v, segment_lengths, dilation_rates, is_causal=False):
    """Build :class:`DilatedAttention` and apply it: q, k, v (b, h, n, d) -> out (b, h, n, d)."""
    return DilatedAttention(segment_lengths, dilation_rates)(q, k, v, is_causal=is_causal)
