"""Injected faults, as a wrapper around any communicator (simulated or MPI).

A :class:`Fault` picks one message by the rank that sends it and its index among that rank's
sends, counted in posting order from 0 over every ``start``/``exchange`` call. Wrapping the
communicator rather than the transport means the simulated cluster and the MPI checks share
one implementation, and the ring code under test cannot tell a fault from a real failure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from numbers import Integral, Real

import numpy as np

from .base import (
    Communicator,
    Payload,
    RankCrashed,
    Recv,
    Request,
    Send,
    WrappedCommunicator,
)


class FaultKind(str, Enum):
    """What happens to the chosen message."""

    DROP = "drop"  # never delivered: the receiver times out or deadlocks
    DELAY = "delay"  # delivered ``delay`` seconds late; results stay correct
    CORRUPT = "corrupt"  # delivered with every element changed (+1, finite)
    CRASH = "crash"  # the sending rank raises RankCrashed instead of sending


@dataclass(frozen=True)
class Fault:
    """A fault on message number ``message`` (0-based) of rank ``rank``'s sends."""

    kind: FaultKind
    rank: int
    message: int = 0
    delay: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.kind, FaultKind):
            raise TypeError(f"kind: expected a FaultKind, got {self.kind!r}")
        for name in ("rank", "message"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise TypeError(f"{name}: expected an int, got {value!r}")
            if value < 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")
        if isinstance(self.delay, bool) or not isinstance(self.delay, Real):
            raise TypeError(f"delay: expected a number of seconds, got {self.delay!r}")
        if not math.isfinite(self.delay) or self.delay < 0:
            raise ValueError(f"delay: must be a finite number >= 0, got {self.delay}")


def check_faults(faults: object, world_size: int) -> tuple[Fault, ...]:
    """``faults`` as a tuple, checked before any rank starts: a sequence (any iterable but a
    string, read once) of :class:`Fault` whose ranks are below ``world_size``."""
    if isinstance(faults, Fault):
        raise TypeError(f"faults: expected a sequence of Fault (put one in a list), got {faults!r}")
    if faults is None or isinstance(faults, (str, bytes)) or not isinstance(faults, Iterable):
        raise TypeError(f"faults: expected a sequence of ringsim.comm.Fault, got {faults!r}")
    found = tuple(faults)
    for fault in found:
        if not isinstance(fault, Fault):
            raise TypeError(f"faults: expected ringsim.comm.Fault items, got {fault!r}")
        if fault.rank >= world_size:
            raise ValueError(
                f"faults: {fault} names rank {fault.rank}, past world_size {world_size}"
            )
    return found


def corrupt_payload(payload: Payload) -> Payload:
    """New arrays with every element clearly wrong but finite (+1; booleans flipped)."""
    return tuple(
        np.logical_not(a) if a.dtype == np.bool_ else a + 1  # NumPy or torch, dtype kept
        for a in payload
    )


class _FaultyRequest:
    """The batch's own request plus the late sends posted after their delay."""

    def __init__(self, request: Request, late: list[Request]) -> None:
        self._request = request
        self._late = late

    def wait(self) -> list[Payload]:
        payloads = self._request.wait()
        for request in self._late:
            request.wait()  # sends only: no payloads
        return payloads


class FaultyCommunicator(WrappedCommunicator):
    """``inner`` with ``faults`` applied to this rank's sends; other ranks' faults are ignored.

    Every rank of a run may be given the same ``faults``. Faults fire at most once, when the
    rank posts the chosen send; :attr:`fired` lists those that did.

    - DROP: the send is not posted.
    - DELAY: the other sends and the receives of the batch are posted, then the rank sleeps
      ``delay`` seconds (``inner.pause`` where the transport has it) and posts the late
      send, so the message arrives that much later.
    - CORRUPT: the send is posted with :func:`corrupt_payload` applied.
    - CRASH: :class:`RankCrashed` is raised before anything of that batch is posted.
    """

    def __init__(self, inner: Communicator, faults: Sequence[Fault]) -> None:
        super().__init__(inner)
        self._faults: dict[int, Fault] = {}
        for fault in check_faults(faults, inner.world_size):
            if fault.rank != inner.rank:
                continue
            if fault.message in self._faults:
                raise ValueError(f"two faults on rank {fault.rank} message {fault.message}")
            self._faults[fault.message] = fault
        self._posted = 0  # sends this rank has posted so far (the fault message index)
        self._fired: list[Fault] = []

    @property
    def fired(self) -> tuple[Fault, ...]:
        """The faults that have fired on this rank, in order."""
        return tuple(self._fired)

    def start(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> Request:
        first = self._posted
        chosen = {i: self._faults.get(first + i) for i in range(len(sends))}
        for i, fault in chosen.items():
            if fault is not None and fault.kind is FaultKind.CRASH:
                self._fired.append(fault)
                raise RankCrashed(f"injected crash on rank {self.rank} at message {first + i}")
        self._posted += len(sends)
        now: list[Send] = []
        late: list[tuple[float, Send]] = []
        for i, send in enumerate(sends):
            fault = chosen[i]
            if fault is None:
                now.append(send)
                continue
            self._fired.append(fault)
            if fault.kind is FaultKind.CORRUPT:
                now.append(Send(send.dest, send.tag, corrupt_payload(send.payload)))
            elif fault.kind is FaultKind.DELAY:
                late.append((fault.delay, send))
            # DROP: the message is simply never posted.
        request = self._inner.start(now, recvs)
        late_requests: list[Request] = []
        posted_at = time.monotonic()
        # a transport that can wait without holding up the others (the simulated cluster's
        # ranks take turns) says how; elsewhere the rank sleeps, as a slow process would
        pause = getattr(self._inner, "pause", time.sleep)
        for delay, send in sorted(late, key=lambda item: item[0]):
            pause(max(0.0, posted_at + delay - time.monotonic()))
            late_requests.append(self._inner.start([send], []))
        return _FaultyRequest(request, late_requests)
