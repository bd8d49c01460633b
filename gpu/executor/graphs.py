"""The single-device forward replayed as a CUDA graph: one launch instead of dozens.

For short sequences the forward's kernels are short, and a slow host may not issue them
(a dozen attention calls, gathers and the mix for r = 1..16 at 32K) as fast as the GPU runs
them. Captured once as a CUDA graph, the whole forward replays with a single launch; the
copies of the inputs and outputs it needs cost more than that on a fast host (see
``docs/gpu.md``). ``dilated_attention(..., cuda_graph=True)`` asks for it:

1. the first call for a given (shape, dtype, device, configuration, kernel) allocates static
   inputs, runs the forward three times on a side stream (warm-up, as CUDA graph capture
   requires), and captures it;
2. every call copies q, k, v into the static inputs, replays the graph, and returns clones
   of the static out and lse (a later replay overwrites them).

It is forward only (no autograd) and needs an aligned configuration (every pattern group on
strided views): the ragged path builds index tensors on the host, which a graph cannot
capture. Both are checked before any work and refused with a ``ValueError``, never worked
around. The graphs of the last :data:`CACHE_SIZE` problems are kept, with their memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ringsim.config import DilatedConfig

from ..kernels import Kernel
from .cache import keeping

CACHE_SIZE = 4


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    out: torch.Tensor
    lse: torch.Tensor
    kept: list  # what the captured work reads at replay besides its memory pool


_CACHE: OrderedDict[tuple, _Graph] = OrderedDict()


def graph_refusal(q: torch.Tensor, config: DilatedConfig, grad: bool) -> str | None:
    """Why the forward of ``q (b, n, h, d)`` cannot run as a CUDA graph (None: it can)."""
    if not q.is_cuda:
        return "needs a CUDA device"
    if grad:
        return "is forward only: run under torch.no_grad() or with inputs not requiring grad"
    if not config.is_aligned(q.shape[1]):
        return "needs an aligned configuration (w' divides n and r divides w' for every pair)"
    return None


def _capture(forward, q, k, v, config: DilatedConfig, kernel: Kernel) -> _Graph:
    inputs = tuple(x.clone() for x in (q, k, v))
    side = torch.cuda.Stream(q.device)
    side.wait_stream(torch.cuda.current_stream(q.device))
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture (allocator, kernel selection)
            forward(*inputs, config, kernel)
    torch.cuda.current_stream(q.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with keeping() as kept, torch.cuda.graph(graph):
        out, lse = forward(*inputs, config, kernel)
    return _Graph(graph, inputs, out, lse, kept)  # type: ignore[arg-type]


def graphed_forward(forward, q, k, v, config: DilatedConfig, kernel: Kernel):
    """``forward(q, k, v, config, kernel) -> (out, lse)`` replayed from a cached CUDA graph;
    the caller has checked :func:`graph_refusal`."""
    key = (tuple(q.shape), q.dtype, q.device, config, kernel)
    entry = _CACHE.pop(key, None)
    if entry is None:
        entry = _capture(forward, q, k, v, config, kernel)
    _CACHE[key] = entry  # most recently used last
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    for static, x in zip(entry.inputs, (q, k, v)):
        static.copy_(x)
    entry.graph.replay()
    return entry.out.clone(), entry.lse.clone()


def clear_graphs() -> None:
    """Drop every cached graph and its memory."""
    _CACHE.clear()
