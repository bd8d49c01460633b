"""The backward of dilated attention on one device, in torch.

Every pattern group of an aligned pair (strided views) and every row batch of a ragged one
has one backward call here, given the *final* out and lse of its rows. With them, the
FlashAttention identity ``dS = P * (dP - D)``, ``P = exp(s - L)``, ``D = rowsum(dout * out)``
is each block's share of the exact gradient of the LSE mixture (SPEC 4;
:mod:`ringsim.reference.backward` derives it). The shares are added into float32
accumulators (float64 for float64 input): rows and heads are unique within one call, so
nothing is lost. On CUDA the groups of a pair too small to fill the GPU run side by side
(:class:`ringsim.gpu.aligned.SideStreams`; they write disjoint heads).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ringsim.batches import row_batches
from ringsim.config import DilatedConfig
from ringsim.plan import pair_groups

from .aligned import SideStreams, schedule
from .dilated import batch_blocks, batch_index, unblock
from .kernels import Kernel
from .kernels_backward import attend_backward
from .merge import accumulator_dtype
from .strided import group_blocks, is_strided


def dilated_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    config: DilatedConfig,
    kernel: Kernel,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of dilated attention on one device, in q's dtype.

    Args:
        q, k, v, out, dout: ``(b, n, h, d)``; out is the forward's (final) output.
        lse, dlse: ``(b, n, h)`` (rows, then heads), the forward's lse accumulator and its
            gradient (None: lse unused).
        config, kernel: as the forward ran.
    """
    b, n, h, d = q.shape
    acc = accumulator_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(b, n, h, d, dtype=acc, device=q.device) for _ in range(3))
    common = dict(causal=config.is_causal, scale=config.scale(d), kernel=kernel)
    inputs = (q, k, v, out, lse, dout, dlse)
    for groups in pair_groups(config, h):
        if all(is_strided(g, n) for g in groups):  # aligned: views in, views out
            # groups too small to fill the GPU run side by side (they write disjoint heads);
            # the next pair adds to the same totals, so it starts after the join
            small = schedule(groups, b, n, q.device) != "strided"
            sides = SideStreams(q.device) if small else None
            for i, g in enumerate(groups):
                with sides.on(i) if sides else contextlib.nullcontext():
                    blocks = functools.partial(group_blocks, group=g, seq_len=n)
                    for total, share in zip((dq, dk, dv), _block_grads(blocks, *inputs, common)):
                        blocks(total, view=True).add_(share)
            if sides:
                sides.join()
        else:  # ragged: gather the rows of each row batch, add back at the same rows
            for batch in row_batches(groups, n):
                rows, heads = batch_index(batch, 0, q.device)
                blocks = functools.partial(batch_blocks, batch=batch, rows=rows, heads=heads)
                for total, share in zip((dq, dk, dv), _block_grads(blocks, *inputs, common)):
                    total[:, rows, heads] += unblock(share, b)
    totals = [dq, dk, dv]
    del dq, dk, dv  # cast one at a time, freeing each float32 total: a lower peak
    return tuple(totals.pop(0).to(q.dtype) for _ in range(3))


def _block_grads(blocks, q, k, v, out, lse, dout, dlse, common: dict):
    """``attend_backward`` of the blocks ``blocks(x)`` selects from each full tensor (the
    lse and dlse blocks made contiguous: kernels read them densely)."""
    return attend_backward(
        *(blocks(x) for x in (q, k, v, out)),
        blocks(lse).contiguous(),
        blocks(dout),
        dlse=None if dlse is None else blocks(dlse).contiguous(),
        **common,
    )
