"""Autograd for the ring (the single device's is the operator of
:mod:`ringsim.gpu.executor.operator`).

- :class:`RingFunction`: one rank of the ring; its backward runs the ring again
  (:func:`ringsim.gpu.ring.rank.ring_backward`), so every rank must call backward.
- :class:`SimulatedRingFunction`: global tensors over the simulated cluster; its backward
  runs every virtual rank's backward ring in the cluster's threads.

Each returns ``out`` (q's dtype) and ``lse (b, h, n)``, and keeps them. A gradient
reaching lse (``dlse``) needs the math kernel.
"""

from __future__ import annotations

import torch

from ringsim.comm.traced import run_traced
from ringsim.layout import shard, unshard

from ..executor.operator import keep, refuse_double_backward, restore
from ..kernels import Dropout
from .rank import ring_backward, ring_forward


class RingFunction(torch.autograd.Function):
    """One rank of the ring:
    ``apply(q, k, v, config, comm, kernel, trace, backward_trace, layout, pad, dropout_p,
    pool)`` (pad: the rank's key bias, or None; dropout_p: attention dropout's probability;
    pool: the rank's memory pool, or None)."""

    @staticmethod
    def forward(ctx, q, k, v, config, comm, kernel, trace, backward_trace, layout, pad=None,
                dropout_p=0.0, pool=None):  # fmt: skip
        """:func:`~ringsim.gpu.ring.rank.ring_forward` on this rank; keeps q, k, v, out, lse
        and the rank's dropout record."""
        ctx.config, ctx.comm, ctx.kernel, ctx.trace = config, comm, kernel, backward_trace
        ctx.layout, ctx.pad, ctx.dropout, ctx.pool = layout, pad, Dropout(dropout_p), pool
        results = ring_forward(q, k, v, config, comm, kernel, trace, layout, pad, ctx.dropout,
                               pool)  # fmt: skip
        return keep(ctx, q, k, v, *results)

    @staticmethod
    def backward(ctx, dout, dlse):
        """:func:`~ringsim.gpu.ring.rank.ring_backward` on this rank: dq, dk, dv."""
        refuse_double_backward()
        grads = ring_backward(*restore(ctx, dout, dlse), ctx.config, ctx.comm, ctx.kernel,
                              ctx.trace, ctx.layout, ctx.pad, ctx.dropout, ctx.pool)  # fmt: skip
        return (*grads, *[None] * 9)


def _shards(x: torch.Tensor, world_size: int, layout, dim: int = 1) -> list[torch.Tensor]:
    """Every rank's shard of ``x`` along ``dim`` (:func:`ringsim.layout.shard`)."""
    return [shard(x, r, world_size, layout=layout, axis=dim) for r in range(world_size)]


class SimulatedRingFunction(torch.autograd.Function):
    """Global tensors over ``world_size`` simulated ranks:
    ``apply(q, k, v, config, world_size, kernel, timeout, traces, layout, pad, dropout_p) ->
    (out, lse)``; ``traces`` (a list, or None) receives the forward's, then the backward's
    :class:`ringsim.trace.Trace`; ``pad``: the global key bias ``(b, n, h, 1)``, or None;
    ``dropout_p``: attention dropout's probability (each virtual rank keeps its record)."""

    @staticmethod
    def forward(ctx, q, k, v, config, world_size, kernel, timeout, traces, layout, pad=None,
                dropout_p=0.0):  # fmt: skip
        """Every virtual rank's forward in the cluster's threads; keeps the global tensors."""
        shards = list(zip(*(_shards(x, world_size, layout) for x in (q, k, v))))
        pads = [None] * world_size if pad is None else _shards(pad, world_size, layout)
        drops = [Dropout.seeded(dropout_p) for _ in range(world_size)]

        def run_rank(comm, trace):
            return ring_forward(*shards[comm.rank], config, comm, kernel, trace, layout,
                                pads[comm.rank], drops[comm.rank])  # fmt: skip

        results, trace = run_traced(world_size, run_rank, timeout=timeout)
        if traces is not None:
            traces.append(trace)
        out = unshard([r[0] for r in results], layout=layout)
        lse = unshard([r[1] for r in results], layout=layout, axis=-1)  # (b, h, n)
        ctx.config, ctx.world_size, ctx.kernel = config, world_size, kernel
        ctx.timeout, ctx.traces, ctx.layout, ctx.pads = timeout, traces, layout, pads
        ctx.drops = drops
        return keep(ctx, q, k, v, out, lse)

    @staticmethod
    def backward(ctx, dout, dlse):
        """Every virtual rank's backward ring in the cluster's threads: dq, dk, dv."""
        refuse_double_backward()
        q, k, v, out, lse, dout, dlse = restore(ctx, dout, dlse)
        p, layout = ctx.world_size, ctx.layout
        per_rank = [_shards(x, p, layout) for x in (q, k, v, out)]
        # lse (b, h, n): positions last
        per_rank += [_shards(lse, p, layout, dim=-1), _shards(dout, p, layout)]
        shards = list(zip(*per_rank))
        dlse_shards = [None] * p if dlse is None else _shards(dlse, p, layout, dim=-1)

        def run_rank(comm, trace):
            return ring_backward(
                *shards[comm.rank],
                dlse_shards[comm.rank],
                ctx.config,
                comm,
                ctx.kernel,
                trace,
                layout,
                ctx.pads[comm.rank],
                ctx.drops[comm.rank],
            )

        results, trace = run_traced(p, run_rank, timeout=ctx.timeout)
        if ctx.traces is not None:
            ctx.traces.append(trace)
        grads = (unshard([r[i] for r in results], layout=layout) for i in range(3))
        return (*grads, *[None] * 8)
