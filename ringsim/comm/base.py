"""The communicator protocol every ring runs over (DESIGN.md, Communicators).

A ring step is one batch of point-to-point messages: each rank posts the sends and receives
the plan gives it for that step, computes, then waits. Three verbs make the overlap visible:

- ``start(sends, recvs)`` posts a batch and returns a :class:`Request` at once;
- ``request.wait()`` blocks until the batch is done and returns the received payloads;
- ``exchange(sends, recvs)`` is ``start(...).wait()``.

A payload is a tuple of arrays of one dtype: NumPy arrays, or torch tensors for the torch
backend (this package never imports torch: a tensor is recognised by its ``clone`` method,
see :func:`is_array`). A receive names the shapes and dtype it expects (the plan knows
them), so MPI can receive into buffers allocated up front. Send and receive buffers are
always distinct (pitfall 9): a sent payload is copied or packed when the batch is posted,
and received payloads are new arrays, or the caller's own arrays where the receive names
them (``into``: a memory pool's buffers, kept from call to call; every communicator
honours it, see :func:`delivered`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Protocol

import numpy as np

Payload = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Send:
    """Send ``payload`` to rank ``dest`` with ``tag``."""

    dest: int
    tag: int
    payload: Payload


@dataclass(frozen=True)
class Recv:
    """Receive from rank ``source`` a payload of arrays of these ``shapes`` and ``dtype``;
    ``into``: arrays of those shapes and dtype (contiguous, owned by the caller) the
    payload lands in and is returned as, or None: new arrays."""

    source: int
    tag: int
    shapes: tuple[tuple[int, ...], ...]
    dtype: object  # a NumPy dtype, or a torch dtype for tensor payloads
    into: Payload | None = field(default=None, compare=False, repr=False)


class Request(Protocol):
    def wait(self) -> list[Payload]:
        """Block until every send and receive of the batch is done; payloads in recv order."""
        ...


class Communicator(Protocol):
    """What the per-rank ring code needs from a transport."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def start(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> Request: ...

    def exchange(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> list[Payload]: ...

    def allgather(self, obj: object) -> list[object]:
        """Every rank's ``obj`` (picklable), indexed by rank; a collective over all ranks."""
        ...


class WrappedCommunicator:
    """A communicator around ``inner`` (faults, checksums): rank, world size and allgather
    are inner's, ``exchange`` is ``start(...).wait()``; a subclass defines ``start``."""

    def __init__(self, inner: Communicator) -> None:
        self._inner = inner

    @property
    def rank(self) -> int:
        return self._inner.rank

    @property
    def world_size(self) -> int:
        return self._inner.world_size

    def start(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> Request:
        raise NotImplementedError

    def exchange(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> list[Payload]:
        return self.start(sends, recvs).wait()

    def allgather(self, obj: object) -> list[object]:
        return self._inner.allgather(obj)


class CommError(RuntimeError):
    """A ring could not complete: a rank failed, a message never came, or ranks disagree."""


class CommTimeout(CommError):
    """A wait lasted longer than the communicator's timeout."""


class DeadlockError(CommError):
    """Every live rank waits for a message no rank will send."""


class RankCrashed(CommError):
    """An injected fault crashed this rank."""


#: The longest timeout a communicator takes, in seconds (about 116 days): far beyond any
#: run, and well inside what the platform's clocks and waits accept.
MAX_TIMEOUT_S = 1e7


def check_timeout(timeout: object) -> float:
    """``timeout`` as float seconds: a real number (not a bool) in ``(0, MAX_TIMEOUT_S]``."""
    if isinstance(timeout, bool) or not isinstance(timeout, Real):
        raise TypeError(f"timeout: expected a number of seconds, got {timeout!r}")
    seconds = float(timeout)
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(
            f"timeout: must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {timeout!r}"
        )
    return seconds


def payload_nbytes(payload: Payload) -> int:
    """Bytes of the arrays themselves (elements x itemsize), no framing (spec §6)."""
    return sum(int(a.nbytes) for a in payload)


class RankFailed(CommError):
    """A rank's function raised; the run as a whole failed.

    ``rank`` and ``error`` name the root cause (the first failure that was not a secondary
    abort); ``failures`` lists every ``(rank, exception)`` in the order they happened. The
    exception is raised ``from error``.
    """

    def __init__(
        self,
        message: str,
        rank: int,
        error: BaseException,
        failures: tuple[tuple[int, BaseException], ...] = (),
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.error = error
        self.failures = failures

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Exceptions pickle as cls(*args); ours needs its extra fields back.
        return (type(self), (str(self), self.rank, self.error, self.failures))


def is_array(a: object) -> bool:
    """A NumPy array or a torch tensor (which has ``clone``, ``shape``, ``dtype``)."""
    return isinstance(a, np.ndarray) or all(hasattr(a, n) for n in ("clone", "shape", "dtype"))


def copy_array(a):
    """A new array with ``a``'s contents: no rank ever sees another rank's memory."""
    return np.array(a, copy=True, order="C") if isinstance(a, np.ndarray) else a.clone()


def copy_into(into: Payload, payload: Payload) -> Payload:
    """``into``, with ``payload``'s contents copied in (arrays of equal shapes)."""
    for target, got in zip(into, payload, strict=True):
        if isinstance(target, np.ndarray):
            np.copyto(target, got)
        else:
            target.copy_(got)
    return into


def delivered(recv: Recv, payload: Payload) -> Payload:
    """``payload`` as the receive returns it: copied into ``recv.into`` when the receive
    names arrays (a transport that cannot write into them directly), else as it is."""
    if recv.into is None or payload is recv.into:
        return payload
    return copy_into(recv.into, payload)


def fits(arrays: Payload, shapes: Sequence[tuple[int, ...]], dtype: object) -> bool:
    """Whether ``arrays`` are as many arrays as ``shapes``, of those shapes and ``dtype``."""
    return len(arrays) == len(shapes) and all(
        tuple(a.shape) == tuple(s) and same_dtype(a.dtype, dtype) for a, s in zip(arrays, shapes)
    )


def same_dtype(a: object, b: object) -> bool:
    """Equal dtypes, NumPy (any spelling) or torch."""
    try:
        return np.dtype(a) == np.dtype(b)
    except TypeError:  # a torch dtype: NumPy cannot read it
        return a == b


def dtype_text(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def describe_payload(shapes: Sequence[tuple[int, ...]], dtype: object) -> str:
    """``'2 arrays of float64, shapes [(3, 4), (5,)]'``, for error messages."""
    return f"{len(shapes)} arrays of {dtype_text(dtype)}, shapes {[tuple(s) for s in shapes]}"


def check_batch(
    sends: Sequence[Send], recvs: Sequence[Recv], *, rank: int, world_size: int
) -> None:
    """Reject a malformed batch before anything is posted (every backend calls this).

    Raises ``ValueError``/``TypeError`` naming the rank, the message and the rule: peers in
    ``[0, world_size)``, tags non-negative ints, payloads tuples of ndarrays of one dtype
    (MPI packs a payload into one buffer), receive shapes of non-negative ints.
    """
    for index, send in enumerate(sends):
        _check_peer(rank, "sends", index, send, "dest", send.dest, world_size)
        if not isinstance(send.payload, tuple) or not all(is_array(a) for a in send.payload):
            raise TypeError(
                f"{_where(rank, 'sends', index, send)}: payload must be a tuple of numpy "
                "arrays or tensors"
            )
        dtypes = {a.dtype for a in send.payload}
        if len(dtypes) > 1:
            texts = sorted(dtype_text(d) for d in dtypes)
            where = _where(rank, "sends", index, send)
            raise TypeError(f"{where}: payload arrays must share one dtype, got {texts}")
    for index, recv in enumerate(recvs):
        _check_peer(rank, "recvs", index, recv, "source", recv.source, world_size)
        if not all(isinstance(s, tuple) and all(map(_is_size, s)) for s in recv.shapes):
            where = _where(rank, "recvs", index, recv)
            raise TypeError(f"{where}: shapes must be tuples of non-negative ints")
        if not isinstance(recv.dtype, np.dtype) and not same_dtype(recv.dtype, recv.dtype):
            raise TypeError(
                f"{_where(rank, 'recvs', index, recv)}: dtype must be a NumPy or torch dtype, "
                f"got {recv.dtype!r}"
            )
        if recv.into is not None:
            _check_into(rank, index, recv)


def _check_into(rank: int, index: int, recv: Recv) -> None:
    """``recv.into``: a tuple of contiguous arrays of the receive's shapes and dtype."""
    into = recv.into
    if not (isinstance(into, tuple) and all(map(is_array, into))) or not fits(
        into, recv.shapes, recv.dtype
    ):
        got = (
            [(tuple(getattr(a, "shape", ())), dtype_text(getattr(a, "dtype", a))) for a in into]
            if isinstance(into, tuple)
            else type(into).__name__
        )
        raise TypeError(
            f"{_where(rank, 'recvs', index, recv)}: into must be a tuple of "
            f"{describe_payload(recv.shapes, recv.dtype)}, got {got!r}"
        )
    contiguous = (
        a.flags.c_contiguous if isinstance(a, np.ndarray) else a.is_contiguous() for a in into
    )
    if not all(contiguous):
        raise ValueError(f"{_where(rank, 'recvs', index, recv)}: into arrays must be contiguous")


def _is_size(d: object) -> bool:
    """A non-negative int (``type(d) is int`` first: the ABC check costs more per message)."""
    return (type(d) is int or isinstance(d, Integral)) and d >= 0  # type: ignore[operator]


def _where(rank: int, kind: str, index: int, message: Send | Recv) -> str:
    """``'rank 0: sends[1] (dest 2, tag 3)'``: built only for an error message."""
    peer = ("dest", message.dest) if isinstance(message, Send) else ("source", message.source)
    return f"rank {rank}: {kind}[{index}] ({peer[0]} {peer[1]}, tag {message.tag})"


def _check_peer(
    rank: int, kind: str, index: int, message: Send | Recv, name: str, peer: int, world_size: int
) -> None:
    """The peer a rank in ``[0, world_size)``, the tag a non-negative int."""
    if not (type(peer) is int or isinstance(peer, Integral)) or not 0 <= peer < world_size:
        where = _where(rank, kind, index, message)
        raise ValueError(f"{where}: {name} must be a rank in [0, {world_size})")
    if not _is_size(message.tag):
        raise ValueError(f"{_where(rank, kind, index, message)}: tag must be a non-negative int")
