"""What the forward and backward executors share: the rank's tensors and plan, which path
runs (strided views or gathered rows: Note [Two layouts, two combiners] in
:mod:`ringsim.gpu.executor.forward`), the ring's messages in that path's layout, and the
views of one batch's blocks.

Note [Strided pieces]
---------------------
In the zigzag layout (:mod:`ringsim.layout`) a rank's shard is two chunks of s rows, and
the strided views serve it when the configuration is aligned on chunks (:func:`strided`).
The local width of a pair is ``W = min(w', s)``: a segment inside a chunk is a segment of
the views, as in a contiguous shard; a longer one is whole chunks, so each chunk of the
shard is one block of the views (S = 2). The plan cuts such blocks into *pieces* (Note
[Pieces] in :mod:`ringsim.plan`), and the executor follows it:

- the diagonal batch (each piece against itself) runs on the views of the whole shard, as
  any own batch;
- a task off the diagonal (a piece of the rank's queries against one piece of a block, its
  own other piece or one received) is one call for every head of the pair: the query
  chunk's rows gathered (:func:`~ringsim.gpu.executor.layout.gather_pair` over the chunk)
  against the piece as it travels. Such a block is always FULL (two pieces never
  interleave) in every group (the chunk holds rows of every group);
- a block is one gathered ``(b, m, H, d)`` tensor of K and one of V per piece, and a piece
  no rank further along needs travels as 0 rows; the backward adds each task's dK/dV into
  its piece of the block's share, and a share that comes home into the chunk's view.

Results combine as on a contiguous ring: the parts of every pair inside chunks go to the one
mix, and a pair whose segments span chunks merges its parts, of every shape (a piece, a
group, the whole pair), into one float32 partial of its own first (Note [Partials across
steps] in :mod:`ringsim.gpu.executor.forward`); where the mix cannot run, each group's
part accumulates. Measured on 2 H200s at 256K for LongNet's
(c), causal, forward (2026-11-30): 8.47 ms, against 24.35 ms with one call per task and
group and every result accumulated (and 8.57 ms on the contiguous ring). The calls made
the difference: feeding those one-head calls' parts to the mix, an earlier attempt, took
33.1 ms (``docs/results/bench_ring_quick_zigzag_mix.json``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ringsim.comm.base import Payload, Recv
from ringsim.config import DilatedConfig, PatternGroup, kv_heads
from ringsim.plan import BlockAction, RankPlan, TaskBatch, Transfer

from ..kernels import Dropout, Kernel, accumulator_dtype
from ..kernels.dropout import active
from .layout import (
    gather_pair,
    gathered_blocks,
    group_blocks,
    head_slices,
    heads_index,
    pair_view,
    select,
)
from .pool import MemoryPool, buffer


def strided(config: DilatedConfig, plan: RankPlan) -> bool:
    """Whether the strided views serve this rank (Note [Two layouts, two combiners]): spec
    §5's aligned case, on the chunks the rank holds (Note [Strided pieces]): each ``w'``
    divides n; each ``w'`` up to a chunk's length s divides s, each longer one is whole
    chunks; each r divides its ``w'`` and s (contiguous: s = c)."""
    if len(plan.chunks) == 1:
        return config.is_aligned(plan.seq_len, plan.world_size)
    n, s = plan.seq_len, len(plan.chunks[0])
    for w, r in zip(config.effective_segment_lengths(n), config.dilation_rates):
        if n % w or w % r or s % r or (s % w if w <= s else w % s):
            return False
    return True


class Executor:
    """What the forward and backward executors share: the rank's tensors, its plan, which
    layout runs (Note [Two layouts, two combiners]) and the ring's messages in it.

    Args:
        q, k, v: the rank's ``(b, c, h, d)`` shards (the whole tensors at P = 1); k, v may
            have ``h / plan.kv_ratio`` heads (Note [Fewer K/V heads]).
        plan: the rank's :class:`~ringsim.plan.RankPlan`.
        config, kernel: the configuration and the kernel that runs.
        pad: the rank's key bias ``(b, c, h_kv, 1)`` in q's dtype (Note [Key masks]), or
            None.
        dropout: attention dropout, its calls' random states recorded by the forward and
            replayed by the backward (Note [Dropout] in :mod:`ringsim.gpu.kernels.dropout`),
            or None.
        pool: where the working buffers come from (Note [The memory pool] in
            :mod:`ringsim.gpu.executor.pool`), or None: allocated per call.
    """

    def __init__(self, q, k, v, plan: RankPlan, config: DilatedConfig, kernel: Kernel,
                 pad: torch.Tensor | None = None, dropout: Dropout | None = None,
                 pool: MemoryPool | None = None) -> None:  # fmt: skip
        self.q, self.k, self.v, self.plan, self.kernel = q, k, v, plan, kernel
        self.pool = pool  # Note [The memory pool]
        self.b, self.c, self.h, self.d = q.shape
        self.pad = pad  # Note [Key masks]: (b, c, h_kv, 1) or None
        self.kv_ratio = plan.kv_ratio  # Note [Fewer K/V heads]
        # Note [Dropout]: the same calls in both passes, so the gathered-rows path
        self.dropout = active(dropout)
        general = pad is not None or plan.kv_ratio > 1 or self.dropout is not None
        self.aligned = not general and strided(config, plan)
        self.scale = config.scale(self.d)
        self.span = self.c // len(plan.chunks)  # a chunk's rows: the longest local segment
        self.widths = config.effective_segment_lengths(self.span)  # local widths W
        # Note [Strided pieces]: the pairs whose segments span chunks (blocks of pieces)
        spans = config.effective_segment_lengths(plan.seq_len)
        cut = self.aligned and len(plan.chunks) > 1
        self.spanning = frozenset(i for i, w in enumerate(spans) if cut and w > self.span)
        self.pieces = bool(self.spanning)
        self.rates = config.dilation_rates

    def buffer(self, role, shape, dtype, fill: float | None = None) -> torch.Tensor:
        """A working buffer on q's device (Note [The memory pool])."""
        return buffer(self.pool, role, shape, dtype, self.q.device, fill)

    def released(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a result the caller may keep: a copy if it is a pooled buffer (the next
        call would overwrite it), else itself."""
        if self.pool is not None and self.pool.holds(x):
            return x.clone(memory_format=torch.contiguous_format)
        return x

    def groups(self, pair: int) -> tuple[PatternGroup, ...]:
        return self.plan.groups[pair]

    # --- the ring's messages (RingParts.own_blocks, message, expected) ----------------------

    def chunk_of(self, rows: range) -> int:
        """Which chunk of the shard holds ``rows`` (global positions)."""
        return self.plan.local(rows).start // self.span

    def piece(self, blocks: torch.Tensor, chunk: int) -> torch.Tensor:
        """Blocks ``(b*S, H, m, ...)`` of a pair whose segments are whole chunks (S = the
        rank's chunks): the blocks ``(b, H, m, ...)`` of one chunk, a view."""
        return blocks.unflatten(0, (self.b, -1))[:, chunk]

    def gathered_shape(self, pair: int) -> tuple[int, int, int]:
        """``(b*S, H, m)`` of ``pair``'s gathered layout on this rank: S segments of the local
        width W, every head of the pair, ``W / r`` rows."""
        width = self.widths[pair]
        heads = sum(len(g.heads) for g in self.groups(pair))
        return self.b * (self.c // width), heads, width // self.rates[pair]

    def piece_task(self, batch: TaskBatch, task, held: dict[int, Payload]):
        """A task off the diagonal of a pair whose segments span chunks (Note [Strided
        pieces]): the local rows of its query chunk, and its piece's K and V blocks ``(b, H,
        m, d)``, every head of the pair (the gathered layout)."""
        if any(a is not BlockAction.FULL for a in batch.actions):
            raise ValueError(f"executor: a piece off the diagonal is FULL in every group: {batch}")
        block = held[task.subring.index]
        chunk = self.chunk_of(task.q_rows[0])
        keys = block[task.k_piece], block[len(block) // 2 + task.k_piece]
        rows = range(chunk * self.span, (chunk + 1) * self.span)
        return rows, chunk, tuple(gathered_blocks(x) for x in keys)

    def own_block(self, pair: int, slots: tuple[range, ...]) -> Payload:
        """The rank's own K/V block of a sub-ring of ``pair``, its rows ``slots``
        (:func:`ringsim.tasks.own_slots`): the gathered layout ``(b, m, H, d)`` of K and of
        V (aligned; one of each per piece, Note [Strided pieces]), or each slot's rows
        ``(b, H, m, d)``."""
        groups = self.groups(pair)
        if self.aligned and not self.pieces:
            return (gather_pair(self.k, groups), gather_pair(self.v, groups))
        if self.aligned:
            chunks = [self.chunk_of(slots[i]) for i in range(0, len(slots), len(groups))]
            halves = [slice(i * self.span, (i + 1) * self.span) for i in chunks]
            return tuple(gather_pair(x[:, h], groups) for x in (self.k, self.v) for h in halves)
        heads = self.plan.kv_slot_heads(pair, len(slots))
        local = [self.plan.local(rows) for rows in slots]
        tensors = (self.k, self.v) if self.pad is None else (self.k, self.v, self.pad)
        return tuple(select(x, r, h) for x in tensors for r, h in zip(local, heads))

    def kv_len(self, block: Payload) -> int:
        """How many of a block's arrays are K and V slots (the rest: their key bias, Note
        [Key masks])."""
        return len(block) if self.pad is None else 2 * len(block) // 3

    def slot_blocks(self, task, g: int, block: Payload):
        """Group g's K, V ``(b, H, m, d)`` and key bias ``(b, H, 1, m)`` (None without a mask)
        of a gathered-rows block payload (Note [Pieces] in :mod:`ringsim.plan`), one head
        per query head of the group (Note [Fewer K/V heads])."""
        kv = self.kv_len(block)
        keys, values = task.key_slots(g, kv)
        reads = self.kv_reads(self.groups(task.subring.pair)[g].heads)
        x = [block[keys], block[values]] + ([] if self.pad is None else [block[kv + keys]])
        if reads is not None:
            x = [a.index_select(1, reads) for a in x]
        bias = None if self.pad is None else x[2].transpose(-1, -2)
        return x[0], x[1], bias

    def kv_reads(self, heads: tuple[int, ...]) -> torch.Tensor | None:
        """For each query head of ``heads``, the index of the K/V head it reads among those
        a slot of theirs carries (Note [Fewer K/V heads]); None with equal heads."""
        if self.kv_ratio == 1:
            return None
        carried = kv_heads(heads, self.kv_ratio)
        reads = tuple(carried.index(h // self.kv_ratio) for h in heads)
        return heads_index(reads, self.q.device)

    def kv_sum(self, grad: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
        """``grad (b, H, m, d)`` of the query heads ``heads``, summed into the K/V heads a slot
        of theirs carries ``(b, H_kv, m, d)`` (itself with equal heads)."""
        reads = self.kv_reads(heads)
        if reads is None:
            return grad
        b, _, m, d = grad.shape
        acc = accumulator_dtype(grad.dtype)  # the query heads' sum in float32 at least
        total = grad.new_zeros(b, len(kv_heads(heads, self.kv_ratio)), m, d, dtype=acc)
        return total.index_add_(1, reads, grad.to(acc))

    def message(self, block: Payload, transfer: Transfer) -> Payload:
        """What ``transfer`` sends of a held block (or of its dK/dV): the block itself, or,
        for a ragged ring, each group's rows with pruned groups as 0 rows."""
        if self.aligned:  # one K and one V per piece; a piece is pruned whole (0 rows)
            kept = self._pieces_sent(transfer)
            if not self.pieces and not all(kept):
                raise ValueError(f"message: aligned transfer with pruned groups: {transfer}")
            return tuple(a if sent else a[:, :0] for a, sent in zip(block, kept * 2))
        copies = len(block) // len(transfer.rows)  # K, V[, bias] (Note [Key masks])
        return tuple(a if len(r) else a[:, :, :0] for a, r in zip(block, transfer.rows * copies))

    def _pieces_sent(self, transfer: Transfer) -> list[bool]:
        """Whether each piece of an aligned transfer has rows (its groups are pruned alike)."""
        groups = len(self.groups(transfer.subring.pair))
        return [bool(transfer.rows[i]) for i in range(0, len(transfer.rows), groups)]

    def expected(self, transfer: Transfer) -> Recv:
        """The receive of ``transfer`` (q's dtype; the backward relay changes the dtype)."""
        groups = self.groups(transfer.subring.pair)
        if self.aligned:  # the gathered layout, one K and one V per piece
            heads, step = sum(len(g.heads) for g in groups), len(groups)
            rows = (len(transfer.rows[i]) for i in range(0, len(transfer.rows), step))
            shapes = tuple((self.b, m, heads, self.d) for m in rows) * 2
        else:
            heads = self.plan.kv_slot_heads(transfer.subring.pair, len(transfer.rows))
            slots = tuple(zip(transfer.rows, heads))
            shapes = tuple((self.b, len(h), len(r), self.d) for r, h in slots) * 2
            if self.pad is not None:  # each slot's key bias (Note [Key masks])
                shapes += tuple((self.b, len(h), len(r), 1) for r, h in slots)
        return Recv(transfer.send_rank, transfer.subring.tag, shapes, self.q.dtype)

    # --- the blocks of one batch ------------------------------------------------------------

    def layout_of(self, batch: TaskBatch) -> tuple[int, int, int]:
        """``(width, segments, rows)`` of an aligned batch: local width W, ``c / W`` segments
        of ``W / r`` rows each."""
        width = self.widths[batch.pair]
        return width, self.c // width, width // self.rates[batch.pair]

    def causal(self, batch: TaskBatch) -> bool:
        """Whether the batch's blocks are the causal diagonal. Groups of one task differ
        only where a group has no row (SKIP) or a single row (FULL: its diagonal), which the
        causal kernel runs alike; no plan of the contiguous layout makes a MASKED block."""
        if BlockAction.MASKED in batch.actions:
            raise ValueError(f"executor: no kernel call takes a MASKED block: {batch}")
        return BlockAction.CAUSAL in batch.actions

    def key_blocks(self, batch: TaskBatch, held: dict[int, Payload], g: int | None,
                   chosen=None):  # fmt: skip
        """K and V blocks ``(b*S, H, m, d)`` of group g of an aligned batch (None: every head
        of the pair, or of the groups ``chosen`` for an own batch, gathered): views of the
        rank's own k, v (gathered: views where :meth:`views` says so, else copies), or of the
        gathered block received."""
        groups = self.groups(batch.pair)
        if batch.own:
            if g is None:
                return tuple(self.gathered(x, chosen or groups) for x in (self.k, self.v))
            return tuple(group_blocks(x, groups[g], self.span) for x in (self.k, self.v))
        block = held[batch.tasks[0].subring.index]
        heads = None if g is None else head_slices(groups)[g]
        return tuple(gathered_blocks(x, heads) for x in block)

    def gathered(self, x: torch.Tensor, groups, rows: range | None = None) -> torch.Tensor:
        """``x (b, c, h[, d])`` -> the gathered blocks ``(b*S, H, m[, d])`` of the pair's
        ``groups`` (among ``rows``: one chunk of a zigzag shard; segments of the local width
        W, Note [Strided pieces]): kernel inputs, so a strided view where one serves."""
        if x.dim() == 3:
            return self.gathered(x[..., None], groups, rows)[..., 0]
        return gathered_blocks(gather_pair(x, groups, rows, length=self.span, strided=True))

    def views(self, batch: TaskBatch, groups, split: bool = False):
        """The head sets of a pair whose gathered layout :meth:`gathered` reads as strided
        views of the rank's q (and k, v for its own block), copying nothing
        (:func:`~ringsim.gpu.executor.layout.pair_view`): every head at once (one head per
        pattern group), or, with ``split`` and an own batch, slices of one head per group
        taken where groups have fewer heads than there are groups (h/r calls instead of r);
        None if neither, or for a single group (whose views serve as they are). Asked for
        every aligned batch, so k and v are looked at only where their layout differs from
        q's (the view depends on shape and strides alone)."""
        if len(groups) < 2:
            return None
        layout = (self.q.shape, self.q.stride())
        own = (self.k, self.v) if batch.own else ()
        tensors = (self.q, *(x for x in own if (x.shape, x.stride()) != layout))

        def viewed(chosen) -> bool:
            return all(pair_view(x, chosen, None, self.span) is not None for x in tensors)

        if viewed(groups):
            return (groups,)
        sizes = {len(g.heads) for g in groups}
        if not (split and batch.own and len(sizes) == 1 and sizes.pop() < len(groups)):
            return None
        slices = tuple(
            tuple(replace(g, heads=(g.heads[u],)) for g in groups)
            for u in range(len(groups[0].heads))
        )
        return slices if all(viewed(chosen) for chosen in slices) else None
