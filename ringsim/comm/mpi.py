"""The Communicator protocol over mpi4py, buffer-based (no pickling of arrays).

A send packs its payload into one new contiguous buffer (so later writes to the caller's
arrays cannot change what is sent) and posts ``Isend``; a receive posts ``Irecv`` into a
new buffer of the expected size, unpacked into arrays of the expected shapes at ``wait``.
Send and receive buffers are therefore always distinct (pitfall 9). Buffers travel as
bytes, so every dtype works, float16 and bool included; the receiver knows shapes and dtype.

mpi4py is imported when a communicator is created, never when this module is imported.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ringsim.extras import require

from .base import (
    CommError,
    CommTimeout,
    Payload,
    Recv,
    Send,
    check_batch,
    check_timeout,
    delivered,
    describe_payload,
)

if TYPE_CHECKING:
    from mpi4py import MPI

#: Polling interval bounds for ``wait``: start short (latency), back off to spare the CPU.
_MIN_POLL_S = 1e-5
_MAX_POLL_S = 2e-3


def pack(payload: Payload) -> np.ndarray:
    """A new flat byte buffer holding every array of ``payload`` in order (C order)."""
    if not payload:
        return np.empty(0, dtype=np.uint8)
    dtype = payload[0].dtype
    flat = np.concatenate([np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in payload])
    return flat.view(np.uint8)


def unpack(buffer: np.ndarray, recv: Recv) -> Payload:
    """Arrays of ``recv.shapes`` viewing consecutive parts of ``buffer`` (bytes, flat)."""
    flat = buffer.view(np.dtype(recv.dtype))
    arrays, start = [], 0
    for shape in recv.shapes:
        size = int(np.prod(shape, dtype=np.int64))
        arrays.append(flat[start : start + size].reshape(shape))
        start += size
    return tuple(arrays)


def _recv_nbytes(recv: Recv) -> int:
    return sum(int(np.prod(s, dtype=np.int64)) for s in recv.shapes) * np.dtype(recv.dtype).itemsize


class MPIRequest:
    """A posted batch; :meth:`wait` polls ``Testall`` until done or ``timeout`` seconds."""

    def __init__(
        self,
        comm: MPICommunicator,
        sends: Sequence[Send],
        recvs: Sequence[Recv],
        requests: list[MPI.Request],
        buffers: list[np.ndarray],
    ) -> None:
        self._comm = comm
        self._sends = tuple(sends)
        self._recvs = tuple(recvs)
        self._requests = requests  # sends first, then receives
        self._buffers = buffers  # kept alive until the requests complete
        self._done = False

    def wait(self) -> list[Payload]:
        from mpi4py import MPI

        rank = self._comm.rank
        if self._done:
            raise CommError(f"rank {rank}: request waited twice")
        self._done = True
        statuses = [MPI.Status() for _ in self._requests]
        deadline = time.monotonic() + self._comm.timeout
        poll = _MIN_POLL_S
        try:
            while not MPI.Request.Testall(self._requests, statuses):
                if time.monotonic() > deadline:
                    raise CommTimeout(
                        f"rank {rank} timed out after {self._comm.timeout:g} s waiting for "
                        + "; ".join(self._pending())
                    )
                time.sleep(poll)
                poll = min(2 * poll, _MAX_POLL_S)
        except MPI.Exception as error:  # e.g. a message longer than its receive buffer
            raise CommError(f"rank {rank}: {self._failed(statuses, error)}") from error
        payloads = []
        recv_statuses = statuses[len(self._sends) :]
        for recv, buffer, status in zip(
            self._recvs, self._buffers[len(self._sends) :], recv_statuses, strict=True
        ):
            got = status.Get_count(MPI.BYTE)
            if got != buffer.nbytes:
                raise CommError(
                    f"rank {rank} received from rank {recv.source} tag {recv.tag}: expected "
                    f"{describe_payload(recv.shapes, recv.dtype)} ({buffer.nbytes} bytes), "
                    f"got {got} bytes"
                )
            payloads.append(delivered(recv, unpack(buffer, recv)))
        return payloads

    def _pending(self) -> list[str]:
        """The sends and receives of this batch that have not completed."""
        pending = []
        for index, request in enumerate(self._requests):
            if not request.Test():
                if index < len(self._sends):
                    send = self._sends[index]
                    pending.append(f"send to rank {send.dest} tag {send.tag}")
                else:
                    recv = self._recvs[index - len(self._sends)]
                    pending.append(f"recv from rank {recv.source} tag {recv.tag}")
        return pending

    def _failed(self, statuses: list[MPI.Status], error: MPI.Exception) -> str:
        """Which messages of the batch failed, from the per-request status error codes."""
        from mpi4py import MPI

        if error.Get_error_class() != MPI.ERR_IN_STATUS:
            return f"MPI error in a batch: {error}"
        lines = []
        for index, status in enumerate(statuses):
            code = status.Get_error()
            if code in (MPI.SUCCESS, MPI.ERR_PENDING):
                continue
            reason = MPI.Get_error_string(code).strip()
            if index < len(self._sends):
                send = self._sends[index]
                lines.append(f"send to rank {send.dest} tag {send.tag} failed: {reason}")
            else:
                recv = self._recvs[index - len(self._sends)]
                lines.append(
                    f"receive from rank {recv.source} tag {recv.tag} failed (expected "
                    f"{describe_payload(recv.shapes, recv.dtype)}, "
                    f"{self._buffers[index].nbytes} bytes): {reason}"
                )
        return "; ".join(lines) or f"MPI error in a batch: {error}"


class MPICommunicator:
    """The Communicator protocol over an mpi4py communicator (``COMM_WORLD`` by default).

    ``timeout`` (seconds) bounds every ``wait`` and ``allgather``, so a lost message or a
    dead peer ends in :class:`CommTimeout` instead of a hang.
    """

    def __init__(self, comm: MPI.Comm | None = None, *, timeout: float = 60.0) -> None:
        timeout = check_timeout(timeout)
        if comm is None:
            comm = require("mpi4py.MPI", "MPICommunicator").COMM_WORLD
        self._comm = comm
        self.timeout = timeout

    @property
    def rank(self) -> int:
        return int(self._comm.Get_rank())

    @property
    def world_size(self) -> int:
        return int(self._comm.Get_size())

    @property
    def mpi_comm(self):
        """The mpi4py communicator underneath (what ``Abort`` is called on)."""
        return self._comm

    def start(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> MPIRequest:
        from mpi4py import MPI

        check_batch(sends, recvs, rank=self.rank, world_size=self.world_size)
        requests, buffers = [], []
        for send in sends:
            buffer = pack(send.payload)
            requests.append(
                self._comm.Isend([buffer, MPI.BYTE], dest=int(send.dest), tag=int(send.tag))
            )
            buffers.append(buffer)
        for recv in recvs:
            buffer = np.empty(_recv_nbytes(recv), dtype=np.uint8)
            requests.append(
                self._comm.Irecv([buffer, MPI.BYTE], source=int(recv.source), tag=int(recv.tag))
            )
            buffers.append(buffer)
        return MPIRequest(self, sends, recvs, requests, buffers)

    def exchange(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> list[Payload]:
        return self.start(sends, recvs).wait()

    def allgather(self, obj: object) -> list[object]:
        """Every rank's ``obj`` by rank (pickled); bounded by ``timeout``.

        Two non-blocking collectives, each polled like ``wait``: the pickled sizes
        (``Iallgather``), then the bytes (``Iallgatherv``). No blocking call is left in
        which a rank stopped or killed from outside could hold the others forever.
        """
        from mpi4py import MPI

        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        sizes = np.empty(self.world_size, dtype=np.int64)
        mine = np.array([data.size], dtype=np.int64)
        self._bounded(self._comm.Iallgather([mine, MPI.INT64_T], [sizes, MPI.INT64_T]))
        counts = [int(s) for s in sizes]
        starts = [0, *np.cumsum(counts[:-1]).tolist()]
        gathered = np.empty(sum(counts), dtype=np.uint8)
        self._bounded(
            self._comm.Iallgatherv([data, MPI.BYTE], [gathered, (counts, starts), MPI.BYTE])
        )
        return [pickle.loads(gathered[s : s + c]) for s, c in zip(starts, counts, strict=True)]

    def _bounded(self, request: MPI.Request) -> None:
        """Poll a collective's ``request`` until done; ``CommTimeout`` after ``timeout``."""
        deadline = time.monotonic() + self.timeout
        poll = _MIN_POLL_S
        while not request.Test():
            if time.monotonic() > deadline:
                raise CommTimeout(
                    f"rank {self.rank} timed out after {self.timeout:g} s in allgather "
                    f"waiting for the other {self.world_size - 1} ranks"
                )
            time.sleep(poll)
            poll = min(2 * poll, _MAX_POLL_S)
