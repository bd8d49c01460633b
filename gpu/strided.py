"""The aligned fast path: a pattern group's rows and heads as a strided view, no copies.

When ``w'`` divides n and r divides ``w'``, the rows of offset o are every r-th position:
viewing ``x (b, n, h, d)`` as ``(b, n/r, r, h, d)``, they are ``[:, :, o]``. A pattern
group's heads (those with ``h mod r = o``, in one pair) step by r too, so they are a slice.
The group's q, k, v are then views ``(b, S, m, H, d)`` (S segments of m rows) that the
kernels read as ``(b*S, H, m, d)`` with the last dim contiguous, and the result merges in
place into the same views of the float32 accumulators: no gather, no scatter.
"""

from __future__ import annotations

import torch

from ringsim.config import PatternGroup

from .kernels import Kernel, attend
from .merge import merge_


def heads_slice(heads: tuple[int, ...], step: int) -> slice | None:
    """``heads`` as a slice with ``step``, or None if they are not such a progression."""
    if heads != tuple(range(heads[0], heads[0] + step * len(heads), step)):
        return None
    return slice(heads[0], heads[0] + step * (len(heads) - 1) + 1, step)


def is_strided(group: PatternGroup, seq_len: int) -> bool:
    """Whether :func:`attend_strided` can run ``group`` over a sequence of ``seq_len``."""
    w, r = group.pattern.effective_length(seq_len), group.pattern.dilation_rate
    return seq_len % w == 0 and w % r == 0 and heads_slice(group.heads, r) is not None


def group_view(x: torch.Tensor, group: PatternGroup, seq_len: int) -> torch.Tensor:
    """``x (b, n, h, *rest)`` -> the group's rows and heads as a view ``(b, S, m, H, *rest)``."""
    w, r = group.pattern.effective_length(seq_len), group.pattern.dilation_rate
    b, n, h, *rest = x.shape
    selected = x.view(b, n // r, r, h, *rest)[
        :, :, group.pattern.offset, heads_slice(group.heads, r)
    ]
    return selected.view(b, n // w, w // r, len(group.heads), *rest)


def group_blocks(x: torch.Tensor, group: PatternGroup, seq_len: int) -> torch.Tensor:
    """``x (b, n, h, *rest)`` -> the group's blocks ``(b*S, H, m, *rest)``, a view of x."""
    view = group_view(x, group, seq_len)
    b, segments, m, nh, *rest = view.shape
    return view.view(b * segments, m, nh, *rest).transpose(1, 2)


def attend_strided(
    q,
    k,
    v,
    out,
    lse,
    group: PatternGroup,
    *,
    causal: bool,
    scale: float,
    kernel: Kernel,
    fresh: bool,
) -> None:
    """Attend one pattern group and merge into ``out (b, n, h, d)``, ``lse (b, n, h)``.

    ``fresh``: no earlier pattern touched these heads, so the result is copied, not merged.
    """
    n = q.shape[1]
    block_out, block_lse = attend(
        *(group_blocks(x, group, n) for x in (q, k, v)), causal=causal, scale=scale, kernel=kernel
    )
    out_view, lse_view = group_blocks(out, group, n), group_blocks(lse, group, n)
    if fresh:
        out_view.copy_(block_out)
        lse_view.copy_(block_lse)
    else:
        merge_(out_view, lse_view, block_out, block_lse)
