"""Attention kernels that return ``(out, lse)``, behind one small adapter each.

Every adapter takes ``q, k, v`` of shape ``(B, H, M, D)`` (a batch of blocks, heads, rows,
head_dim) and returns ``out (B, H, M, D)`` in q's dtype and ``lse (B, H, M)``: natural log,
float32 (float64 for float64 inputs on the math path), ``-inf`` on a row with no key.
``causal`` means the square diagonal block: row i attends keys 0..i (the plan only ever asks
for that or for no mask at all, SPEC 5).

Which kernel runs is decided by :func:`choose_kernel`, a capability check on device, dtype
and head_dim: never by catching a kernel's exception (PITFALLS 11). Callers record the
kernel that ran.

Kernel quirks normalised here:

- flash / cuDNN / efficient are PyTorch's SDPA aten ops that return the logsumexp;
  the efficient kernel pads lse to a multiple of 32 rows (sliced off), cuDNN returns
  ``(B, H, M, 1)`` (squeezed).
- FlashAttention-2 style kernels report ``+inf`` for a row with no key; any ``+inf`` lse is
  mapped to ``-inf`` (PITFALLS 6). With the plan's blocks no row is empty, but a caller may
  pass anything.
- FlexAttention's frontend returns natural-log lse (its internal op works in base 2 and the
  frontend converts, pytorch PR #133159); the device check compares it with the math path.
"""

from __future__ import annotations

import functools
import math
from enum import Enum

import torch


class Kernel(str, Enum):
    """The attention kernels ringsim can call."""

    FLASH = "flash"  # CUDA, fp16/bf16, head_dim % 8 == 0 and <= 256
    CUDNN = "cudnn"  # CUDA (sm80+), fp16/bf16, head_dim % 8 == 0 and <= 128
    EFFICIENT = "efficient"  # CUDA, fp16/bf16/fp32
    FLEX = "flex"  # FlexAttention, compiled; CUDA, fp16/bf16/fp32
    FLASH_CPU = "flash_cpu"  # PyTorch's CPU flash kernel; float32/float64/bf16
    MATH = "math"  # plain torch ops: any device, any float dtype; the reference path


HALF = (torch.float16, torch.bfloat16)


def capability(kernel: Kernel, q: torch.Tensor) -> str | None:
    """Why ``kernel`` cannot run on tensors like ``q`` ``(B, H, M, D)``; None if it can."""
    cuda, d = q.is_cuda, q.shape[-1]
    if kernel is Kernel.MATH:
        return None if q.is_floating_point() else f"dtype {q.dtype} is not floating point"
    if kernel is Kernel.FLASH_CPU:
        if cuda:
            return "flash_cpu runs on the CPU only"
        if q.dtype not in (torch.float32, torch.float64, torch.bfloat16):
            return f"flash_cpu does not take {q.dtype}"
        return None
    if not cuda:
        return f"{kernel.value} needs a CUDA device"
    major, _ = torch.cuda.get_device_capability(q.device)
    if kernel is Kernel.FLASH:
        if q.dtype not in HALF:
            return f"flash takes fp16/bf16, not {q.dtype}"
        if d % 8 or d > 256:
            return f"flash needs head_dim % 8 == 0 and <= 256, got {d}"
        return None if major >= 8 else "flash needs sm80 or newer"
    if kernel is Kernel.CUDNN:
        if q.dtype not in HALF:
            return f"cudnn takes fp16/bf16, not {q.dtype}"
        if d % 8 or d > 128:
            return f"cudnn needs head_dim % 8 == 0 and <= 128, got {d}"
        if not torch.backends.cudnn.is_available():
            return "cudnn is not available in this torch build"
        return None if major >= 9 else "cudnn attention is used on sm90 or newer only"
    if kernel is Kernel.EFFICIENT:
        if q.dtype not in (*HALF, torch.float32):
            return f"efficient takes fp16/bf16/fp32, not {q.dtype}"
        return None if d % 8 == 0 else f"efficient needs head_dim % 8 == 0, got {d}"
    if kernel is Kernel.FLEX:
        if q.dtype not in (*HALF, torch.float32):
            return f"flex takes fp16/bf16/fp32, not {q.dtype}"
        if d < 16 or d & (d - 1):
            return f"flex needs a power-of-2 head_dim >= 16, got {d}"
        return None
    raise ValueError(f"kernel: unknown kernel {kernel!r}")


#: Preference order when no kernel is asked for.
PREFERENCE = (Kernel.FLASH, Kernel.CUDNN, Kernel.EFFICIENT, Kernel.MATH)


def as_kernel(requested: Kernel | str) -> Kernel:
    """``requested`` as a :class:`Kernel`; ``ValueError`` naming the choices otherwise."""
    try:
        return Kernel(requested)
    except ValueError:
        names = ", ".join(k.value for k in Kernel)
        raise ValueError(f"kernel: must be one of {names}, got {requested!r}") from None


def choose_kernel(q: torch.Tensor, requested: Kernel | str | None = None) -> Kernel:
    """The kernel for tensors like ``q``: ``requested`` if it can run (else ``ValueError``
    with the reason), otherwise the first of :data:`PREFERENCE` that can."""
    if requested is not None:
        kernel = as_kernel(requested)
        reason = capability(kernel, q)
        if reason is not None:
            raise ValueError(f"kernel: {kernel.value} cannot run here: {reason}")
        return kernel
    return next(k for k in PREFERENCE if capability(k, q) is None)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_empty_plus_inf(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(lse == math.inf, -math.inf, lse)


def math_attention(q, k, v, *, causal: bool, scale: float, allowed=None):
    """Softmax attention with plain ops; scores in float32 (float64 for float64 input).

    ``allowed (M, L)``, if given, is a general mask (True = attend) used instead of the
    square causal one.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = scale * torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2))  # (B, H, M, L)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    elif causal:
        m, l_ = scores.shape[-2:]
        above = torch.ones(m, l_, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # -inf on a row with no key
    probs = torch.exp(scores - lse[..., None])  # an empty row gives -inf - -inf = NaN ...
    probs = torch.where(torch.isneginf(lse)[..., None], 0.0, probs)  # ... so it gets 0
    return torch.matmul(probs, v.to(acc)).to(q.dtype), lse


def attend(q, k, v, *, causal: bool, scale: float, kernel: Kernel, raw_lse: bool = False):
    """Run ``kernel`` on ``(B, H, M, D)`` blocks; returns ``(out, lse)`` as described above.

    ``raw_lse``: leave a ``+inf`` lse as the kernel returned it (one launch less), for a
    caller that reads ``+inf`` as an empty row itself (:mod:`ringsim.gpu.mix_triton`).
    """
    aten = torch.ops.aten
    if kernel is Kernel.MATH:
        return math_attention(q, k, v, causal=causal, scale=scale)
    if kernel is Kernel.FLASH:
        out, lse, *_ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
    elif kernel is Kernel.CUDNN:
        out, lse, *_ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        lse = lse.reshape(q.shape[:-1])
    elif kernel is Kernel.EFFICIENT:
        out, lse, *_ = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale
        )
        lse = lse[..., : q.shape[-2]]
    elif kernel is Kernel.FLASH_CPU:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
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
