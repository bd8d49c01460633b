"""The stable LSE merge in torch (the NumPy reference's ``merge_stable``, for tensors).

``out (..., M, D)`` and ``lse (..., M)`` are row-aligned here (the kernels' ``(B, H, M, D)``
layout). Accumulators are float32 or wider (float64 stays float64); ``-inf`` rows are handled
explicitly so an empty row never becomes NaN, and NaN inputs still propagate (SPEC 5, 7).
"""

from __future__ import annotations

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def merge_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """:func:`merge` in place, into ``out (..., M, D)`` and ``lse (..., M)`` (views allowed).

    ``out -= s * (out - block_out)`` is ``out.lerp_(block_out, s)``: one pass over ``out``.
    """
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
