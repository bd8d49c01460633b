"""Small device tensors built on the host (index tables, the mixing kernels' tables), kept by
key for the next calls, and copied so that a CUDA graph capture can replay them."""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

_KEEP: list[list] = []  # the keep-list of the capture in progress, if any


@contextlib.contextmanager
def keeping():
    """While a forward is captured (:mod:`ringsim.gpu.executor.graphs`): yields the list that
    keeps the host buffers the captured copies read at replay."""
    kept: list = []
    _KEEP.append(kept)
    try:
        yield kept
    finally:
        _KEEP.pop()


def capturing() -> bool:
    """Whether ``cuda_graph=True`` is capturing a forward right now."""
    return bool(_KEEP)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` copied to ``device`` the way a capture can replay: from pinned memory,
    without blocking, the pinned buffer kept as long as the graph being captured (a replay
    copies from it again). On the CPU, ``host`` itself."""
    if device.type != "cuda":
        return host
    host = host.pin_memory()
    if capturing():
        _KEEP[-1].append(host)
    return host.to(device, non_blocking=True)


class DeviceCache:
    """Small device tensors built on the host (index tables), kept by key for the next calls.

    Entries are per CUDA stream: a tensor is only read, and freed on eviction, on the stream
    that copied it. While a graph is being captured the cache is not used: the tensor is
    built and copied inside the capture, which then owns it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple, device: torch.device, build) -> torch.Tensor:
        """The tensor for ``key`` on ``device``; ``build()`` makes it on the host if new."""
        if capturing():
            return to_device(build(), device)
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (key, device, stream)
        value = self.entries.pop(key, None)
        if value is None:
            value = to_device(build(), device)
        self.entries[key] = value
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value
