"""The torch ring on one device (or the CPU) as P virtual ranks of the simulated cluster."""

from __future__ import annotations

import torch

from ringsim.config import validate
from ringsim.simulate import run_traced

from .dilated import check_tensor
from .kernels import Kernel
from .ring import ring_dilated_attention


def simulated_ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths,
    dilation_rates,
    *,
    world_size: int,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    return_trace: bool = False,
    kernel: Kernel | str | None = None,
    timeout: float = 120.0,
):
    """Ring dilated attention of global tensors on ``world_size`` simulated ranks.

    Each rank gets copies of its own shards only and runs
    :func:`~ringsim.gpu.ring.ring_dilated_attention` over the simulated cluster; the
    shards of out and lse are gathered afterwards.

    Args:
        q, k, v: ``(batch, seq_len, num_heads, head_dim)``; ``seq_len % world_size == 0``.
        world_size, is_causal, mode, softmax_scale, kernel: as in the ring and
            :func:`ringsim.gpu.dilated_attention`.
        return_lse, return_trace: also return the lse ``(batch, num_heads, seq_len)`` and
            the :class:`ringsim.trace.Trace`.
    Returns:
        global out ``(batch, seq_len, num_heads, head_dim)`` [, lse][, trace].
    """
    config = validate(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        mode=mode,
        softmax_scale=softmax_scale,
        world_size=world_size,
    )
    check_tensor(q)
    shards = [
        tuple(x.clone() for x in part)
        for part in zip(q.chunk(world_size, 1), k.chunk(world_size, 1), v.chunk(world_size, 1))
    ]
    del q, k, v

    def run_rank(comm, trace):
        return ring_dilated_attention(
            *shards[comm.rank],
            config.segment_lengths,
            config.dilation_rates,
            comm=comm,
            **config.kwargs(),
            return_lse=True,
            kernel=kernel,
            trace=trace,
        )

    results, trace = run_traced(world_size, run_rank, timeout=timeout)
    out = torch.cat([r[0] for r in results], dim=1)
    lse = torch.cat([r[1] for r in results], dim=-1)
    extra = ((lse,) if return_lse else ()) + ((trace,) if return_trace else ())
    return (out, *extra) if extra else out
