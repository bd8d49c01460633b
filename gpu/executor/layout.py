"""Where a batch's rows are: strided views for aligned configurations, gathered copies
otherwise.

**Strided views.** When ``w'`` divides n and r divides ``w'``, the rows of offset o are every
r-th position: viewing ``x (b, n, h, d)`` as ``(b, n/r, r, h, d)``, they are ``[:, :, o]``. A
pattern group's heads (those with ``h mod r = o``, in one pair) step by r too, so they are a
slice. The group's q, k, v are then views ``(b*S, H, m, d)`` (S segments of m rows) that the
kernels read with the last dim contiguous: no gather, no scatter. On a ring rank the same
holds for its shard of c rows, with the local width ``W = min(w', c)`` (spec §5's aligned
case: ``W`` divides c, and c is a multiple of r).

**The gathered layout.** A pair's selected rows of every head, copied by one
``index_select`` into ``(b*S, m, H, d)`` (heads in pattern-group order, each at its own
offset): the layout of one kernel call for a whole pair, and of the ring's K/V messages
(:mod:`ringsim.gpu.executor.forward`). With r = 1 over every head it is the input itself; with
one head per pattern group (r >= h, as LongNet's r = 16 pair of 16 heads) each head's rows
sit one row and one head further than the last head's, so a kernel's input in that layout is
a strided view too (:func:`pair_view`): one call for the pair and no copy.

**Row batches** (ragged configurations): :class:`ringsim.batches.RowBatch` index tensors,
one gather per input and a scatter of the result (:func:`batch_blocks`, :func:`unblock`).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

from ringsim.batches import RowBatch
from ringsim.config import PatternGroup

from .cache import DeviceCache


def heads_slice(heads: tuple[int, ...], step: int) -> slice | None:
    """``heads`` as a slice with ``step``, or None if they are not such a progression."""
    if heads != tuple(range(heads[0], heads[0] + step * len(heads), step)):
        return None
    return slice(heads[0], heads[0] + step * (len(heads) - 1) + 1, step)


def group_view(x: torch.Tensor, group: PatternGroup, length: int) -> torch.Tensor:
    """``x (b, L, h, *rest)`` -> the group's rows and heads as a view ``(b, S, m, H, *rest)``,
    with the local width ``W = min(w, L)``."""
    w, r = group.pattern.effective_length(length), group.pattern.dilation_rate
    b, n, h, *rest = x.shape
    selected = x.view(b, n // r, r, h, *rest)[
        :, :, group.pattern.offset, heads_slice(group.heads, r)
    ]
    return selected.view(b, n // w, w // r, len(group.heads), *rest)


def group_blocks(
    x: torch.Tensor, group: PatternGroup, length: int, *, view: bool = False
) -> torch.Tensor:
    """``x (b, L, h, *rest)`` -> the group's blocks ``(b*S, H, m, *rest)``, segments of the
    local width ``W = min(w, L)`` (a rank's shard: ``L = c``).

    A view of x (one ``as_strided``) when b = 1 or x's batch stride is L times its row
    stride, as in any contiguous tensor; otherwise a copy, which is fine for inputs.
    ``view=True`` (the caller writes through the blocks) raises instead of copying.
    """
    w, r = group.pattern.effective_length(length), group.pattern.dilation_rate
    b, n, _, *rest = x.shape
    sb, sn, sh, *srest = x.stride()
    segments, m, nh = n // w, w // r, len(group.heads)
    if b == 1 or sb == n * sn:  # batch and segments merge into one stride
        start = x.storage_offset() + group.pattern.offset * sn + group.heads[0] * sh
        return x.as_strided((b * segments, nh, m, *rest), (w * sn, r * sh, r * sn, *srest), start)
    if view:
        raise ValueError("group_blocks: written blocks need b = 1 or a contiguous (b, n) layout")
    selected = group_view(x, group, length)
    return selected.reshape(b * segments, m, nh, *rest).transpose(1, 2)


# --- the gathered layout --------------------------------------------------------------------

#: Gather indices of recent pairs (built on the host once, copied once per stream).
_ROWS = DeviceCache(32, "gather indices")


def pair_heads(groups: tuple[PatternGroup, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The heads of a pair in the gathered layout's order and the offset of each."""
    heads = tuple(h for g in groups for h in g.heads)
    offsets = tuple(g.pattern.offset for g in groups for _ in g.heads)
    return heads, offsets


def head_slices(groups: tuple[PatternGroup, ...]) -> tuple[slice, ...]:
    """Where each group's heads lie along the gathered layout's head axis."""
    out, start = [], 0
    for g in groups:
        out.append(slice(start, start + len(g.heads)))
        start += len(g.heads)
    return tuple(out)


def _pair_rows(b: int, n: int, h: int, w: int, r: int, offsets, heads, start: int,
               stop: int) -> torch.Tensor:  # fmt: skip
    """Rows of ``x.view(b * n * h, d)`` that an aligned pair gathers from positions ``[start,
    stop)``, block by block: ``(b, S, m, H)`` flattened, for position ``start + s*w + i*r +
    offsets[j]`` of head ``heads[j]`` (int64, on the host)."""
    positions = np.arange(start, stop, w)[:, None, None] + np.arange(0, w, r)[None, :, None]
    rows = (positions + np.asarray(offsets)) * h + np.asarray(heads)  # (S, m, H)
    return torch.from_numpy((np.arange(b)[:, None, None, None] * (n * h) + rows).reshape(-1))


def gather_pair(
    x: torch.Tensor,
    groups: tuple[PatternGroup, ...],
    rows: range | None = None,
    length: int | None = None,
    *,
    strided: bool = False,
) -> torch.Tensor:
    """``x (b, L, h, d)`` -> the pair's rows among ``rows`` (a range of whole segments of x's
    positions; all L by default) in the gathered layout ``(b*S, m, H, d)``, segments of the
    local width ``W = min(w, length)`` (``length``: ``len(rows)`` unless given; a zigzag
    shard's chunk, Note [Strided pieces] in :mod:`ringsim.gpu.executor.base`): a view of x
    where :func:`pair_view` makes one that is contiguous (r = 1 over every head), or any
    such view with ``strided`` (a kernel's input), else one ``index_select`` into a new
    tensor."""
    view = pair_view(x, groups, rows, length)
    if view is not None and (strided or view.is_contiguous()):
        return view
    b, n, h, d = x.shape
    index, blocks = _pair_index(x, groups, rows, length)
    flat = x.reshape(b * n * h, d)  # a view of the usual contiguous input; else a copy
    heads = sum(len(g.heads) for g in groups)
    return torch.index_select(flat, 0, index).view(b * blocks, -1, heads, d)


def scatter_add_pair(
    total: torch.Tensor,
    grad: torch.Tensor,
    groups: tuple[PatternGroup, ...],
    rows: range | None = None,
) -> None:
    """``total (b, L, h, d)`` (contiguous) += ``grad``, the pair's rows among ``rows`` in the
    gathered layout ``(b*S, m, H, d)`` as :func:`gather_pair` makes them: in place, through
    a view where :func:`pair_view` makes one, else by one ``index_add_``."""
    view = pair_view(total, groups, rows, None)
    if view is not None:
        view.add_(grad)
        return
    b, n, h, d = total.shape
    index, _ = _pair_index(total, groups, rows, None)
    total.view(b * n * h, d).index_add_(0, index, grad.reshape(-1, d).to(total.dtype))


def pair_view(x: torch.Tensor, groups, rows: range | None = None, length: int | None = None):
    """The gathered layout ``(b*S, m, H, *rest)`` of the pair's rows among ``rows`` as one
    strided view of ``x (b, L, h, *rest)``, where the pair's heads (in the layout's order,
    each at its group's offset) lie at equal steps in memory: r = 1 over every head, or
    one head per group with heads and offsets in step (r >= h, LongNet's largest rate), the
    step forward in memory; and the batch merges with the segments (b = 1, or x's batch
    stride is ``len(rows)`` rows). None otherwise."""
    b, n, _, *rest = x.shape
    sb, sn, sh, *srest = x.stride()
    rows = range(n) if rows is None else rows
    w = groups[0].pattern.effective_length(length or len(rows))
    r = groups[0].pattern.dilation_rate
    heads, offsets = pair_heads(groups)
    at = [o * sn + hh * sh for o, hh in zip(offsets, heads)]
    step = at[1] - at[0] if len(at) > 1 else sh
    uneven = any(later - first != step for first, later in itertools.pairwise(at))
    if uneven or step <= 0 or (b > 1 and sb != len(rows) * sn):  # views take no step back
        return None
    shape = (b * (len(rows) // w), w // r, len(heads), *rest)
    start = x.storage_offset() + rows.start * sn + at[0]
    return x.as_strided(shape, (w * sn, r * sn, step, *srest), start)


def _pair_index(x: torch.Tensor, groups, rows: range | None, length: int | None):
    """The rows of ``x.view(b * L * h, d)`` that the pair gathers from ``rows`` (cached on
    x's device), and how many segments of the local width those rows are."""
    b, n, h, _ = x.shape
    rows = range(n) if rows is None else rows
    w = groups[0].pattern.effective_length(length or len(rows))
    heads, offsets = pair_heads(groups)
    key = (b, n, h, w, groups[0].pattern.dilation_rate, offsets, heads, rows.start, rows.stop)
    return _ROWS.get(key, x.device, functools.partial(_pair_rows, *key)), len(rows) // w


def gathered_blocks(x: torch.Tensor, heads: slice | None = None) -> torch.Tensor:
    """A gathered ``(B, m, H, d)`` tensor (or its heads ``heads``) as kernel blocks
    ``(B, H', m, d)``: a view."""
    return (x if heads is None else x[:, :, heads]).transpose(1, 2)


# --- row batches (ragged configurations) ----------------------------------------------------

_INDEX = DeviceCache(64, "row indices")


def batch_index(batch: RowBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors of a row batch: rows ``(S*m, H)``, heads ``(1, H)``; ``x[:, rows,
    heads]`` is ``(b, S*m, H, ...)``. Cached on the device by the batch (row batches of a
    cached plan are the same objects)."""
    nh, segments, m = batch.shape

    def rows_of() -> torch.Tensor:
        rows = batch.rows.transpose(1, 2, 0).reshape(segments * m, nh)
        return torch.from_numpy(np.ascontiguousarray(rows))

    rows = _INDEX.get(("rows", batch), device, rows_of)  # by identity (eq=False)
    heads = _INDEX.get(
        ("heads", batch.heads), device, lambda: torch.tensor(batch.heads, dtype=torch.int64)
    )
    return rows, heads[None, :]


def kv_index(heads: torch.Tensor, kv_ratio: int) -> torch.Tensor:
    """The K/V head each query head of the index ``heads`` reads (grouped-query attention:
    ``h // kv_ratio``); ``heads`` itself with equal heads."""
    return heads if kv_ratio == 1 else heads // kv_ratio


def range_index(rows: range, device) -> torch.Tensor:
    """``rows`` as an int64 index tensor on ``device`` (cached)."""
    return _INDEX.get(
        ("range", rows.start, rows.stop, rows.step),
        device,
        lambda: torch.arange(rows.start, rows.stop, rows.step),
    )


def heads_index(heads: tuple[int, ...], device) -> torch.Tensor:
    """``heads`` as an int64 index tensor on ``device`` (cached)."""
    return _INDEX.get(("heads", heads), device, lambda: torch.tensor(heads, dtype=torch.int64))


def batch_blocks(x: torch.Tensor, batch: RowBatch, rows, heads) -> torch.Tensor:
    """``x (b, n, h, *rest)`` -> the batch's rows as blocks ``(b*S, H, m, *rest)``: one gather
    (its transpose is a view, which the kernels take: last dim contiguous)."""
    nh, segments, m = batch.shape
    picked = x[:, rows, heads]  # (b, S*m, H, *rest)
    return picked.reshape(x.shape[0] * segments, m, nh, *x.shape[3:]).transpose(1, 2)


def unblock(x: torch.Tensor, b: int) -> torch.Tensor:
    """Blocks ``(b*S, H, m, *rest)`` -> ``(b, S*m, H, *rest)``, the inverse of batch_blocks."""
    bs, nh, m, *rest = x.shape
    return x.transpose(1, 2).reshape(b, bs // b * m, nh, *rest)


def select(x: torch.Tensor, rows: range, heads: tuple[int, ...]) -> torch.Tensor:
    """``x (b, c, h, *rest)`` -> the rows (indices into x) and heads as ``(b, H, m, *rest)``,
    contiguous."""
    picked = x[:, range_index(rows, x.device)][:, :, heads_index(heads, x.device)]
    return picked.transpose(1, 2).contiguous()
