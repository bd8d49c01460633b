"""End-to-end message checksums, as a wrapper around any communicator (off by default).

The sender seals each payload with the CRC-32 of its bytes; the receiver recomputes it and
raises :class:`CorruptMessage`, naming the receiving rank, the sender and the tag, the
moment a message differs from what was sent. The ring loop adds the step and the sub-ring
(:meth:`CorruptMessage.located`). Without checksums a corrupted block is found only by
comparing the result with the definition afterwards.

The CRC travels as one more array of the payload: its 4 bytes, each an integer 0-255, in
the payload's own dtype (exact in every float dtype, bfloat16 included; a payload is one
dtype, as MPI packs it). A fault injected below this wrapper
(``ChecksummedCommunicator(FaultyCommunicator(...))``) corrupts the message in transit,
checksum included, as a bad link would.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from .base import CommError, Payload, Recv, Request, Send, WrappedCommunicator, delivered

#: The shape of the array a sealed payload carries at its end.
SEAL_SHAPE = (4,)


class CorruptMessage(CommError):
    """A message arrived with other bytes than its sender sealed."""

    def __init__(self, message: str, source: int, tag: int) -> None:
        super().__init__(message)
        self.source = source
        self.tag = tag

    def located(self, where: str) -> CorruptMessage:
        """The same error with ``where`` (the step and the block) added."""
        return CorruptMessage(f"{self} ({where})", self.source, self.tag)

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (str(self), self.source, self.tag))


def _bytes(array) -> bytes:
    """The bytes of a NumPy array or a torch tensor (any device, any dtype), C order."""
    if isinstance(array, np.ndarray):
        return np.ascontiguousarray(array).tobytes()
    import torch  # a tensor was given: torch is loaded already

    flat = array.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes()


def crc32(payload: Payload) -> int:
    """CRC-32 of the payload's arrays, in order."""
    value = 0
    for array in payload:
        value = zlib.crc32(_bytes(array), value)
    return value


def seal(payload: Payload) -> Payload:
    """``payload`` and one more array: the 4 bytes of its CRC-32, in its dtype and device."""
    digits = list(crc32(payload).to_bytes(4, "little"))
    if not payload or isinstance(payload[0], np.ndarray):
        dtype = payload[0].dtype if payload else np.float64
        return (*payload, np.array(digits, dtype=dtype))
    first = payload[0]
    return (*payload, first.new_tensor(digits))


def sealed(recv: Recv) -> Recv:
    """The receive of a sealed message: one more array, :data:`SEAL_SHAPE` (into new
    arrays: the checked payload is delivered into ``recv.into`` once unsealed)."""
    return Recv(recv.source, recv.tag, (*recv.shapes, SEAL_SHAPE), recv.dtype)


def unseal(payload: Payload, rank: int, recv: Recv) -> Payload:
    """The payload without its seal; :class:`CorruptMessage` if the CRC-32 differs."""
    *data, seal_array = payload
    digits = [float(x) for x in seal_array.tolist()]
    got = crc32(tuple(data))
    valid = all(d.is_integer() and 0 <= d <= 255 for d in digits)
    sent = int.from_bytes(bytes(int(d) for d in digits), "little") if valid else None
    if sent != got:
        said = f"{sent:#010x}" if sent is not None else f"not a checksum: {digits}"
        raise CorruptMessage(
            f"rank {rank} received a corrupted message from rank {recv.source} (tag "
            f"{recv.tag}): its bytes give CRC-32 {got:#010x}, its seal says {said}",
            recv.source,
            recv.tag,
        )
    return tuple(data)


class _CheckedRequest:
    def __init__(self, request: Request, rank: int, recvs: Sequence[Recv]) -> None:
        self._request = request
        self._rank = rank
        self._recvs = tuple(recvs)

    def wait(self) -> list[Payload]:
        payloads = self._request.wait()
        return [
            delivered(r, unseal(p, self._rank, r))
            for p, r in zip(payloads, self._recvs, strict=True)
        ]


class ChecksummedCommunicator(WrappedCommunicator):
    """``inner`` with every payload sealed on send and checked on receive."""

    def start(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> _CheckedRequest:
        sealed_sends = [Send(s.dest, s.tag, seal(s.payload)) for s in sends]
        request = self._inner.start(sealed_sends, [sealed(r) for r in recvs])
        return _CheckedRequest(request, self.rank, recvs)
