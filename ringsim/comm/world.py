"""The shared state of a simulated cluster: mailboxes, turns, waits and deadlock detection.

:class:`World` is what the ranks of one :class:`~ringsim.comm.simulated.SimulatedCluster`
run share, guarded by one lock; the communicators of :mod:`ringsim.comm.simulated` post
into it and wait on it. The module docstring of :mod:`ringsim.comm.simulated` says how
messages match and why ranks take turns.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from .base import (
    CommError,
    CommTimeout,
    DeadlockError,
    Payload,
    Recv,
    Send,
    copy_array,
    copy_into,
    fits,
)


class ClusterAborted(CommError):
    """Raised in a rank's wait because another rank failed first (a secondary failure)."""


class RankState(Enum):
    RUNNING = "running"
    DONE = "finished"
    FAILED = "failed"


@dataclass
class Slot:
    """One posted receive; ``payload`` is set when its message is matched. A receive that
    names arrays (``into``) has the message written into them at that moment, as a real
    transport may land it any time between the post and the wait: a rank that still reads
    those arrays then sees them change, as it would on a network."""

    recv: Recv
    payload: Payload | None = None

    @property
    def source(self) -> int:
        return self.recv.source

    @property
    def tag(self) -> int:
        return self.recv.tag

    def fill(self, payload: Payload) -> None:
        recv = self.recv
        landed = recv.into is not None and fits(payload, recv.shapes, recv.dtype)
        # a message that does not fit is kept as it came: the wait names the mismatch
        self.payload = copy_into(recv.into, payload) if landed else payload


@dataclass
class Gather:
    """The pickled objects of one allgather call, by rank; ``None`` until that rank arrives."""

    objects: list[bytes | None]
    readers: int = 0

    def complete(self) -> bool:
        return all(o is not None for o in self.objects)


@dataclass
class World:
    """State shared by the ranks of one run; every field is guarded by ``cond``'s lock.

    Each rank sleeps on its own condition (``wakers[rank]``, on the same lock), and a message
    wakes its receiver only: the cost of a message does not grow with the number of ranks.
    Events every rank must see (a failure, a deadlock, a rank done, a complete allgather)
    wake them all.
    """

    world_size: int
    timeout: float
    cond: threading.Condition = field(default_factory=threading.Condition)
    #: Held by the one rank whose code runs; taken only without ``cond`` held.
    turn: threading.Lock = field(default_factory=threading.Lock)
    wakers: list[threading.Condition] = field(default_factory=list)
    mailboxes: dict[tuple[int, int, int], deque[Payload]] = field(default_factory=dict)
    posted: dict[tuple[int, int, int], deque[Slot]] = field(default_factory=dict)
    gathers: dict[int, Gather] = field(default_factory=dict)
    states: list[RankState] = field(default_factory=list)
    waiting: dict[int, tuple[Callable[[], bool], Callable[[], str]]] = field(default_factory=dict)
    #: Waiting ranks notified since they last looked: each will look again when it gets the
    #: lock, so no deadlock can be declared while this is non-empty.
    woken: set[int] = field(default_factory=set)
    #: Ranks sent a message by the rank holding the turn: notified when it gives the turn up,
    #: so that a woken rank does not compete with the running one for the interpreter.
    pending: set[int] = field(default_factory=set)
    failures: list[tuple[int, BaseException]] = field(default_factory=list)
    deadlock: str | None = None
    #: When a rank last sent (or ended): a wait times out only once the whole cluster has
    #: made no progress for ``timeout`` seconds, so a long run never times out on its own.
    last_progress: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.states = [RankState.RUNNING] * self.world_size
        self.wakers = [threading.Condition(self.cond) for _ in range(self.world_size)]

    def wake_all(self) -> None:
        self.woken.update(self.waiting)
        for waker in self.wakers:
            waker.notify_all()

    def wake(self, rank: int) -> None:
        """Wake ``rank`` once the running rank gives up the turn."""
        if rank in self.waiting:
            self.woken.add(rank)
        self.pending.add(rank)

    def take_turn(self) -> None:
        """Wait for the turn, called with ``cond`` held once: the turn first, then ``cond``
        again, since the rank holding the turn may need ``cond`` to give it up."""
        self.cond.release()
        self.turn.acquire()
        self.cond.acquire()

    def give_turn(self) -> None:
        """The running rank stops running (it waits, or it ended): wake whom it sent to."""
        self.turn.release()
        for rank in self.pending:
            self.wakers[rank].notify_all()
        self.pending.clear()

    # Called with cond held.
    def post_send(self, source: int, send: Send) -> None:
        payload = tuple(copy_array(a) for a in send.payload)
        queue = self.posted.get((source, send.dest, send.tag))
        if queue:
            queue.popleft().fill(payload)
        else:
            self.mailboxes.setdefault((source, send.dest, send.tag), deque()).append(payload)
        self.last_progress = time.monotonic()
        self.wake(send.dest)

    def post_recv(self, dest: int, recv: Recv) -> Slot:
        slot = Slot(recv)
        box = self.mailboxes.get((recv.source, dest, recv.tag))
        if box:
            slot.fill(box.popleft())
        else:
            self.posted.setdefault((recv.source, dest, recv.tag), deque()).append(slot)
        return slot

    def block(self, rank: int, ready: Callable[[], bool], describe: Callable[[], str]) -> None:
        """Wait until ``ready()``; raise on deadlock, another rank's failure, or timeout: no
        rank sent anything for ``timeout`` seconds while this one waited.

        Called by the rank holding the turn, with ``cond`` held once; the turn is given up
        while the rank waits and is back when this returns or raises.
        """
        started = time.monotonic()
        self.waiting[rank] = (ready, describe)
        gave_turn = False
        try:
            while True:
                if ready():
                    return
                if self.deadlock is not None:
                    raise DeadlockError(self.deadlock)
                if self.failures:
                    first, error = self.failures[0]
                    raise ClusterAborted(
                        f"rank {rank} aborted while it {describe()}: rank {first} failed "
                        f"with {type(error).__name__}: {error}"
                    )
                if self.detect_deadlock():
                    continue
                remaining = max(started, self.last_progress) + self.timeout - time.monotonic()
                if remaining <= 0:
                    raise CommTimeout(
                        f"rank {rank} timed out after {self.timeout:g} s: {describe()}"
                    )
                if not gave_turn:
                    self.give_turn()
                    gave_turn = True
                self.wakers[rank].wait(remaining)
                self.woken.discard(rank)
        finally:
            del self.waiting[rank]
            self.woken.discard(rank)
            if gave_turn:
                self.take_turn()

    def detect_deadlock(self) -> bool:
        """Set ``deadlock`` (and wake everyone) if no live rank can ever move again."""
        if self.deadlock is not None or self.failures:
            return self.deadlock is not None
        running = self.states.count(RankState.RUNNING)
        if not running or len(self.waiting) < running:  # a live rank is still running
            return False
        if self.woken:  # a notified rank has yet to look: it will call this again
            return False
        live = [r for r, s in enumerate(self.states) if s is RankState.RUNNING]
        if not all(r in self.waiting and not self.waiting[r][0]() for r in live):
            return False
        lines = [f"deadlock: all {len(live)} live ranks are blocked"]
        lines += [f"  rank {r} {self.waiting[r][1]()}" for r in live]
        for state in (RankState.DONE, RankState.FAILED):
            ranks = [r for r, s in enumerate(self.states) if s is state]
            lines.append(f"  {state.value}: ranks {ranks}" if ranks else f"  {state.value}: none")
        stray = [key for key, box in sorted(self.mailboxes.items()) if box]
        if stray:
            lines.append(f"  undelivered (source, dest, tag): {stray}")
        self.deadlock = "\n".join(lines)
        self.wake_all()
        return True

    def end(self, rank: int, error: BaseException | None) -> None:
        """``rank`` returned (``error`` None) or raised; it gives up the turn for good."""
        with self.cond:
            if error is None:
                self.states[rank] = RankState.DONE
                self.detect_deadlock()  # the ranks waiting for this one may now be stuck
            else:
                self.states[rank] = RankState.FAILED
                self.failures.append((rank, error))
            self.wake_all()
            self.give_turn()
