"""What one rank does at one step of the ring: the vocabulary of the plan.

Pure values and functions of global positions (no communication, no arrays): the action a
block needs (:class:`BlockAction`), the ranks that share a segment (:class:`SubRing`), one
message (:class:`Transfer`), one block attended (:class:`Task`) and the tasks a backend runs
together (:class:`TaskBatch`, :func:`step_batches`). :mod:`ringsim.plan` builds them into
each rank's schedule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from ringsim.config import PatternGroup, kv_heads, positions
from ringsim.layout import Layout, chunk_length, chunk_owner


class BlockAction(Enum):
    """What one block of keys needs against one rank's queries."""

    FULL = "full"  # every query attends every key
    CAUSAL = "causal"  # the diagonal block: same rows, lower triangle
    MASKED = "masked"  # keys and queries interleave some other way: mask by positions
    SKIP = "skip"  # no query attends any key (or one side is empty)


def block_action(q_rows: range, k_rows: range, is_causal: bool) -> BlockAction:
    """The action for queries at ``q_rows`` against keys at ``k_rows`` (global positions)."""
    if len(q_rows) == 0 or len(k_rows) == 0:
        return BlockAction.SKIP
    if not is_causal or k_rows[-1] <= q_rows[0]:
        return BlockAction.FULL
    if k_rows[0] > q_rows[-1]:
        return BlockAction.SKIP
    return BlockAction.CAUSAL if q_rows == k_rows else BlockAction.MASKED


def score_pairs(q_rows: range, k_rows: range, action: BlockAction) -> int:
    """How many (query, key) scores one head computes for ``action`` on these rows: all of
    them (FULL), none (SKIP), or those whose key is at or before the query."""
    if action is BlockAction.SKIP:
        return 0
    if action is BlockAction.FULL:
        return len(q_rows) * len(k_rows)
    return int(np.searchsorted(positions(k_rows), positions(q_rows), side="right").sum())


def subring_ranks(
    start: int, stop: int, seq_len: int, world_size: int, layout: Layout | str = "contiguous"
) -> tuple[int, ...]:
    """The ranks whose chunks meet the segment ``[start, stop)``, in the order of the first
    position each holds in it (the contiguous layout: consecutive ranks, ascending)."""
    s = chunk_length(layout, seq_len, world_size)
    chunks = range(start // s, (stop - 1) // s + 1)  # ascending: first positions first
    return tuple(dict.fromkeys(chunk_owner(layout, i, world_size) for i in chunks))


def slot_heads(
    groups: Sequence[PatternGroup], slots: int, kv_ratio: int = 1
) -> tuple[tuple[int, ...], ...]:
    """The K/V heads of each of ``slots`` slots of a block of a pair with ``groups``: slot i
    carries group ``i % G`` (Note [Pieces] in :mod:`ringsim.plan`), once per K/V head its
    query heads read (``kv_ratio`` query heads per K/V head; 1: the group's own heads)."""
    if kv_ratio == 1:  # the group's heads as they are (the torch ring asks at every step)
        return tuple(groups[i % len(groups)].heads for i in range(slots))
    return tuple(kv_heads(groups[i % len(groups)].heads, kv_ratio) for i in range(slots))


@dataclass(frozen=True)
class SubRing:
    """The ranks that share one segment of one pair; ``index`` is unique in the plan."""

    index: int
    pair: int
    segment: int
    start: int
    stop: int
    ranks: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def tag(self) -> int:
        """The message tag of this sub-ring's K/V transfers (MPI guarantees tags < 32768)."""
        return self.index % 16384

    @property
    def grad_tag(self) -> int:
        """The message tag of this sub-ring's dK/dV transfers (backward)."""
        return 16384 + self.index % 16384

    def place(self, rank: int) -> int:
        return self.ranks.index(rank)

    def rank_at(self, place: int) -> int:
        return self.ranks[place % self.size]


@dataclass(frozen=True)
class Transfer:
    """One message: ``send_rank`` passes ``source_rank``'s block to ``recv_rank`` at ``step``.

    ``rows[i]`` are the global positions of the K/V rows of slot i of the message: piece
    ``i // G`` of the block, pattern group ``i % G`` (G groups; an empty range where the
    group is pruned; Note [Pieces] in :mod:`ringsim.plan`).
    """

    step: int
    subring: SubRing
    source_rank: int
    send_rank: int
    recv_rank: int
    rows: tuple[range, ...]


def which_transfer(transfers: Sequence[Transfer], source: int, tag: int, what: str) -> str:
    """``'the K/V block of sub-ring 1 (pair 0) that rank 2 owns'``: the transfer among
    ``transfers`` that ``source`` sent with ``tag`` (forward or gradient tag), for an error
    about that message; ``what`` names the payload."""
    for t in transfers:
        if t.send_rank == source and tag in (t.subring.tag, t.subring.grad_tag):
            return (
                f"the {what} of sub-ring {t.subring.index} (pair {t.subring.pair}) that rank "
                f"{t.source_rank} owns"
            )
    return f"a message from rank {source} with tag {tag} that the plan does not have"


@dataclass(frozen=True)
class Task:
    """At ``step``, ``rank`` attends its queries to ``source_rank``'s block of ``subring``.

    Per pattern group g: the query rows ``q_rows[g]``, key rows ``k_rows[g]`` and the action;
    the query rows lie in piece ``q_piece`` of the rank's block, the key rows in piece
    ``k_piece`` of the source's (Note [Pieces] in :mod:`ringsim.plan`; always 0 with the
    contiguous layout).
    """

    step: int
    rank: int
    subring: SubRing
    source_rank: int
    q_rows: tuple[range, ...]
    k_rows: tuple[range, ...]
    actions: tuple[BlockAction, ...]
    q_piece: int = 0
    k_piece: int = 0

    @property
    def skipped(self) -> bool:
        return all(a is BlockAction.SKIP for a in self.actions)

    @property
    def diagonal(self) -> bool:
        """The rank's own rows against themselves (its own block, the same piece)."""
        return self.source_rank == self.rank and self.q_piece == self.k_piece

    def key_slots(self, g: int, block_len: int) -> tuple[int, int]:
        """Where group g's K and V rows are in a block payload of ``block_len`` arrays
        (Note [Pieces] in :mod:`ringsim.plan`)."""
        half = block_len // 2
        slot = self.k_piece * len(self.k_rows) + g
        return slot, half + slot


def own_slots(tasks: Iterable[Task], rank: int) -> dict[int, tuple[int, tuple[range, ...]]]:
    """Sub-ring index -> ``(pair, slots)`` of the blocks ``rank`` cuts from its own shard
    among ``tasks``: the K/V rows of every piece and group, piece by piece (Note [Pieces] in
    :mod:`ringsim.plan`), as a message carries them."""
    pieces: dict[int, dict[int, Task]] = {}
    for task in tasks:
        if task.source_rank == rank:
            pieces.setdefault(task.subring.index, {}).setdefault(task.k_piece, task)
    return {
        index: (
            next(iter(by_piece.values())).subring.pair,
            tuple(rows for piece in sorted(by_piece) for rows in by_piece[piece].k_rows),
        )
        for index, by_piece in pieces.items()
    }


@dataclass(frozen=True, eq=False)
class TaskBatch:
    """Tasks of one pair at one step that a backend runs together: the same action and
    the same numbers of query and key rows in every pattern group, and all of them on
    the rank's own rows against themselves (:attr:`Task.diagonal`) or none. Segments become
    the batch dimension of one kernel call per pattern group (:func:`step_batches`).

    Compared by identity (plans are cached, so a backend may key what it derives from a
    batch by the batch itself).
    """

    pair: int
    actions: tuple[BlockAction, ...]
    own: bool  # every task is diagonal: the rank's own rows against themselves (step 0)
    tasks: tuple[Task, ...]

    @property
    def q_counts(self) -> tuple[int, ...]:
        """Query rows of each pattern group in each task."""
        return tuple(len(r) for r in self.tasks[0].q_rows)


def step_batches(tasks: tuple[Task, ...]) -> tuple[TaskBatch, ...]:
    """The tasks of one step grouped into batches (skipped tasks are in none), in the order
    of their first task: tasks of one pair with equal actions, equal row counts per pattern
    group, and all or none diagonal."""
    batches: dict[tuple, list[Task]] = {}
    for task in tasks:
        if task.skipped:
            continue
        key = (
            task.subring.pair,
            task.actions,
            task.diagonal,
            tuple(len(r) for r in task.q_rows),
            tuple(len(r) for r in task.k_rows),
        )
        batches.setdefault(key, []).append(task)
    return tuple(
        TaskBatch(pair, actions, own, tuple(batch))
        for (pair, actions, own, _, _), batch in batches.items()
    )
