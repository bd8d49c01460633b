"""Layouts: which global positions each rank of a ring holds (spec §5).

A layout maps a rank to the *chunks* it holds: ranges of global positions, stored one after
the other as the rank's local shard of ``c = seq_len / P`` rows. Everything else (segments,
offsets, masks, the plan) is defined on global positions, whatever the layout.

- ``"contiguous"`` (the default): rank j holds ``[j*c, (j+1)*c)``, one chunk.
- ``"zigzag"``: the sequence is cut into 2P chunks of ``seq_len / (2P)`` positions; rank j
  holds chunk j then chunk 2P-1-j. Under causal masking the contiguous layout gives the
  last rank the most work (its queries see every key before them) and the first the least;
  pairing an early chunk with a late one evens that out (Note [Why zigzag balances]).
  At P = 1 both layouts hold the whole sequence in order.

Note [Why zigzag balances]
--------------------------
Causal attention over a segment of m chunks of s positions: the queries of the chunk at
index i of the segment score ``i*s*s + s*(s+1)/2`` pairs (the chunks before it, and the
diagonal). Work grows with i, so in the contiguous layout it grows with the rank. In the
zigzag layout a segment of m whole chunks in the first half (chunks ``k*m .. k*m+m-1``,
ranks in that order) has a mirror in the second half (chunks ``2P-1-k*m-(m-1) ..
2P-1-k*m``) held by the same ranks in reverse order: the rank with the chunk at index i in
one holds the chunk at index ``m-1-i`` in the other. Its two indices sum to ``m - 1``
whatever the rank, and so does its work. A segment across the middle is its own mirror,
each of its ranks holding both chunks; plain attention (m = 2P) is that case. Segments
shorter than a chunk are balanced in any layout. :meth:`ringsim.trace.Trace.work`
measures it; the tests hold it within 10% of the mean for P = 2..8.

:func:`shard` and :func:`unshard` cut a global array into a rank's shard and put the shards
back together, for NumPy arrays and torch tensors alike (no import of torch here: a tensor's
own methods do the work).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from enum import Enum


class Layout(str, Enum):
    """Which positions each rank holds (module docstring)."""

    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"

    @property
    def chunks_per_rank(self) -> int:
        return 1 if self is Layout.CONTIGUOUS else 2


LAYOUTS = tuple(layout.value for layout in Layout)


def check_layout(layout: Layout | str, seq_len: int | None = None, world_size: int = 1) -> Layout:
    """``layout`` as a :class:`Layout`; with ``seq_len``, also check that it cuts
    ``seq_len`` into ``world_size`` shards of whole chunks. Raises ``ValueError`` naming
    ``layout`` (or ``seq_len``) otherwise."""
    if isinstance(layout, bool) or not isinstance(layout, str):
        raise TypeError(f"layout: expected one of {LAYOUTS}, got {type(layout).__name__}")
    try:
        checked = Layout(layout)
    except ValueError:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}") from None
    chunks = checked.chunks_per_rank * world_size
    if seq_len is not None and seq_len % chunks:
        raise ValueError(
            f"seq_len: the {checked.value} layout cuts the sequence into {chunks} equal chunks "
            f"(world_size={world_size}), so seq_len % {chunks} must be 0; got seq_len={seq_len}"
        )
    return checked


def rank_chunks(
    layout: Layout | str, rank: int, seq_len: int, world_size: int
) -> tuple[range, ...]:
    """The global positions ``rank`` holds, chunk by chunk, in the order of its local
    shard (zigzag: chunk ``rank``, then chunk ``2P-1-rank``; at P = 1 those are chunks 0
    and 1, the whole sequence in order: one chunk, as contiguous)."""
    if Layout(layout) is Layout.CONTIGUOUS or world_size == 1:
        c = seq_len // world_size
        return (range(rank * c, (rank + 1) * c),)
    s = seq_len // (2 * world_size)
    return tuple(range(i * s, (i + 1) * s) for i in (rank, 2 * world_size - 1 - rank))


def chunk_length(layout: Layout | str, seq_len: int, world_size: int) -> int:
    """The positions in one chunk: ``seq_len / P`` (contiguous; zigzag at P = 1), else
    ``seq_len / (2P)``."""
    return len(rank_chunks(layout, 0, seq_len, world_size)[0])


def chunk_owner(layout: Layout | str, chunk: int, world_size: int) -> int:
    """The rank that holds chunk ``chunk`` (chunks of :func:`chunk_length` positions, from
    position 0): the inverse of :func:`rank_chunks`."""
    if Layout(layout) is Layout.CONTIGUOUS or world_size == 1:
        return chunk
    return chunk if chunk < world_size else 2 * world_size - 1 - chunk


def local_rows(chunks: tuple[range, ...], rows: range) -> range:
    """``rows`` (global positions inside one of ``chunks``) as indices into the local shard
    that holds ``chunks`` one after the other."""
    base = 0
    for chunk in chunks:
        if len(rows) == 0 or (chunk.start <= rows[0] and rows[-1] < chunk.stop):
            shift = base - chunk.start
            return range(rows.start + shift, rows.stop + shift, rows.step)
        base += len(chunk)
    raise ValueError(f"rows {rows} do not lie inside one chunk of {chunks}")


def _take(x, axis: int, part: range):
    index = [slice(None)] * x.ndim
    index[axis] = slice(part.start, part.stop)
    return x[tuple(index)]


def _concat(parts: Sequence, axis: int):
    first = parts[0]
    if type(first).__module__.startswith("torch"):  # a tensor: torch is imported already
        return sys.modules["torch"].cat(list(parts), dim=axis)
    return sys.modules["numpy"].concatenate(parts, axis=axis)


def _copy(x):
    """A contiguous copy (``ascontiguousarray`` and ``.contiguous()`` return a contiguous
    view itself, which would let a simulated rank touch the global array)."""
    if type(x).__module__.startswith("torch"):
        return x.clone(memory_format=sys.modules["torch"].contiguous_format)
    return sys.modules["numpy"].array(x, order="C", copy=True)


def shard(x, rank: int, world_size: int, *, layout: Layout | str = "contiguous", axis: int = 1):
    """Rank ``rank``'s shard of the global array ``x`` (NumPy array or torch tensor): the
    positions :func:`rank_chunks` names, along ``axis`` (1 for ``(batch, seq_len, heads,
    dim)`` inputs, -1 for an lse ``(batch, heads, seq_len)``), one after the other. A new
    contiguous array, not a view."""
    n = x.shape[axis]
    checked = check_layout(layout, n, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    parts = [_take(x, axis, c) for c in rank_chunks(checked, rank, n, world_size)]
    return _copy(parts[0]) if len(parts) == 1 else _concat(parts, axis)


def unshard(shards: Sequence, *, layout: Layout | str = "contiguous", axis: int = 1):
    """The global array whose shards (rank 0 first) are ``shards``: the inverse of
    :func:`shard` over every rank."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("shards: expected one shard per rank, got none")
    n = shards[0].shape[axis] * world_size
    checked = check_layout(layout, n, world_size)
    placed = {}  # global start of each chunk -> its rows in a shard
    for rank, x in enumerate(shards):
        local = 0
        for chunk in rank_chunks(checked, rank, n, world_size):
            placed[chunk.start] = _take(x, axis, range(local, local + len(chunk)))
            local += len(chunk)
    return _concat([placed[start] for start in sorted(placed)], axis)
