"""The one ring loop every backend runs: the plan's steps, with overlap, traced.

A backend plugs in its :class:`RingParts` (how to cut its own block, what a message carries,
what a receive expects, how to attend and merge one block); the loop does the rest, the same
way for NumPy and torch, the simulated cluster, MPI and torch.distributed:

1. step 0: each sub-ring's own block is cut from the rank's K/V shard;
2. every step: wait for the blocks posted at the previous step; post the next step's
   exchange at once, so it overlaps the compute; attend the rank's queries to each block
   held and merge; drop the blocks (sends were copied or packed when posted).

Every send, receive, compute, merge and skip is recorded in the rank's trace, with the bytes
of arrays held (the memory meter).
"""

from __future__ import annotations

import math
from typing import Protocol

from ringsim.comm.base import Communicator, Payload, Recv, Request, Send, payload_nbytes
from ringsim.gradrelay import GradRelay
from ringsim.plan import BlockAction, RankPlan, RankStep, Task, Transfer
from ringsim.trace import Event, RankTrace, TraceAction


class RingParts(Protocol):
    """A backend's pieces of the ring."""

    def own_block(self, task: Task) -> Payload:
        """This rank's K/V rows of ``task``'s sub-ring: ``(K_g0.., V_g0..)``."""
        ...

    def message(self, block: Payload, transfer: Transfer) -> Payload:
        """What ``transfer`` sends of a held block (pruned groups as 0 rows)."""
        ...

    def expected(self, transfer: Transfer) -> Recv:
        """The receive of ``transfer``: shapes and dtype from the plan."""
        ...

    def attend(self, block: Payload, task: Task) -> Payload | None:
        """Attend the rank's queries to ``block`` and merge into the running state.

        In the backward pass: the block backward, which adds to dq and returns the block's
        share of dK/dV (:mod:`ringsim.gradrelay`)."""
        ...


def recv_nbytes(recv: Recv, itemsize: int) -> int:
    """Bytes a receive will hold (``itemsize`` given: a torch dtype is no NumPy dtype)."""
    return sum(math.prod(shape) for shape in recv.shapes) * itemsize


def _post(
    comm: Communicator,
    step: RankStep,
    held: dict[int, Payload],
    plan: RankPlan,
    parts: RingParts,
    trace: RankTrace,
) -> Request:
    sends = []
    for t in step.sends:
        payload = parts.message(held[t.subring.index], t)
        sends.append(Send(t.recv_rank, t.subring.tag, payload))
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
    return comm.start(sends, [parts.expected(t) for t in step.recvs])


def _record_task(task: Task, rank: int, trace: RankTrace) -> None:
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
    trace.add(Event(action=TraceAction.COMPUTE, rows=attended, **base))
    trace.add(Event(action=TraceAction.MERGE, **base))


def run_ring(
    comm: Communicator,
    plan: RankPlan,
    parts: RingParts,
    trace: RankTrace,
    itemsize: int,
    relay: GradRelay | None = None,
) -> None:
    """Execute ``plan`` on this rank; ``parts.attend`` accumulates the result.

    With a ``relay`` (the backward pass), the dK/dV shares ``parts.attend`` returns travel
    with their blocks and back to their owners (:mod:`ringsim.gradrelay`).
    """
    held: dict[int, Payload] = {}  # sub-ring index -> the block this rank holds this step
    pending: Request | None = None
    for index, step in enumerate(plan.steps):
        if pending is not None:  # 2a. the blocks posted at the previous step
            trace.hold("in flight", 0)
            for t, payload in zip(step.recvs, pending.wait()):
                held[t.subring.index] = payload
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
        for task in step.tasks:  # 1. step 0: the rank's own rows of each sub-ring
            if task.source_rank == plan.rank:
                held[task.subring.index] = parts.own_block(task)
        trace.hold("blocks held", sum(payload_nbytes(p) for p in held.values()))
        pending = None
        if index + 1 < len(plan.steps):  # 2b. overlap: post the next exchange first
            nxt = plan.steps[index + 1]
            pending = _post(comm, nxt, held, plan, parts, trace)
            trace.hold(
                "in flight", sum(recv_nbytes(parts.expected(t), itemsize) for t in nxt.recvs)
            )
        shares = {}  # backward: the dK/dV share of each block held (None: not attended)
        for task in step.tasks:  # 2c. attend and merge
            if not task.skipped:
                shares[task.subring.index] = parts.attend(held[task.subring.index], task)
            elif task.subring.index in held:  # a skipped block may still move on
                shares[task.subring.index] = None
            _record_task(task, plan.rank, trace)
        if relay is not None:  # 2d. backward: dK/dV on and home
            relay.after_step(index, held, shares)
        held.clear()  # sent blocks were copied when posted; nothing else needs them
        trace.hold("blocks held", 0)
    if relay is not None:
        relay.finish()
