"""Attention kernels that return ``(out, lse)``, behind one small adapter each.

Every adapter takes ``q, k, v`` of shape ``(B, H, M, D)`` (a batch of blocks, heads, rows,
head_dim) and returns ``out (B, H, M, D)`` in q's dtype and ``lse (B, H, M)``: natural log,
float32 (float64 for float64 inputs on the math path), ``-inf`` on a row with no key.
``causal`` means the square diagonal block: row i attends keys 0..i (the plan only ever asks
for that or for no mask at all, spec §5).

Which kernel runs is decided by :func:`~ringsim.gpu.kernels.choose_kernel`, a capability
check on device, dtype, head_dim and alignment (Note [The kernel choice] in
:mod:`ringsim.gpu.kernels.choice`): never by catching a kernel's exception (pitfall 11).
Callers record the kernel that ran. Two substitutions are made here, each documented there:
a one-key block asked of cuDNN runs the math kernel, and a call of more than
:data:`~ringsim.gpu.kernels.choice.MAX_BLOCKS` blocks runs as several calls.

Kernel quirks normalised here:

- flash / cuDNN / efficient are PyTorch's SDPA aten ops that return the logsumexp;
  the efficient kernel pads lse to a multiple of 32 rows (sliced off), cuDNN returns
  ``(B, H, M, 1)`` (squeezed).
- FlashAttention-2 style kernels report ``+inf`` for a row with no key; any ``+inf`` lse is
  mapped to ``-inf`` (pitfall 6). With the plan's blocks no row is empty, but a caller may
  pass anything.
- a key mask (``bias``, :func:`attend`): the efficient and flash_cpu kernels return lse 0
  and out 0 on a row whose keys are all masked; such rows are set to lse ``-inf``
  (:func:`no_key_rows`), as the math kernel makes them.
- FlexAttention's frontend returns natural-log lse (its internal op works in base 2 and the
  frontend converts, pytorch PR #133159); the device check compares it with the math path.
"""

from __future__ import annotations

import functools
import math

import torch

from .choice import MAX_BLOCKS, Kernel, block_kernel, blocks_per_call
from .dropout import Dropout, active, keep_scale


def _no_empty_plus_inf(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(lse == math.inf, -math.inf, lse)


def math_attention(q, k, v, *, causal: bool, scale: float, allowed=None, bias=None,
                   keep=None):  # fmt: skip
    """Softmax attention with plain ops; scores in float32 (float64 for float64 input).

    ``allowed (M, L)``, if given, is a general mask (True = attend) used instead of the
    square causal one; ``bias (B, H, 1, L)``, if given, is added to the scores (a key mask:
    :func:`attend`); ``keep``, if given, multiplies the probabilities after the lse (dropout's
    ``mask / (1 - p)``, Note [Dropout] in :mod:`ringsim.gpu.kernels.dropout`).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = scale * torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2))  # (B, H, M, L)
    if bias is not None:
        scores = scores + bias.to(acc)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    elif causal:
        m, l_ = scores.shape[-2:]
        above = torch.ones(m, l_, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # -inf on a row with no key
    probs = torch.exp(scores - lse[..., None])  # an empty row gives -inf - -inf = NaN ...
    probs = torch.where(torch.isneginf(lse)[..., None], 0.0, probs)  # ... so it gets 0
    if keep is not None:
        probs = probs * keep
    return weighted_values(probs, v.to(acc)).to(q.dtype), lse


def weighted_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``probs @ v`` in which a key of weight 0 adds nothing even where its value is not
    finite (0 x NaN would make every row of the block NaN): a row is NaN exactly where it
    gives weight to a non-finite value (spec §7, as the NumPy reference). No host sync."""
    finite = torch.isfinite(v)
    out = torch.matmul(probs, torch.where(finite, v, 0.0))
    bad_keys = (~finite).any(dim=-1, keepdim=True).to(probs.dtype)  # (..., L, 1)
    touched = torch.matmul((probs != 0).to(probs.dtype), bad_keys)  # (..., M, 1)
    return torch.where(touched > 0, math.nan, out)


def attend(q, k, v, *, causal: bool, scale: float, kernel: Kernel, raw_lse: bool = False,
           bias: torch.Tensor | None = None, dropout: Dropout | None = None):  # fmt: skip
    """Run ``kernel`` on ``(B, H, M, D)`` blocks; returns ``(out, lse)`` as described above.

    ``raw_lse``: leave a ``+inf`` lse as the kernel returned it (one launch less), for a
    caller that reads ``+inf`` as an empty row itself (:mod:`ringsim.gpu.executor.mix_triton`).
    ``bias``: ``(B, H, 1, L)`` in q's dtype, added to every row's scores of each key: a key
    mask (0 = attend, ``-inf`` = never; ``key_padding_mask``), taken by the kernels whose
    :func:`~ringsim.gpu.kernels.capability` allows ``masked``. A row whose keys are all
    ``-inf`` gets out 0 and lse ``-inf``. ``dropout``: attention dropout; each call records
    its random state there (Note [Dropout] in :mod:`ringsim.gpu.kernels.dropout`).
    """
    kernel = block_kernel(kernel, k.shape[-2])
    drop = active(dropout)
    # with dropout, calls split as the backward splits them (Note [Dropout])
    per_call = blocks_per_call(q, k, v) if drop else MAX_BLOCKS
    if q.shape[0] > per_call and kernel is not Kernel.MATH and q.is_cuda:
        biases = (None,) * q.shape[0] if bias is None else bias.split(per_call)
        call = functools.partial(attend, causal=causal, scale=scale, kernel=kernel,
                                 raw_lse=raw_lse, dropout=drop)  # fmt: skip
        parts = [
            call(*chunk, bias=part)
            for *chunk, part in zip(*(x.split(per_call) for x in (q, k, v)), biases)
        ]
        return tuple(torch.cat(xs) for xs in zip(*parts))
    if bias is None:
        return _attend(q, k, v, causal, scale, kernel, raw_lse, None, drop)
    out, lse = _attend(q, k, v, causal, scale, kernel, raw_lse, bias, drop)
    empty = no_key_rows(bias, causal, q.shape[-2])
    return out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, -math.inf)


def no_key_rows(bias: torch.Tensor, causal: bool, rows: int) -> torch.Tensor:
    """``(B, H, M)`` bool: the rows of a block with key bias ``bias (B, H, 1, L)`` that have
    no key (every key they may attend is ``-inf``; causal: keys 0..i of row i)."""
    kept = ~torch.isneginf(bias[..., 0, :])  # (B, H, L)
    if causal:
        return kept.cumsum(-1)[..., :rows] == 0
    return (~kept.any(-1, keepdim=True)).expand(*kept.shape[:-1], rows)


def padded_bias(bias: torch.Tensor, rows: int) -> torch.Tensor:
    """``bias (B, H, 1, L)`` as the fused kernels read a mask: ``(B, H, M, L)`` with stride 0
    over rows, its storage's last dim padded to a multiple of 16 (the efficient kernel's
    alignment, as PyTorch's own ``scaled_dot_product_attention`` pads it)."""
    length = bias.shape[-1]
    storage = bias.new_zeros(*bias.shape[:-1], -(-length // 16) * 16)
    storage[..., :length] = bias
    return storage[..., :length].expand(*bias.shape[:2], rows, length)


def _attend(q, k, v, causal, scale, kernel, raw_lse, bias=None, dropout=None):
    aten = torch.ops.aten
    if kernel is Kernel.MATH:
        keep = None
        if dropout is not None:
            seed = dropout.new_seed()
            dropout.record(seed)
            keep = keep_scale(q, k, seed, dropout.p)
        return math_attention(q, k, v, causal=causal, scale=scale, bias=bias, keep=keep)
    if bias is not None and kernel not in (Kernel.EFFICIENT, Kernel.FLASH_CPU):
        raise ValueError(f"bias: kernel {kernel.value} takes no key mask")
    if dropout is not None and kernel not in (Kernel.FLASH, Kernel.EFFICIENT):
        raise ValueError(f"dropout: kernel {kernel.value} takes no dropout")
    mask = None if bias is None else padded_bias(bias, q.shape[-2])
    p = 0.0 if dropout is None else dropout.p
    if kernel is Kernel.FLASH:
        out, lse, *_, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, p, causal, False, scale=scale
        )
        if dropout is not None:
            dropout.record((seed, offset))
    elif kernel is Kernel.CUDNN:
        out, lse, *_ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        lse = lse.reshape(q.shape[:-1])
    elif kernel is Kernel.EFFICIENT:
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, p, causal, scale=scale
        )
        lse = lse[..., : q.shape[-2]]
        if dropout is not None:
            dropout.record((seed, offset))
    elif kernel is Kernel.FLASH_CPU:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
    elif kernel is Kernel.FLEX:
        return _flex(q, k, v, causal=causal, scale=scale)
    else:
        raise ValueError(f"kernel: unknown kernel {kernel!r}")
    return out, (lse if raw_lse else _no_empty_plus_inf(lse))


def _flex(q, k, v, *, causal: bool, scale: float):
    from torch.nn.attention.flex_attention import create_block_mask

    mask = None
    if causal:
        m, l_ = q.shape[-2], k.shape[-2]
        mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, m, l_, device=q.device)
    out, lse = compiled_flex()(q, k, v, block_mask=mask, scale=scale, return_lse=True)
    return out, lse.float()


@functools.cache
def compiled_flex():
    """``torch.compile(flex_attention)``, compiled once per process (FlexAttention is slow
    and memory-hungry uncompiled)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
