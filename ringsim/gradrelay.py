"""The backward half of the ring: dK/dV travel with their block and go home to its owner.

In the backward pass every rank runs the forward's schedule again (:func:`run_ring`): the
same K/V blocks move the same way, and attending a block now means the block backward,
which adds to the rank's dq and returns the block's share of dK/dV. Those shares belong to
the block's owner, so they travel with the block, one accumulator per held block:

1. after computing step t, the accumulator of each held block is its own share plus what
   came with the block (the previous holder's accumulator);
2. groups of the block that move on at step t+1 send their accumulator along, to the same
   rank as the K/V (tag ``grad_tag``, float32 or wider);
3. groups whose block stops here (the plan's ``returns``) send it straight back to the
   owner; groups of the owner's block that never leave it are added at once;
4. the owner adds every returned accumulator into its dk, dv.

The K/V of step t+1 are posted before computing step t (overlap, as in the forward); the
dK/dV can only be posted after it, and are waited for after computing step t+1.

Note [Why the forward schedule is enough]
-----------------------------------------
A slot's accumulator (one pattern group of one piece of the block, Note [Pieces] in
:mod:`ringsim.plan`) leaves a place exactly when the K/V rows of that slot leave it (the
plan's transfer rows), and stops where the K/V stop: each return transfer names the slots
whose last place it is. So no place ever receives a gradient it has no block for, and every
share reaches its owner exactly once: the mutant that drops the return trip loses the
shares of every rank but the owner.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Protocol

from ringsim.comm.base import Communicator, Payload, Recv, Request, Send, payload_nbytes
from ringsim.comm.checksum import CorruptMessage
from ringsim.plan import RankPlan, Transfer
from ringsim.tasks import which_transfer
from ringsim.trace import Event, RankTrace, TraceAction


class GradMessage(str, Enum):
    """What a gradient message carries, as the trace's ``detail`` names it: a block's dK/dV
    share going on with the block, or coming home to its owner."""

    ONWARD = "dk,dv"
    RETURN = "dk,dv return"


class GradParts(Protocol):
    """A backend's pieces of the backward ring, besides :class:`ringsim.ringloop.RingParts`."""

    grad_dtype: object

    def message(self, block: Payload, transfer: Transfer) -> Payload: ...

    def expected(self, transfer: Transfer) -> Recv: ...

    def zeros(self, block: Payload) -> Payload:
        """Zero dK/dV shaped like ``block`` (a block this rank did not attend)."""
        ...

    def add(self, a: Payload, b: Payload) -> Payload:
        """Element-wise ``a + b`` of two dK/dV payloads of equal shapes."""
        ...

    def add_home(self, grads: Payload, transfer: Transfer) -> None:
        """Add the dK/dV of ``transfer.rows`` (this rank's own rows) into its dk, dv."""
        ...


class HomeAdds:
    """``add`` and ``add_home`` of :class:`GradParts` for parts whose dK/dV payload is the dk
    of every slot (piece and pattern group) of the pair, then the dv of every slot (both
    backends' layout).

    The parts supply ``plan`` (their :class:`~ringsim.plan.RankPlan`), the ``dk``, ``dv``
    accumulators and ``add_rows(total, rows, heads, share)``: ``share`` added into ``total``
    at the global ``rows`` (of this rank's shard) and ``heads``.
    """

    plan: RankPlan
    dk: object
    dv: object

    def add_rows(self, total, rows: range, heads: tuple[int, ...], share) -> None:
        raise NotImplementedError

    def add(self, a: Payload, b: Payload) -> Payload:
        return tuple(x + y for x, y in zip(a, b))

    def add_home(self, grads: Payload, transfer: Transfer) -> None:
        half = len(transfer.rows)  # K slots, then V slots (Note [Pieces] in ringsim.plan)
        heads_of = self.plan.kv_slot_heads(transfer.subring.pair, half)
        for i, (rows, heads) in enumerate(zip(transfer.rows, heads_of)):
            if len(rows):
                self.add_rows(self.dk, rows, heads, grads[i])
                self.add_rows(self.dv, rows, heads, grads[half + i])


@dataclass
class GradRelay:
    """The dK/dV accumulators of one rank's blocks, moved as the plan says."""

    comm: Communicator
    plan: RankPlan
    parts: GradParts
    trace: RankTrace | None
    pending: Request | None = None
    pending_recvs: list[Transfer] = field(default_factory=list)

    def grad_recv(self, transfer: Transfer) -> Recv:
        """dK/dV of ``transfer``: the K and V arrays of its block (a block may carry more
        after them, its keys' padding, which has no gradient)."""
        recv = self.parts.expected(transfer)
        shapes = recv.shapes[: 2 * len(transfer.rows)]
        return replace(recv, shapes=shapes, tag=transfer.subring.grad_tag,
                       dtype=self.parts.grad_dtype)  # fmt: skip

    def after_step(
        self, index: int, held: dict[int, Payload], shares: dict[int, Payload | None]
    ) -> None:
        """Step ``index`` is computed: ``shares[subring]`` is each held block's dK/dV share
        (None where nothing was attended, or where the backend added its own block's dK/dV
        itself); gather, send on and send home. Zeros stand for a missing share only where
        one must be sent: none are made, and none added, for a block that never leaves."""
        step = self.plan.steps[index]
        acc = dict(shares)  # None: no share (yet); zeros are made only where one is sent

        def share(i: int) -> Payload:
            if acc[i] is None:
                acc[i] = self.parts.zeros(held[i])
            return acc[i]

        for t, payload in self._wait(step.step):  # 1. what came with the blocks
            if t.recv_rank == t.source_rank:
                self.parts.add_home(payload, t)  # 4. a block of this rank came home
            else:
                acc[t.subring.index] = self.parts.add(share(t.subring.index), payload)
        nxt = self.plan.steps[index + 1] if index + 1 < len(self.plan.steps) else None
        # 2. on with the blocks
        sends = [(t, GradMessage.ONWARD) for t in (nxt.sends if nxt else ())]
        recvs = list(nxt.recvs if nxt else ())
        for t in self.plan.returns_at(step.step):  # 3. home
            if t.send_rank == t.recv_rank:  # a block that never left: added in place
                if acc.get(t.subring.index) is not None:  # (None: a backend added it itself)
                    self.parts.add_home(self.parts.message(acc[t.subring.index], t), t)
            elif t.send_rank == self.plan.rank:
                sends.append((t, GradMessage.RETURN))
            else:
                recvs.append(t)
        self._post(step.step + 1, [(t, kind, share(t.subring.index)) for t, kind in sends], recvs)

    def finish(self) -> None:
        """After the last step: wait for the last returns and add them."""
        for t, payload in self._wait(len(self.plan.steps)):
            self.parts.add_home(payload, t)

    def _post(self, step: int, sends: list, recvs: list[Transfer]) -> None:
        posted = []
        for t, kind, grads in sends:
            payload = self.parts.message(grads, t)
            posted.append(Send(t.recv_rank, t.subring.grad_tag, payload))
            self._record(step, TraceAction.SEND, t, t.recv_rank, payload, kind)
        self.pending_recvs = recvs
        if posted or recvs:
            self.pending = self.comm.start(posted, [self.grad_recv(t) for t in recvs])

    def _wait(self, step: int) -> list[tuple[Transfer, Payload]]:
        if self.pending is None:
            return []
        try:
            got = list(zip(self.pending_recvs, self.pending.wait()))
        except CorruptMessage as error:
            grads = which_transfer(self.pending_recvs, error.source, error.tag, "dK/dV")
            raise error.located(f"step {step}: {grads}") from error
        self.pending, self.pending_recvs = None, []
        for t, payload in got:
            kind = GradMessage.RETURN if t.recv_rank == t.source_rank else GradMessage.ONWARD
            self._record(step, TraceAction.RECV, t, t.send_rank, payload, kind)
        return got

    def _record(self, step, action, t: Transfer, peer, payload, kind) -> None:
        if self.trace is None:
            return
        self.trace.add(
            Event(
                step,
                self.plan.rank,
                action,
                peer,
                payload_nbytes(payload),
                t.subring.pair,
                t.subring.index,
                t.source_rank,
                t.rows,
                kind.value,
            )
        )
