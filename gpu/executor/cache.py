"""Small device tensors built on the host (index tables, the mixing kernels' tables), kept by
key for the next calls, and copied so that a CUDA graph capture can replay them.

Note [Tables in CUDA graphs]
----------------------------
A captured graph reads, at every replay, the device tensors its kernels read at capture,
and the pinned host buffers its copies read. So:

- ``cuda_graph=True`` (:mod:`ringsim.gpu.executor.graphs`) owns its capture: the tables are
  built and copied inside it, and the graph's cache entry keeps their host buffers
  (:func:`keeping`), freed with the graph;
- a graph the caller captures (``torch.cuda.graph`` around our call) cannot tell us when it
  is freed, so what it reads is kept for the process's life: a cached table it reads is
  never freed (eviction from the cache drops only the cache's reference), and a table built
  during its capture keeps its pinned host buffer. That is a few KB per table (the mixing
  table of LongNet's 5 pairs and 16 heads: 5.6 KB on the device and as much pinned), about
  one per captured forward and 13 per backward.

Before, a caller's graph could read a cached index table that later calls evicted and the
allocator handed to other tensors.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

_KEEP: list[list] = []  # the keep-list of the capture in progress, if any

#: What graphs the caller captured read, by id (Note [Tables in CUDA graphs]): never freed.
CALLER_GRAPHS: dict[int, torch.Tensor] = {}

#: Every cache by name: what :func:`cache_report` counts.
CACHES: dict[str, DeviceCache] = {}


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


def caller_capturing(device: torch.device) -> bool:
    """Whether a graph the caller owns is being captured on ``device``'s current stream (asked
    on every table lookup: no device switch where ``device`` is the current one)."""
    if device.type != "cuda" or capturing():
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


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
    that copied it. While ``cuda_graph=True`` captures, the cache is not used: the tensor is
    built and copied inside the capture, which then owns it. While the caller captures, what
    the graph reads is kept for good (Note [Tables in CUDA graphs]).
    """

    def __init__(self, size: int, name: str) -> None:
        self.size, self.name = size, name
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        CACHES[name] = self

    def get(self, key: tuple, device: torch.device, build) -> torch.Tensor:
        """The tensor for ``key`` on ``device``; ``build()`` makes it on the host if new."""
        if capturing():
            return to_device(build(), device)
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (key, device, stream)
        if caller_capturing(device):
            return self._for_caller_graph(key, device, build)
        value = self.entries.pop(key, None)
        if value is None:
            self.misses += 1
            value = to_device(build(), device)
        else:
            self.hits += 1
        self.entries[key] = value
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value

    def _for_caller_graph(self, key: tuple, device: torch.device, build) -> torch.Tensor:
        """Note [Tables in CUDA graphs]: the cached tensor, kept for good; or, if none, one
        copied inside the capture, its pinned source kept for good. That one is not cached:
        it holds its values only when the graph replays."""
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            value = build().pin_memory()
            CALLER_GRAPHS[id(value)] = value
            return value.to(device, non_blocking=True)
        self.hits += 1
        CALLER_GRAPHS[id(value)] = value
        return value


def cache_report() -> dict[str, tuple[int, int]]:
    """``name -> (hits, misses)`` of every cache the executor reads: the plans
    (:func:`ringsim.plan.rank_plan`), the row batches (:func:`ringsim.batches.task_row_batches`)
    and the device tables (index tensors, the mixing kernels' tables). The seed's "pattern
    caching" is these; the profile prints them."""
    from ringsim.batches import task_row_batches
    from ringsim.plan import rank_plan

    report = {}
    for name, fn in (("plans", rank_plan), ("row batches", task_row_batches)):
        info = fn.cache_info()
        report[name] = (info.hits, info.misses)
    for name, cache in CACHES.items():
        report[name] = (cache.hits, cache.misses)
    return report
