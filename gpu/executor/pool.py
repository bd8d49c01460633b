"""A memory pool for the executor's own buffers, kept across calls of the same shapes.

Note [The memory pool]
----------------------
Each call of the executor allocates its working buffers: the float32 accumulators of out
and lse (the accumulate path), the lse the mix writes, the float32 totals of dq, dk, dv
(the backward), and on a ring the buffers each received K/V block and dK/dV share lands
in. PyTorch's caching allocator already serves them without a device allocation in
steady state; a :class:`MemoryPool` goes further and keeps the tensors themselves, so that
a call with the shapes of an earlier one takes the same buffers and asks the allocator for
none of them. What stays the allocator's: the kernels' own outputs (PyTorch's attention
kernels take no output buffer) and the executor's small temporaries. What it costs is
memory: the pooled buffers stay allocated between calls, up to ``max_bytes``; a buffer
past that bound is allocated for the call and not kept. On a ring every batch of a call
receives into buffers of its own (:class:`ringsim.gpu.ring.comm.PooledReceives`), so the
pool holds every step's received blocks, between calls too, where a call without it has
about two steps' worth alive at once; they are received into directly (no copy).

Safety:

- a buffer is keyed by its role, shape, dtype, device and the CUDA stream current when
  it is taken; within one call every buffer has its own role, so no two live buffers
  share one;
- what a call returns is never a pooled buffer (the executor copies out of it), so the
  next call cannot overwrite a result the caller holds;
- calls on one stream run in order, so the next call's work on a buffer starts after the
  last one's ends (the executor's side streams join the call's stream before it ends);
  calls on different streams, which may run at once, take different buffers;
- under CUDA graph capture (``torch.cuda.graph`` captures on a stream of its own) a call
  takes buffers of its own, which each replay reuses and which stay the graph's as long as
  the pool lives; ``dilated_attention(..., cuda_graph=True)`` replays its own static
  buffers and takes no pool.

:attr:`MemoryPool.hits` and :attr:`MemoryPool.misses` count the buffers taken from the pool
and those allocated (the profile and the benchmark report them).
"""

from __future__ import annotations

import weakref

import torch


class MemoryPool:
    """Buffers kept across calls (Note [The memory pool]).

    Args:
        max_bytes: the most bytes the pool keeps (default 4 GiB); a buffer that would pass
            it is allocated per call instead.
    """

    def __init__(self, max_bytes: int = 4 << 30) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes: expected an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds."""
        return sum(t.nbytes for t in self.buffers.values())

    def take(self, role, shape, dtype: torch.dtype, device, fill: float | None = None):
        """A buffer of ``shape`` and ``dtype`` on ``device`` for ``role`` (any hashable),
        filled with ``fill`` (None: left as it is): the pool's, or a new one, kept if the
        bound allows."""
        device = torch.device(device)
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (role, tuple(shape), dtype, device, stream)
        buffer = self.buffers.get(key)
        if buffer is None:
            self.misses += 1
            buffer = torch.empty(shape, dtype=dtype, device=device)
            if self.nbytes + buffer.nbytes <= self.max_bytes:
                self.buffers[key] = buffer
        else:
            self.hits += 1
        if fill is not None:
            buffer.fill_(fill)
        return buffer

    def holds(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is (a view of) one of the pool's buffers."""
        where = x.untyped_storage().data_ptr()
        return any(t.untyped_storage().data_ptr() == where for t in self.buffers.values())

    def clear(self) -> None:
        """Free every buffer (the counts stay)."""
        self.buffers.clear()

    def __repr__(self) -> str:
        return (f"MemoryPool({len(self.buffers)} buffers, {self.nbytes / 2**20:.1f} MiB, "
                f"hits={self.hits}, misses={self.misses})")  # fmt: skip


def buffer(pool: MemoryPool | None, role, shape, dtype, device, fill: float | None = None):
    """A working buffer: from ``pool`` (Note [The memory pool]), or allocated for this call
    (``fill``: 0 gives zeros, ``-inf`` a full tensor, None an empty one)."""
    if pool is not None:
        return pool.take(role, shape, dtype, device, fill)
    if fill is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if fill == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.full(shape, fill, dtype=dtype, device=device)


#: Pools by number, for the one-device operator, whose arguments are plain values.
_POOLS: dict[int, weakref.ref] = {}


def pool_number(pool: MemoryPool | None) -> int:
    """``pool`` as the number the operator takes (0: no pool)."""
    if pool is None:
        return 0
    _POOLS[id(pool)] = weakref.ref(pool)
    return id(pool)


def pool_of(number: int) -> MemoryPool | None:
    """The pool of :func:`pool_number`, or None (0, or a pool freed since)."""
    ref = _POOLS.get(number) if number else None
    return None if ref is None else ref()


def check_pool(pool, cuda_graph: bool = False) -> None:
    """``memory_pool``: None or a :class:`MemoryPool`, not with a CUDA graph."""
    if pool is None:
        return
    if not isinstance(pool, MemoryPool):
        raise TypeError(f"memory_pool: expected a MemoryPool or None, got {type(pool).__name__}")
    if cuda_graph:
        raise ValueError("memory_pool: a CUDA graph replays its own buffers; pass one of them")
