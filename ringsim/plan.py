"""The ring plan: who sends which rows to whom at which step, and what each block needs.

Everything here is a pure function of ``(config, num_heads, seq_len, world_size, layout)``,
built from global positions, and tested as tables without any communication. Every backend
(the NumPy ring, the torch ring) executes the same plan.

Note [The ring of one segment]
------------------------------
Rank j holds the chunks of positions its layout gives it (:mod:`ringsim.layout`; contiguous:
``[j*c, (j+1)*c)``). A segment ``[start, stop)`` of pair i meets the chunks of some ranks;
those ranks form the segment's *sub-ring* (spec §5), ordered by the first position each
holds in the segment (contiguous: consecutive ranks). With the sub-ring's places 0..g-1,
at step t the rank at place a holds the block of place ``(a - t) mod g``: its own rows at
step 0, then each block moves one place per step::

    step 0:  place 0 holds B0   place 1 holds B1   place 2 holds B2
    step 1:  place 0 holds B2   place 1 holds B0   place 2 holds B1     (B0: 0 -> 1, ...)
    step 2:  place 0 holds B1   place 1 holds B2   place 2 holds B0

A block carries only the rows its pattern selects, for each pattern group (offset) of the
pair, so one message per step and sub-ring carries every head of the pair.

Causal pruning: a block is sent one more place only while some place further along its path
still attends to it. Across ranks, keys lie wholly before (FULL) or wholly after (SKIP) the
queries, so with the contiguous layout a block of place s is useful at places s+1..g-1 and
useless after the wrap: place a sends a+1 blocks when a < g-1 (spec §5). The pruning is per
pattern group and piece: a group whose rows no later place attends to travels as 0 rows,
and a message with no rows at all is not sent.

Note [Pieces]
-------------
A rank whose layout gives it several chunks (zigzag: two) may hold several *pieces* of one
segment: the parts of its chunks inside the segment, in the order of its shard. A block is
then made of pieces, and a message carries ``slots``: piece 0's K rows of every pattern
group, piece 1's, ..., then the V rows in the same order (``Transfer.rows[i]``: piece
``i // G``, group ``i % G``). A task attends one piece of the rank's queries to one piece of
the block (``Task.q_piece``, ``Task.k_piece``), so every task's rows are one range of global
positions inside one chunk: two different pieces never interleave, so their blocks are FULL
or SKIP, and a piece against itself is the causal diagonal. With one chunk per rank there is
one piece, slot g is group g, and the plan is the contiguous plan it always was.

Backward (``returns``): the gradients dK/dV of a block travel with it and, once the block
stops (per pattern group, at its last useful place), go straight back to its owner: one
*return* transfer per block and stopping place. Non-causal, the last place is the owner's
ring neighbour; causal, every block stops at place g-1. Groups that never leave their
owner "return" at step 0 from the owner to itself: nothing is sent, the owner adds them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ringsim.config import DilatedConfig, PatternGroup, selected_range
from ringsim.layout import Layout, check_layout, local_rows, rank_chunks
from ringsim.tasks import (
    BlockAction,
    SubRing,
    Task,
    TaskBatch,
    Transfer,
    block_action,
    slot_heads,
    step_batches,
    subring_ranks,
)


@dataclass(frozen=True)
class RankStep:
    """What one rank does at one step: post ``sends`` and ``recvs``, then run ``tasks``
    (``batches``: the same tasks as a backend runs them, :func:`step_batches`)."""

    step: int
    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]
    tasks: tuple[Task, ...]
    batches: tuple[TaskBatch, ...] = ()


@dataclass(frozen=True)
class RankPlan:
    """The whole schedule of one rank; ``groups[pair]`` are that pair's pattern groups.

    ``returns`` (backward only) are the return transfers this rank sends or receives: at the
    end of step ``t.step``, ``t.send_rank`` sends the dK/dV of ``t.source_rank``'s block,
    for the groups with rows in ``t.rows``, back to their owner ``t.recv_rank`` (at step 0
    sender and owner are one rank: the groups that never leave it, added in place).
    """

    rank: int
    world_size: int
    seq_len: int
    groups: tuple[tuple[PatternGroup, ...], ...]
    steps: tuple[RankStep, ...]
    returns: tuple[Transfer, ...] = ()
    layout: Layout = Layout.CONTIGUOUS
    kv_ratio: int = 1  # query heads per K/V head (grouped-query attention, spec §1)

    def kv_slot_heads(self, pair: int, slots: int) -> tuple[tuple[int, ...], ...]:
        """The K/V heads each of ``slots`` slots of a block of ``pair`` carries: those its
        group's query heads read, each once (:func:`ringsim.tasks.slot_heads`)."""
        return slot_heads(self.groups[pair], slots, self.kv_ratio)

    @functools.cached_property
    def chunks(self) -> tuple[range, ...]:
        """The global positions this rank holds, chunk by chunk, in its shard's order."""
        return rank_chunks(self.layout, self.rank, self.seq_len, self.world_size)

    def local(self, rows: range) -> range:
        """Global ``rows`` inside one of this rank's chunks as indices into its shard."""
        return local_rows(self.chunks, rows)

    def returns_at(self, step: int) -> tuple[Transfer, ...]:
        """The return transfers of ``step`` (backward)."""
        return self._returns_by_step.get(step, ())

    @functools.cached_property
    def _returns_by_step(self) -> dict[int, tuple[Transfer, ...]]:
        by_step: dict[int, list[Transfer]] = {}
        for t in self.returns:
            by_step.setdefault(t.step, []).append(t)
        return {step: tuple(ts) for step, ts in by_step.items()}

    @functools.cached_property
    def pair_last_steps(self) -> dict[int, int]:
        """The last step at which this rank attends each pair (absent: never)."""
        return {b.pair: i for i, step in enumerate(self.steps) for b in step.batches}

    @functools.cached_property
    def multi_step_pairs(self) -> frozenset[int]:
        """The pairs this rank attends at more than one step (their blocks travel)."""
        first: dict[int, int] = {}
        for i, step in enumerate(self.steps):
            for b in step.batches:
                first.setdefault(b.pair, i)
        return frozenset(p for p, last in self.pair_last_steps.items() if last != first[p])

    @functools.cached_property
    def multi_batch_pairs(self) -> frozenset[int]:
        """The pairs this rank attends in more than one batch, at one step or several."""
        counts: dict[int, int] = {}
        for step in self.steps:
            for b in step.batches:
                counts[b.pair] = counts.get(b.pair, 0) + 1
        return frozenset(p for p, count in counts.items() if count > 1)

    @functools.cached_property
    def shared_pairs(self) -> frozenset[int]:
        """The pairs of which this rank attends a sub-ring of several ranks: blocks of theirs
        travel (to this rank, or from it and their dK/dV back)."""
        return frozenset(t.subring.pair for s in self.steps for t in s.tasks if t.subring.size > 1)

    @functools.cached_property
    def last_busy_step(self) -> int:
        """The index of the last step with a task to run (-1: none)."""
        return max((i for i, s in enumerate(self.steps) if s.batches), default=-1)


@functools.lru_cache(maxsize=256)
def pair_groups(config: DilatedConfig, num_heads: int) -> tuple[tuple[PatternGroup, ...], ...]:
    """Pattern groups of each pair, in the order messages carry them (cached: the torch
    forward asks for them at every call)."""
    groups = config.pattern_groups(num_heads)
    return tuple(tuple(g for g in groups if g.pair == i) for i in range(config.num_pairs))


def rank_subrings(
    config: DilatedConfig,
    seq_len: int,
    world_size: int,
    rank: int,
    layout: Layout | str = Layout.CONTIGUOUS,
) -> tuple[SubRing, ...]:
    """The sub-rings (every pair, every segment) that ``rank`` belongs to, in plan order."""
    chunks = rank_chunks(layout, rank, seq_len, world_size)
    out, first_index = [], 0
    for pair, w_eff in enumerate(config.effective_segment_lengths(seq_len)):
        segments = sorted(
            {s for ch in chunks for s in range(ch.start // w_eff, (ch.stop - 1) // w_eff + 1)}
        )
        for segment in segments:
            start, stop = segment * w_eff, min((segment + 1) * w_eff, seq_len)
            ranks = subring_ranks(start, stop, seq_len, world_size, layout)
            out.append(SubRing(first_index + segment, pair, segment, start, stop, ranks))
        first_index += -(-seq_len // w_eff)  # segments of this pair
    return tuple(out)


def _block_rows(
    subring: SubRing,
    groups: tuple[PatternGroup, ...],
    seq_len: int,
    world_size: int,
    layout: Layout,
) -> list[list[tuple[range, ...]]]:
    """``rows[place][piece][g]``: group g's selected positions in each piece of each place
    (Note [Pieces])."""
    rows = []
    for rank in subring.ranks:
        pieces = []
        for chunk in rank_chunks(layout, rank, seq_len, world_size):
            lo, hi = max(chunk.start, subring.start), min(chunk.stop, subring.stop)
            if lo < hi:
                pieces.append(
                    tuple(selected_range(g.pattern, subring.start, lo, hi) for g in groups)
                )
        rows.append(pieces)
    return rows


#: One rank's part of a sub-ring's schedule: the transfers it sends, those it receives, its
#: tasks and the return transfers it sends or receives, each in the schedule's order.
RankPart = tuple[tuple[Transfer, ...], tuple[Transfer, ...], tuple[Task, ...], tuple[Transfer, ...]]
_NOTHING: RankPart = ((), (), (), ())


@functools.lru_cache(maxsize=4096)
def _subring_schedule(
    subring: SubRing,
    groups: tuple[PatternGroup, ...],
    is_causal: bool,
    seq_len: int,
    world_size: int,
    layout: Layout,
) -> dict[int, RankPart]:
    """Every transfer, task and return transfer of one sub-ring, by rank: built once for all
    the sub-ring's ranks (cached), so that P ranks of a sub-ring spanning all of them cost
    O(P^2) together, not O(P^3)."""
    g = subring.size
    rows = _block_rows(subring, groups, seq_len, world_size, layout)
    transfers, tasks, returns = [], [], []
    for source in range(g):
        k_pieces = rows[source]
        slots = [k for piece in k_pieces for k in piece]  # (piece, group), Note [Pieces]
        # actions[h][qi][ki][gi]: what query piece qi of the place h hops further along
        # needs from piece ki of this block, per group
        actions = [
            [
                [tuple(block_action(q, k, is_causal) for q, k in zip(qp, kp)) for kp in k_pieces]
                for qp in rows[(source + h) % g]
            ]
            for h in range(g)
        ]
        # the last hop at which each slot is still useful (0: never sent)
        last_hop = [
            max(
                (
                    h
                    for h in range(1, g)
                    if any(a[ki][gi] is not BlockAction.SKIP for a in actions[h])
                ),
                default=0,
            )
            for ki in range(len(k_pieces))
            for gi in range(len(groups))
        ]
        for h in range(g):
            dest = (source + h) % g
            if h > 0 and h <= max(last_hop, default=0):
                sent = tuple(
                    k if last_hop[i] >= h else range(k.start, k.start) for i, k in enumerate(slots)
                )
                transfers.append(
                    Transfer(
                        h,
                        subring,
                        subring.rank_at(source),
                        subring.rank_at(dest - 1),
                        subring.rank_at(dest),
                        sent,
                    )
                )
            for qi, q_rows in enumerate(rows[dest]):
                for ki, k_rows in enumerate(k_pieces):
                    tasks.append(
                        Task(
                            h,
                            subring.rank_at(dest),
                            subring,
                            subring.rank_at(source),
                            q_rows,
                            k_rows,
                            actions[h][qi][ki],
                            qi,
                            ki,
                        )
                    )
        for h in range(g):  # backward: each slot's dK/dV goes home from its last place
            back = tuple(k if last_hop[i] == h else k[:0] for i, k in enumerate(slots))
            if any(back):
                owner, holder = subring.rank_at(source), subring.rank_at(source + h)
                returns.append(Transfer(h, subring, owner, holder, owner, back))
    parts: dict[int, tuple[list, list, list, list]] = {}

    def part(rank: int) -> tuple[list, list, list, list]:
        return parts.setdefault(rank, ([], [], [], []))

    for t in transfers:
        part(t.send_rank)[0].append(t)
        part(t.recv_rank)[1].append(t)
    for task in tasks:
        part(task.rank)[2].append(task)
    for t in returns:
        for rank in dict.fromkeys((t.send_rank, t.recv_rank)):  # once if it never left
            part(rank)[3].append(t)
    return {rank: tuple(tuple(x) for x in lists) for rank, lists in parts.items()}


@functools.lru_cache(maxsize=64)
def rank_plan(
    config: DilatedConfig,
    num_heads: int,
    seq_len: int,
    world_size: int,
    rank: int,
    layout: Layout | str = Layout.CONTIGUOUS,
    kv_ratio: int = 1,
) -> RankPlan:
    """The schedule of one rank: its transfers and tasks, step by step (cached: the torch
    ring asks for it at every call). ``layout``: which positions each rank holds
    (:mod:`ringsim.layout`; ``seq_len`` must cut into its chunks); ``kv_ratio``: query heads
    per K/V head, which sets the heads each message carries."""
    layout = check_layout(layout, seq_len, world_size)
    groups = pair_groups(config, num_heads)
    sends: dict[int, list[Transfer]] = {}
    recvs: dict[int, list[Transfer]] = {}
    tasks: dict[int, list[Task]] = {}
    returns: list[Transfer] = []
    for subring in rank_subrings(config, seq_len, world_size, rank, layout):
        schedule = _subring_schedule(
            subring, groups[subring.pair], config.is_causal, seq_len, world_size, layout
        )
        my_sends, my_recvs, my_tasks, my_returns = schedule.get(rank, _NOTHING)
        returns.extend(my_returns)
        for t in my_sends:
            sends.setdefault(t.step, []).append(t)
        for t in my_recvs:
            recvs.setdefault(t.step, []).append(t)
        for task in my_tasks:
            tasks.setdefault(task.step, []).append(task)
    num_steps = max((*tasks, *sends, *recvs), default=-1) + 1  # a rank may only forward
    steps = tuple(
        RankStep(
            t,
            tuple(sends.get(t, ())),
            tuple(recvs.get(t, ())),
            tuple(tasks.get(t, ())),
            step_batches(tuple(tasks.get(t, ()))),
        )
        for t in range(num_steps)
    )
    return RankPlan(rank, world_size, seq_len, groups, steps, tuple(returns), layout, kv_ratio)


def clear_plan_caches() -> None:
    """Forget every cached plan (for code that changes what the plan's functions return, such
    as the mutant tests)."""
    rank_plan.cache_clear()
    _subring_schedule.cache_clear()
    pair_groups.cache_clear()


def ring_plan(
    config: DilatedConfig,
    num_heads: int,
    seq_len: int,
    world_size: int,
    layout: Layout | str = Layout.CONTIGUOUS,
) -> tuple[RankPlan, ...]:
    """Every rank's plan (for tests, the trace and figures; a rank only needs its own)."""
    return tuple(
        rank_plan(config, num_heads, seq_len, world_size, rank, layout)
        for rank in range(world_size)
    )
