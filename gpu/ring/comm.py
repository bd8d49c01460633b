"""The communicator protocol over torch.distributed (NCCL on GPUs, gloo on CPUs).

Each tensor of a payload is sent as it is, one point-to-point operation per tensor (no
packing copy: a block in the gathered layout is one contiguous tensor of K and one of V,
and with r = 1 over every head the rank's K/V shard itself); a tensor that is not contiguous
is copied first. Each receive gets fresh tensors of the expected shapes, or lands in the
tensors it names (``into``: :class:`PooledReceives` names a memory pool's). A step's batch is
posted with one ``batch_isend_irecv``, so NCCL runs it on its own stream while the compute
stream attends the blocks already held; ``wait`` makes the compute stream wait for it
without blocking the host. Messages between two ranks match in posting order (NCCL ignores
tags), which the plan keeps the same on both sides; tensors with no elements are not sent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.distributed as dist

from ringsim.comm.base import (
    Communicator,
    Payload,
    Recv,
    Request,
    Send,
    WrappedCommunicator,
    check_batch,
)

from ..executor.pool import MemoryPool


class TorchDistRequest:
    def __init__(self, works, received: list[Payload], keep: list[torch.Tensor]):
        self.works, self.received = works, received
        self.keep = keep  # sent tensors stay referenced until the batch completes

    def wait(self) -> list[Payload]:
        for work in self.works:
            work.wait()
        self.keep = []
        return self.received


class TorchDistCommunicator:
    """:class:`ringsim.comm.Communicator` over a torch.distributed process group.

    Args:
        group: the process group (default: the default group); ranks are group ranks.
        device: where receive buffers live (default: the current CUDA device under NCCL,
            else the device of the first payload, or the CPU).

    ``agreed`` remembers the configurations every rank has agreed on
    (:func:`ringsim.agree.agree`), so a ring that runs the same configuration again does not
    communicate to agree on it.
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
        self.agreed: OrderedDict[str, None] = OrderedDict()

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
        ops, keep, received = [], [], []
        for s in sends:
            for tensor in s.payload:
                if tensor.numel():
                    tensor = tensor if tensor.is_contiguous() else tensor.contiguous()
                    keep.append(tensor)
                    peer = self._peer(s.dest)
                    ops.append(dist.P2POp(dist.isend, tensor, peer, self.group, s.tag))
        for r in recvs:
            tensors = r.into or tuple(
                torch.empty(shape, dtype=r.dtype, device=device) for shape in r.shapes
            )
            received.append(tensors)
            for tensor in tensors:
                if tensor.numel():
                    peer = self._peer(r.source)
                    ops.append(dist.P2POp(dist.irecv, tensor, peer, self.group, r.tag))
        works = dist.batch_isend_irecv(ops) if ops else []
        return TorchDistRequest(works, received, keep)

    def exchange(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> list[Payload]:
        return self.start(sends, recvs).wait()

    def allgather(self, obj: object) -> list[object]:
        gathered: list[object] = [None] * self._world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered


class PooledReceives(WrappedCommunicator):
    """``inner``, receiving into ``pool``'s buffers (Note [The memory pool]).

    Each batch a ring call posts gets buffers of its own, keyed by ``role`` (the pass),
    the batch's number within the call and the receive's place in the batch: within a call
    no two receives share a buffer, so a block that is attended, sent on or added while
    the next ones arrive is never overwritten; the next call with the same shapes posts
    the same batches and takes the same buffers. Make one per ring call (the count starts
    at 0). What the pool cannot keep (its bound) is allocated for the call, as without it.
    """

    def __init__(self, inner: Communicator, pool: MemoryPool, role: str, device) -> None:
        super().__init__(inner)
        self.pool, self.role, self.device = pool, role, device
        self.batches = 0

    def start(self, sends: Sequence[Send], recvs: Sequence[Recv]) -> Request:
        batch, self.batches = self.batches, self.batches + 1
        take = self.pool.take
        pooled = [
            replace(r, into=tuple(take((self.role, batch, i, j), shape, r.dtype, self.device)
                                  for j, shape in enumerate(r.shapes)))
            for i, r in enumerate(recvs)
        ]  # fmt: skip
        return self._inner.start(sends, pooled)


def receiving(comm: Communicator, pool: MemoryPool | None, role: str, device) -> Communicator:
    """``comm`` for one ring call: receiving into ``pool`` (:class:`PooledReceives`), or as
    it is without one."""
    return comm if pool is None else PooledReceives(comm, pool, role, device)


_COMMS: dict[int, tuple[object, TorchDistCommunicator]] = {}


def communicator(group=None) -> TorchDistCommunicator:
    """The communicator of ``group`` (default: the default group), made once per process
    group, so that what it remembers (``agreed``) lasts from call to call."""
    if not dist.is_initialized():
        TorchDistCommunicator(group)  # raises the error that says what to do
    pg = dist.distributed_c10d._get_default_group() if group is None else group
    entry = _COMMS.get(id(pg))
    if entry is None or entry[0] is not pg:  # (the group object is kept: its id stays its own)
        entry = (pg, TorchDistCommunicator(group))
        _COMMS[id(pg)] = entry
    return entry[1]
