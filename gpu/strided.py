"""The aligned fast path: a pattern group's rows and heads as a strided view, no copies.

When ``w'`` divides n and r divides ``w'``, the rows of offset o are every r-th position:
viewing ``x (b, n, h, d)`` as ``(b, n/r, r, h, d)``, they are ``[:, :, o]``. A pattern
group's heads (those with ``h mod r = o``, in one pair) step by r too, so they are a slice.
The group's q, k, v are then views ``(b, S, m, H, d)`` (S segments of m rows) that the
kernels read as ``(b*S, H, m, d)`` with the last dim contiguous, and the result merges in
place into the same views of the float32 accumulators: no gather, no scatter.

On CUDA the aligned forward keeps each group's result instead and mixes them all in one
pass (:mod:`ringsim.gpu.aligned`).
"""

from __future__ import annotations

import functools

import torch

from ringsim.config import DilatedConfig, PatternGroup
from ringsim.plan import pair_groups

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


@functools.lru_cache(maxsize=256)
def all_strided(config: DilatedConfig, seq_len: int, num_heads: int) -> bool:
    """Whether every pattern group of ``config`` is :func:`is_strided` (cached)."""
    return all(is_strided(g, seq_len) for groups in pair_groups(config, num_heads) for g in groups)


def group_view(x: torch.Tensor, group: PatternGroup, seq_len: int) -> torch.Tensor:
    """``x (b, n, h, *rest)`` -> the group's rows and heads as a view ``(b, S, m, H, *rest)``."""
    w, r = group.pattern.effective_length(seq_len), group.pattern.dilation_rate
    b, n, h, *rest = x.shape
    selected = x.view(b, n // r, r, h, *rest)[
        :, :, group.pattern.offset, heads_slice(group.heads, r)
    ]
    return selected.view(b, n // w, w // r, len(group.heads), *rest)


def group_blocks(
    x: torch.Tensor, group: PatternGroup, seq_len: int, *, view: bool = False
) -> torch.Tensor:
    """``x (b, n, h, *rest)`` -> the group's blocks ``(b*S, H, m, *rest)``.

    A view of x (one ``as_strided``) when b = 1 or x's batch stride is n times its row
    stride, as in any contiguous tensor; otherwise a copy, which is fine for inputs.
    ``view=True`` (the caller writes through the blocks) raises instead of copying.
    """
    w, r = group.pattern.effective_length(seq_len), group.pattern.dilation_rate
    b, n, _, *rest = x.shape
    sb, sn, sh, *srest = x.stride()
    segments, m, nh = n // w, w // r, len(group.heads)
    if b == 1 or sb == n * sn:  # batch and segments merge into one stride
        start = x.storage_offset() + group.pattern.offset * sn + group.heads[0] * sh
        return x.as_strided((b * segments, nh, m, *rest), (w * sn, r * sh, r * sn, *srest), start)
    if view:
        raise ValueError("group_blocks: written blocks need b = 1 or a contiguous (b, n) layout")
    selected = group_view(x, group, seq_len)
    return selected.reshape(b * segments, m, nh, *rest).transpose(1, 2)


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
    out_view, lse_view = (group_blocks(x, group, n, view=True) for x in (out, lse))
    if fresh:
        out_view.copy_(block_out)
        lse_view.copy_(block_lse)
    else:
        merge_(out_view, lse_view, block_out, block_lse)
