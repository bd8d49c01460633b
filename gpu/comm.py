"""The communicator protocol over torch.distributed (NCCL on GPUs, gloo on CPUs).

Each send packs its payload's tensors into one new contiguous buffer; each receive gets a
fresh buffer of the expected size, unpacked into views of the expected shapes on ``wait``.
A batch is posted with ``batch_isend_irecv``. Messages between two ranks match in posting
order (NCCL ignores tags), which the plan keeps the same on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ringsim.comm.base import Payload, Recv, Send, check_batch


def pack(payload: Payload) -> torch.Tensor:
    """A new flat buffer with every tensor of ``payload`` in order."""
    return torch.cat([t.reshape(-1) for t in payload])


def unpack(buffer: torch.Tensor, recv: Recv) -> Payload:
    sizes = [math.prod(s) for s in recv.shapes]
    return tuple(p.view(s) for p, s in zip(torch.split(buffer, sizes), recv.shapes))


class TorchDistRequest:
    def __init__(
        self, works, buffers: list[torch.Tensor], recvs: Sequence[Recv], keep: list[torch.Tensor]
    ):
        self.works, self.buffers, self.recvs = works, buffers, recvs
        self.keep = keep  # send buffers stay alive until the batch completes

    def wait(self) -> list[Payload]:
        for work in self.works:
            work.wait()
        self.keep = []
        return [unpack(b, r) for b, r in zip(self.buffers, self.recvs)]


class TorchDistCommunicator:
    """:class:`ringsim.comm.Communicator` over a torch.distributed process group.

    Args:
        group: the process group (default: the default group); ranks are group ranks.
        device: where receive buffers live (default: the device of the first payload, or
            the current CUDA device under NCCL, else the CPU).
    """

    def __init__(self, group=None, device: torch.device | None = None):
        if not dist.is_initialized():
            raise RuntimeError(
                "group: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first, or pass comm="
            )
        self.group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        self.device = device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _peer(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def start(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> TorchDistRequest:
        check_batch(sends, recvs, rank=self._rank, world_size=self._world_size)
        device = self.device or next(
            (s.payload[0].device for s in sends if s.payload), torch.device("cpu")
        )
        ops, keep, buffers = [], [], []
        for s in sends:
            buffer = pack(s.payload)
            keep.append(buffer)
            ops.append(dist.P2POp(dist.isend, buffer, self._peer(s.dest), self.group, s.tag))
        for r in recvs:
            buffer = torch.empty(sum(math.prod(s) for s in r.shapes), dtype=r.dtype, device=device)
            buffers.append(buffer)
            ops.append(dist.P2POp(dist.irecv, buffer, self._peer(r.source), self.group, r.tag))
        works = dist.batch_isend_irecv(ops) if ops else []
        return TorchDistRequest(works, buffers, recvs, keep)

    def exchange(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> list[Payload]:
        return self.start(sends, recvs).wait()

    def allgather(self, obj: object) -> list[object]:
        gathered: list[object] = [None] * self._world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered
