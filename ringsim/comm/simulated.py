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
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from .base import (
    CommError,
    Communicator,
    DeadlockError,
    Payload,
    RankFailed,
    Recv,
    Send,
    check_batch,
    check_timeout,
    delivered,
    describe_payload,
    fits,
)
from .checksum import ChecksummedCommunicator
from .faults import Fault, FaultyCommunicator, check_faults
from .world import ClusterAborted, Gather, Slot, World

__all__ = ["ClusterAborted", "SimulatedCluster", "SimulatedCommunicator"]

T = TypeVar("T")


class _SimulatedRequest:
    """A posted batch; :meth:`wait` blocks for its receives (its sends are buffered)."""

    def __init__(self, comm: SimulatedCommunicator, recvs: Sequence[Recv], slots: list[Slot]):
        self._comm = comm
        self._recvs = tuple(recvs)
        self._slots = slots
        self._done = False

    def wait(self) -> list[Payload]:
        if self._done:
            raise CommError(f"rank {self._comm.rank}: request waited twice")
        self._done = True
        world, rank = self._comm._world, self._comm.rank

        def missing() -> list[Slot]:
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
        return [delivered(r, p) for r, p in zip(self._recvs, payloads)]


def _check_received(rank: int, recv: Recv, payload: Payload) -> None:
    if not fits(payload, recv.shapes, recv.dtype):
        got_shapes = [tuple(a.shape) for a in payload]
        got_dtype = payload[0].dtype if payload else recv.dtype
        raise CommError(
            f"rank {rank} received from rank {recv.source} tag {recv.tag}: expected "
            f"{describe_payload(recv.shapes, recv.dtype)}, got "
            f"{describe_payload(got_shapes, got_dtype)}"
        )


class SimulatedCommunicator:
    """One rank's view of a :class:`SimulatedCluster` (the Communicator protocol)."""

    def __init__(self, world: World, rank: int) -> None:
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
            gather = world.gathers.setdefault(key, Gather([None] * self.world_size))
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
        world = World(self.world_size, self.timeout)
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
