"""The stable LSE merge in torch (the NumPy reference's ``merge_stable``, for tensors).

``out (..., M, D)`` and ``lse (..., M)`` are row-aligned here (the kernels' ``(B, H, M, D)``
layout). Accumulators are float32 or wider (float64 stays float64); ``-inf`` rows are handled
explicitly so an empty row never becomes NaN, and NaN inputs still propagate (spec §5, §7).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``(block_out, block_lse)`` into the running ``(out, lse)``; returns new tensors.

    ``out -= sigmoid(block_lse - lse) * (out - block_out)``,
    ``lse -= logsigmoid(lse - block_lse)``, in ``out``'s (accumulator) dtype.
    """
    weight, new_lse = _weight_and_lse(lse, block_lse.to(lse.dtype))
    new_out = out - weight[..., None].to(out.dtype) * (out - block_out.to(out.dtype))
    return new_out, new_lse


def _weight_and_lse(lse: torch.Tensor, block_lse: torch.Tensor):
    """``s = sigmoid(block_lse - lse)`` and the merged lse, with ``-inf`` rows explicit."""
    block_empty, empty = torch.isneginf(block_lse), torch.isneginf(lse)
    weight = torch.where(block_empty, 0.0, torch.where(empty, 1.0, torch.sigmoid(block_lse - lse)))
    new_lse = torch.where(
        block_empty,
        lse,
        torch.where(empty, block_lse, lse - torch.nn.functional.logsigmoid(lse - block_lse)),
    )
    return weight, new_lse


def fused_merge_reason(out: torch.Tensor, block_out: torch.Tensor) -> str | None:
    """Why :func:`merge_` cannot use the Triton kernel of :mod:`ringsim.gpu.executor.merge_triton`
    for these tensors (None: it can). Decided up front, never by catching an error."""
    if not out.is_cuda:
        return "the fused merge runs on CUDA only"
    if out.dtype != torch.float32 or out.dim() != 4:
        return "the fused merge takes float32 (B, H, M, D) accumulators"
    if out.stride(-1) != 1 or block_out.stride(-1) != 1 or out.shape[-1] > 256:
        return "the fused merge needs a contiguous last dim of at most 256"
    if not _has_triton():
        return "Triton is not installed"
    return None


#: Let CPU tensors take the mixing kernel under Triton's interpreter (``TRITON_INTERPRET=1``
#: as well): a hook for the CPU tests, off otherwise (the interpreter is slow).
INTERPRET_ON_CPU = False


def mix_reason(q: torch.Tensor) -> str | None:
    """Why the executor cannot mix its parts with the Triton kernel of
    :mod:`ringsim.gpu.executor.mix_triton` for inputs like ``q (b, n, h, d)`` (None: it can):
    device, dtype, head_dim and Triton. Under a CUDA graph's capture, the caller's included,
    the kernel's tables are kept as the graph needs (Note [Tables in CUDA graphs] in
    :mod:`ringsim.gpu.executor.cache`)."""
    interpreted = INTERPRET_ON_CPU and os.environ.get("TRITON_INTERPRET") == "1"
    if not (q.is_cuda or interpreted):
        return "the mixing kernel runs on CUDA (or under Triton's interpreter, for the tests)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the mixing kernel mixes in float32: {q.dtype} accumulates instead"
    if q.shape[-1] > 256:
        return "the mixing kernel takes head_dim <= 256"
    if not _has_triton():
        return "Triton is not installed"
    return None


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def merge_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """:func:`merge` in place, into ``out (..., M, D)`` and ``lse (..., M)`` (views allowed).

    On CUDA with float32 ``(B, H, M, D)`` accumulators, one Triton kernel does it all,
    reading the block in its own dtype (:mod:`ringsim.gpu.executor.merge_triton`); elsewhere
    ``out -= s * (out - block_out)`` is ``out.lerp_(block_out, s)``, one pass over ``out``
    after a copy of the block in out's dtype.
    """
    if fused_merge_reason(out, block_out) is None:
        from .merge_triton import fused_merge_

        fused_merge_(out, lse, block_out, block_lse)
    else:
        lerp_merge_(out, lse, block_out, block_lse)


def lerp_merge_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """:func:`merge_` with torch ops: the weights, then ``out.lerp_(block_out, s)``."""
    weight, new_lse = _weight_and_lse(lse, block_lse.to(lse.dtype))
    out.lerp_(block_out.to(out.dtype), weight[..., None].to(out.dtype))
    lse.copy_(new_lse)


def merge_into(
    out: torch.Tensor,
    lse: torch.Tensor,
    rows: torch.Tensor,
    heads: torch.Tensor,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> None:
    """Merge a block result into ``out (b, n, h, d)`` / ``lse (b, n, h)`` in place.

    ``rows`` and ``heads`` are index tensors that broadcast to one shape ``(M, H)``: row M
    of the block, head H, lands at ``out[:, rows, heads]``. ``block_out (b, M, H, d)``,
    ``block_lse (b, M, H)``. Rows the block does not name are left alone (the same as
    merging ``(0, -inf)`` there).
    """
    new_out, new_lse = merge(out[:, rows, heads], lse[:, rows, heads], block_out, block_lse)
    out[:, rows, heads] = new_out
    lse[:, rows, heads] = new_lse
