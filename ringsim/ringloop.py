"""The one ring loop every backend runs: the plan's steps, with overlap, traced.

A backend plugs in its :class:`RingParts` (how to cut its own blocks, what a message carries,
what a receive expects, how to attend and merge the blocks of one step); the loop does the
rest, the same way for NumPy and torch, the simulated cluster, MPI and torch.distributed:

1. step 0: each sub-ring's own block is cut from the rank's K/V shard (a backend that
   attends its own rows in place cuts only the blocks it sends);
2. every step: wait for the blocks posted at the previous step; post the next step's
   exchange at once, so it overlaps the compute; hand the whole step to the backend, which
   attends the rank's queries to every block held and merges; drop the blocks (a sent
   block is the communicator's until the exchange completes).

Every send, receive, compute, merge and skip is recorded in the rank's trace, with the bytes
of arrays held (the memory meter).
"""

from __future__ import annotations

import math
from typing import Protocol

from ringsim.comm.base import Communicator, Payload, Recv, Request, Send, payload_nbytes
from ringsim.comm.checksum import CorruptMessage
from ringsim.gradrelay import GradRelay
from ringsim.plan import BlockAction, RankPlan, RankStep, Task, Transfer
from ringsim.tasks import own_slots, score_pairs, which_transfer
from ringsim.trace import Event, RankTrace, TraceAction


class RingParts(Protocol):
    """A backend's pieces of the ring. A backend is handed a whole step: the NumPy
    reference runs it task by task (:class:`TaskParts`), the torch executor one batch of
    tasks at a time (:attr:`ringsim.plan.RankStep.batches`)."""

    def own_blocks(self, step: RankStep) -> dict[int, Payload]:
        """The blocks of the step's sub-rings that this rank cuts from its own shard, by
        sub-ring index (a backend that attends its own rows in place need cut only those
        it sends)."""
        ...

    def message(self, block: Payload, transfer: Transfer) -> Payload:
        """What ``transfer`` sends of a held block (pruned groups as 0 rows)."""
        ...

    def expected(self, transfer: Transfer) -> Recv:
        """The receive of ``transfer``: shapes and dtype from the plan."""
        ...

    def attend(self, step: RankStep, held: dict[int, Payload]) -> dict[int, Payload | None]:
        """Attend the rank's queries to every block of ``step`` and merge into the running
        state. Returns, in the backward pass, each held block's share of dK/dV (None for a
        block held but not attended; :mod:`ringsim.gradrelay`); ``{}`` in the forward."""
        ...


class TaskParts:
    """``own_blocks`` and ``attend`` of :class:`RingParts` one task at a time, for a backend
    that defines ``own_block(pair, slots)`` and ``attend_task(block, task)`` (and has
    ``plan``)."""

    plan: RankPlan

    def own_block(self, pair: int, slots: tuple[range, ...]) -> Payload:
        """The block of the rank's own rows ``slots`` (:func:`ringsim.tasks.own_slots`)."""
        raise NotImplementedError

    def attend_task(self, block: Payload, task: Task) -> Payload | None:
        raise NotImplementedError

    def own_blocks(self, step: RankStep) -> dict[int, Payload]:
        return {
            index: self.own_block(pair, slots)
            for index, (pair, slots) in own_slots(step.tasks, self.plan.rank).items()
        }

    def attend(self, step: RankStep, held: dict[int, Payload]) -> dict[int, Payload | None]:
        shares: dict[int, Payload | None] = {}
        for task in step.tasks:
            index = task.subring.index
            if task.skipped:
                if index in held:  # a skipped block may still move on
                    shares.setdefault(index, None)
                continue
            share, before = self.attend_task(held[index], task), shares.get(index)
            # several pieces of one block (Note [Pieces]): their shares add up
            shares[index] = share if before is None else tuple(a + b for a, b in zip(before, share))
        return shares


def recv_nbytes(recv: Recv, itemsize: int) -> int:
    """Bytes a receive will hold (``itemsize`` given: a torch dtype is no NumPy dtype)."""
    return sum(math.prod(shape) for shape in recv.shapes) * itemsize


def _post(
    comm: Communicator,
    step: RankStep,
    held: dict[int, Payload],
    plan: RankPlan,
    parts: RingParts,
    trace: RankTrace | None,
    recvs: list[Recv],
) -> Request:
    sends = []
    for t in step.sends:
        payload = parts.message(held[t.subring.index], t)
        sends.append(Send(t.recv_rank, t.subring.tag, payload))
        if trace is not None:
            trace.add(
                Event(
                    step.step,
                    plan.rank,
                    TraceAction.SEND,
                    t.recv_rank,
                    payload_nbytes(payload),
                    t.subring.pair,
                    t.subring.index,
                    t.source_rank,
                    t.rows,
                )
            )
    return comm.start(sends, recvs)


def _arrived(pending: Request, step: RankStep, what: str) -> list[Payload]:
    """``pending.wait()``; a corrupted message's error names the step and the sub-ring."""
    try:
        return pending.wait()
    except CorruptMessage as error:
        block = which_transfer(step.recvs, error.source, error.tag, what)
        raise error.located(f"step {step.step}: {block}") from error


def _record_task(task: Task, plan: RankPlan, trace: RankTrace) -> None:
    rank, groups = plan.rank, plan.groups[task.subring.pair]
    base = dict(
        step=task.step,
        rank=rank,
        pair=task.subring.pair,
        subring=task.subring.index,
        source_rank=task.source_rank,
        detail=",".join(a.value for a in task.actions),
    )
    if task.skipped:
        trace.add(Event(action=TraceAction.SKIP, **base))
        return
    attended = tuple(q for q, a in zip(task.q_rows, task.actions) if a is not BlockAction.SKIP)
    pairs = sum(
        len(group.heads) * score_pairs(q, k, a)
        for group, q, k, a in zip(groups, task.q_rows, task.k_rows, task.actions)
    )
    trace.add(Event(action=TraceAction.COMPUTE, rows=attended, pairs=pairs, **base))
    trace.add(Event(action=TraceAction.MERGE, **base))


def run_ring(
    comm: Communicator,
    plan: RankPlan,
    parts: RingParts,
    trace: RankTrace | None,
    itemsize: int,
    relay: GradRelay | None = None,
) -> None:
    """Execute ``plan`` on this rank; ``parts.attend`` accumulates the result.

    With a ``relay`` (the backward pass), the dK/dV shares ``parts.attend`` returns travel
    with their blocks and back to their owners (:mod:`ringsim.gradrelay`). ``trace`` None
    records nothing (the torch ring's default: no host work per task).
    """
    hold = trace.hold if trace is not None else (lambda name, nbytes: None)
    held: dict[int, Payload] = {}  # sub-ring index -> the block this rank holds this step
    pending: Request | None = None
    for index, step in enumerate(plan.steps):
        if pending is not None:  # 2a. the blocks posted at the previous step
            hold("in flight", 0)
            for t, payload in zip(step.recvs, _arrived(pending, step, "K/V block")):
                held[t.subring.index] = payload
                if trace is not None:
                    trace.add(
                        Event(
                            step.step,
                            plan.rank,
                            TraceAction.RECV,
                            t.send_rank,
                            payload_nbytes(payload),
                            t.subring.pair,
                            t.subring.index,
                            t.source_rank,
                            t.rows,
                        )
                    )
        held.update(parts.own_blocks(step))  # 1. step 0: the rank's own rows of each sub-ring
        if trace is not None:
            hold("blocks held", sum(payload_nbytes(p) for p in held.values()))
        pending = None
        if index + 1 < len(plan.steps):  # 2b. overlap: post the next exchange first
            nxt = plan.steps[index + 1]
            recvs = [parts.expected(t) for t in nxt.recvs]
            pending = _post(comm, nxt, held, plan, parts, trace, recvs)
            hold("in flight", sum(recv_nbytes(r, itemsize) for r in recvs))
        shares = parts.attend(step, held)  # 2c. attend and merge, the whole step
        if trace is not None:
            for task in step.tasks:
                _record_task(task, plan, trace)
        if relay is not None:  # 2d. backward: dK/dV on and home
            relay.after_step(index, held, shares)
        held.clear()  # sent blocks were copied when posted; nothing else needs them
        hold("blocks held", 0)
    if relay is not None:
        relay.finish()
