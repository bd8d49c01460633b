"""An in-process cluster: one thread per rank, mailboxes, deadlock detection, timeouts.

Message matching follows MPI: a message from ``source`` to ``dest`` with ``tag`` goes to the
oldest receive ``dest`` has posted for ``(source, tag)``, else waits in the FIFO mailbox
``(source, dest, tag)`` for the next such receive. Sends are buffered: ``start`` copies the
payload into the mailbox (no rank ever sees another rank's memory) and never blocks.

Because matching happens when a message or a receive is posted, a receive still empty at a
wait can only be filled by a rank that is still running. So when every rank that has not
finished is blocked in a wait, nothing can ever move: that is a deadlock, reported to every
blocked rank with one message saying who waits for what.

Ranks take turns, as on one core: a rank runs its code while it holds the cluster's *turn*
and gives it up only while it waits. Threads that all ran at once fought over the GIL (NumPy
releases it inside its calls, and every release handed it to another runnable rank): a
message cost 0.8 ms at P = 128 with one segment over every rank, against 0.4 ms in turns.
A waiting rank does not need the turn to time out: it leaves its wait after ``timeout``
seconds without progress even while another rank is busy, and raises once it has the turn
back, so a rank's code never runs beside another's.
"""

from __future__ import annotations

import numbers
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

import numpy as np

from .base import (
    CommError,
    CommTimeout,
    Communicator,
    DeadlockError,
    Payload,
    RankFailed,
    Recv,
    Send,
    check_batch,
    check_timeout,
    copy_array,
    describe_payload,
    same_dtype,
)
from .checksum import ChecksummedCommunicator
from .faults import Fault, FaultyCommunicator, check_faults

T = TypeVar("T")


class ClusterAborted(CommError):
    """Raised in a rank's wait because another rank failed first (a secondary failure)."""


class _State(Enum):
    RUNNING = "running"
    DONE = "finished"
    FAILED = "failed"


@dataclass
class _Slot:
    """One posted receive; ``payload`` is set when its message is matched."""

    source: int
    tag: int
    payload: Payload | None = None


@dataclass
class _Gather:
    """The pickled objects of one allgather call, by rank; ``None`` until that rank arrives."""

    objects: list[bytes | None]
    readers: int = 0

    def complete(self) -> bool:
        return all(o is not None for o in self.objects)


@dataclass
class _World:
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
    posted: dict[tuple[int, int, int], deque[_Slot]] = field(default_factory=dict)
    gathers: dict[int, _Gather] = field(default_factory=dict)
    states: list[_State] = field(default_factory=list)
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
        self.states = [_State.RUNNING] * self.world_size
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
            queue.popleft().payload = payload
        else:
            self.mailboxes.setdefault((source, send.dest, send.tag), deque()).append(payload)
        self.last_progress = time.monotonic()
        self.wake(send.dest)

    def post_recv(self, dest: int, recv: Recv) -> _Slot:
        slot = _Slot(recv.source, recv.tag)
        box = self.mailboxes.get((recv.source, dest, recv.tag))
        if box:
            slot.payload = box.popleft()
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
        running = self.states.count(_State.RUNNING)
        if not running or len(self.waiting) < running:  # a live rank is still running
            return False
        if self.woken:  # a notified rank has yet to look: it will call this again
            return False
        live = [r for r, s in enumerate(self.states) if s is _State.RUNNING]
        if not all(r in self.waiting and not self.waiting[r][0]() for r in live):
            return False
        lines = [f"deadlock: all {len(live)} live ranks are blocked"]
        lines += [f"  rank {r} {self.waiting[r][1]()}" for r in live]
        for state in (_State.DONE, _State.FAILED):
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
                self.states[rank] = _State.DONE
                self.detect_deadlock()  # the ranks waiting for this one may now be stuck
            else:
                self.states[rank] = _State.FAILED
                self.failures.append((rank, error))
            self.wake_all()
            self.give_turn()


class _SimulatedRequest:
    """A posted batch; :meth:`wait` blocks for its receives (its sends are buffered)."""

    def __init__(self, comm: SimulatedCommunicator, recvs: Sequence[Recv], slots: list[_Slot]):
        self._comm = comm
        self._recvs = tuple(recvs)
        self._slots = slots
        self._done = False

    def wait(self) -> list[Payload]:
        if self._done:
            raise CommError(f"rank {self._comm.rank}: request waited twice")
        self._done = True
        world, rank = self._comm._world, self._comm.rank

        def missing() -> list[_Slot]:
            return [s for s in self._slots if s.payload is None]

        def describe() -> str:
            return "waits for " + ", ".join(
                f"recv from rank {s.source} tag {s.tag}" for s in missing()
            )

        with world.cond:
            world.block(rank, lambda: not missing(), describe)
        payloads = [s.payload for s in self._slots if s.payload is not None]
        for recv, payload in zip(self._recvs, payloads, strict=True):
            _check_received(rank, recv, payload)
        return payloads


def _check_received(rank: int, recv: Recv, payload: Payload) -> None:
    got_shapes = [a.shape for a in payload]
    got_shapes = [tuple(s) for s in got_shapes]
    got_dtype = payload[0].dtype if payload else recv.dtype
    if got_shapes != [tuple(s) for s in recv.shapes] or not same_dtype(got_dtype, recv.dtype):
        raise CommError(
            f"rank {rank} received from rank {recv.source} tag {recv.tag}: expected "
            f"{describe_payload(recv.shapes, recv.dtype)}, got "
            f"{describe_payload(got_shapes, got_dtype)}"
        )


class SimulatedCommunicator:
    """One rank's view of a :class:`SimulatedCluster` (the Communicator protocol)."""

    def __init__(self, world: _World, rank: int) -> None:
        self._world = world
        self._rank = rank
        self._gathers = 0  # allgather calls made by this rank: the rendezvous key

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world.world_size

    def start(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> _SimulatedRequest:
        check_batch(sends, recvs, rank=self._rank, world_size=self.world_size)
        world = self._world
        with world.cond:
            if world.failures:  # stop promptly once any rank failed
                first, error = world.failures[0]
                raise ClusterAborted(f"rank {self._rank} aborted: rank {first} failed ({error})")
            # Sends first, so a send to oneself in the same batch meets its receive.
            for send in sends:
                world.post_send(self._rank, send)
            slots = [world.post_recv(self._rank, recv) for recv in recvs]
        return _SimulatedRequest(self, recvs, slots)

    def exchange(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> list[Payload]:
        return self.start(sends, recvs).wait()

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` without the turn, so the other ranks run (and time out) as they
        would beside a slow process; ends early once a rank has failed (the caller's next
        message then raises :class:`ClusterAborted`)."""
        world = self._world
        deadline = time.monotonic() + seconds
        with world.cond:
            world.give_turn()
            while not world.failures and (left := deadline - time.monotonic()) > 0:
                world.wakers[self._rank].wait(left)
            world.take_turn()

    def allgather(self, obj: object) -> list[object]:
        """Every rank's ``obj`` by rank; pickled, so each rank gets its own deep copy."""
        data = pickle.dumps(obj)  # fails here, like MPI, for an unpicklable object
        world, key = self._world, self._gathers
        self._gathers += 1
        with world.cond:
            gather = world.gathers.setdefault(key, _Gather([None] * self.world_size))
            gather.objects[self._rank] = data
            world.last_progress = time.monotonic()
            if gather.complete():
                world.wake_all()

            def describe() -> str:
                absent = [r for r, o in enumerate(gather.objects) if o is None]
                return f"waits in allgather #{key} for ranks {absent}"

            world.block(self._rank, gather.complete, describe)
            gather.readers += 1
            if gather.readers == self.world_size:
                del world.gathers[key]
        return [pickle.loads(o) for o in gather.objects if o is not None]


class SimulatedCluster:
    """``world_size`` ranks as threads of this process; ``run`` runs one function on each.

    ``timeout``, in seconds, bounds every wait and allgather: a waiting rank gives up with
    :class:`CommTimeout` once no rank has sent anything (or joined an allgather) for that long,
    so a stalled cluster ends while a long run of many ranks does not time out on its own.
    ``checksums`` seals every message with a CRC-32 checked on receipt
    (:class:`~ringsim.comm.ChecksummedCommunicator`): a corrupted message raises
    :class:`~ringsim.comm.CorruptMessage` on its receiver at once.
    """

    def __init__(self, world_size: int, *, timeout: float = 30.0, checksums: bool = False) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral):
            raise TypeError(f"world_size: expected an int, got {world_size!r}")
        if world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {world_size!r}")
        timeout = check_timeout(timeout)
        if not isinstance(checksums, (bool, np.bool_)):
            raise TypeError(f"checksums: expected a bool, got {checksums!r}")
        self.world_size = int(world_size)  # a NumPy integer too, as validate() accepts
        self.timeout = timeout
        self.checksums = bool(checksums)

    def run(self, fn: Callable[[Communicator], T], faults: Sequence[Fault] = ()) -> list[T]:
        """``[fn(comm_0), ..., fn(comm_{p-1})]``, each call on its own thread.

        Raises :class:`RankFailed` (from the root-cause exception) if any rank raised,
        including the :class:`DeadlockError` or :class:`CommTimeout` raised in its waits, and
        :class:`CommError` if every rank returned but messages were left undelivered.
        """
        faults = check_faults(faults, self.world_size)
        world = _World(self.world_size, self.timeout)
        comms: list[Communicator] = []
        for rank in range(self.world_size):
            comm: Communicator = SimulatedCommunicator(world, rank)
            if faults:
                comm = FaultyCommunicator(comm, faults)
            if self.checksums:  # sealed above the faults: a fault corrupts in transit
                comm = ChecksummedCommunicator(comm)
            comms.append(comm)
        results: list[T | None] = [None] * self.world_size

        def main(rank: int) -> None:
            world.turn.acquire()  # given up while this rank waits, and by end()
            try:
                results[rank] = fn(comms[rank])
            except BaseException as error:  # recorded and re-raised by run as RankFailed
                world.end(rank, error)
            else:
                world.end(rank, None)

        threads = [
            threading.Thread(target=main, args=(rank,), name=f"ringsim-rank-{rank}")
            for rank in range(self.world_size)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()  # every wait is bounded by the timeout, so this ends
        if world.failures:
            failed = _rank_failed(world.failures)
            raise failed from failed.error
        # A ring that leaves a message unreceived, or a receive unmatched, has a plan bug.
        stray = [(key, len(box)) for key, box in sorted(world.mailboxes.items()) if box]
        unmatched = [(key, len(q)) for key, q in sorted(world.posted.items()) if q]
        if stray or unmatched:
            raise CommError(
                "every rank returned, but messages were never received "
                f"((source, dest, tag), count): {stray}; receives never matched: {unmatched}"
            )
        return results  # type: ignore[return-value]


def _rank_failed(failures: list[tuple[int, BaseException]]) -> RankFailed:
    """The first failure is the root cause: a secondary abort needs an earlier failure."""
    rank, error = failures[0]
    message = f"rank {rank} failed: {type(error).__name__}: {error}"
    others = sorted({r for r, e in failures[1:] if not isinstance(e, ClusterAborted)})
    if others and not isinstance(error, DeadlockError):  # all deadlocked ranks say the same
        message += f"\n(ranks {others} also failed on their own)"
    return RankFailed(message, rank, error, tuple(failures))
