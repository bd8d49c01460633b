"""The in-place stable merge as one Triton kernel, for float32 accumulators on CUDA.

:func:`ringsim.gpu.merge.merge_` in torch ops makes a float32 copy of the bf16 block
(``lerp_`` takes one dtype), then reads and writes the accumulator: about 18 bytes per
element, plus a dozen small launches for the weights. This kernel reads the accumulator
(4 bytes) and the block in its own dtype (2), computes the weight and the new lse per row,
and writes the accumulator (4): 10 bytes, one launch. Same formulas, same ``-inf`` rules
(spec §5): a row empty in the block keeps its state, a row empty so far takes the block.

Imported only on CUDA (this module imports Triton); :func:`ringsim.gpu.merge.merge_`
decides when it runs (:func:`ringsim.gpu.merge.fused_merge_reason`).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    out, lse, block_out, block_lse, rows, heads, length, dim,
    so0, so1, so2, sl0, sl1, sl2, sb0, sb1, sb2, sc0, sc1, sc2,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    start = tl.program_id(0).to(tl.int64) * BLOCK_R
    r = start + tl.arange(0, BLOCK_R).to(tl.int64)  # row index over (B, H, M)
    live = r < rows
    m = r % length
    h = (r // length) % heads
    b = r // (length * heads)
    lse_at = lse + b * sl0 + h * sl1 + m * sl2
    old = tl.load(lse_at, mask=live, other=0.0)
    new = tl.load(block_lse + b * sc0 + h * sc1 + m * sc2, mask=live, other=0.0).to(tl.float32)
    block_empty = new == float("-inf")
    empty = old == float("-inf")
    # s = sigmoid(new - old), the share of the block; the merged lse with logsigmoid
    share = 1.0 / (1.0 + tl.exp(old - new))
    weight = tl.where(block_empty, 0.0, tl.where(empty, 1.0, share))
    gap = old - new
    logsig = tl.minimum(gap, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(gap)))
    merged = tl.where(block_empty, old, tl.where(empty, new, old - logsig))
    cols = tl.arange(0, BLOCK_D)
    mask = live[:, None] & (cols < dim)[None, :]
    out_at = out + (b * so0 + h * so1 + m * so2)[:, None] + cols[None, :]
    acc = tl.load(out_at, mask=mask, other=0.0)
    blk = tl.load(
        block_out + (b * sb0 + h * sb1 + m * sb2)[:, None] + cols[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    tl.store(out_at, acc + weight[:, None] * (blk - acc), mask=mask)
    tl.store(lse_at, merged, mask=live)


def fused_merge_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Merge ``block_out (B, H, M, D)``, ``block_lse (B, H, M)`` into ``out``, ``lse`` (same
    shapes, float32, views allowed, last dim of out and block_out contiguous), in place."""
    nb, nh, m, d = out.shape
    rows = nb * nh * m
    if rows == 0:
        return
    block_d = triton.next_power_of_2(d)
    block_r = max(1, 4096 // block_d)
    grid = (triton.cdiv(rows, block_r),)
    on_device = torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext()
    with on_device:  # out's device, whichever is current
        _merge_kernel[grid](
            out, lse, block_out, block_lse, rows, nh, m, d,
            *out.stride()[:3], *lse.stride(), *block_out.stride()[:3], *block_lse.stride(),
            BLOCK_R=block_r, BLOCK_D=block_d,
        )  # fmt: skip
