"""The torch ring on one device (or the CPU) as P virtual ranks of the simulated cluster."""

from __future__ import annotations

import torch

from ringsim.config import check_flags, validate
from ringsim.layout import check_layout
from ringsim.trace import Trace

from ..executor import check_differentiable, check_dropout_p, key_bias, prepare
from ..kernels import Kernel
from .autograd import SimulatedRingFunction


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
    layout: str = "contiguous",
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
):
    """Ring dilated attention of global tensors on ``world_size`` simulated ranks.

    Each rank gets copies of its own shards only and runs the per-rank ring of
    :func:`~ringsim.gpu.ring_dilated_attention` over the simulated cluster; the shards of
    out and lse are gathered afterwards. Differentiable: the backward runs every rank's
    backward ring in the cluster's threads (:class:`~ringsim.gpu.autograd.SimulatedRingFunction`).

    Args:
        q, k, v: ``(batch, seq_len, num_heads, head_dim)``; ``seq_len % world_size == 0``
            (zigzag: ``seq_len % (2 * world_size) == 0``); k, v may have fewer heads
            (grouped-query attention), as in the ring.
        world_size, is_causal, mode, softmax_scale, kernel, layout: as in the ring and
            :func:`ringsim.gpu.dilated_attention`.
        key_padding_mask: ``(batch, seq_len)``, as :func:`ringsim.gpu.dilated_attention`
            takes it; each rank gets its shard.
        dropout_p: attention dropout, as :func:`ringsim.gpu.dilated_attention` takes it
            (Note [Dropout] in :mod:`ringsim.gpu.kernels.dropout` says which masks are
            reproducible here).
        return_lse, return_trace: also return the lse ``(batch, num_heads, seq_len)`` and
            the forward's :class:`ringsim.trace.Trace`.
    Returns:
        global out ``(batch, seq_len, num_heads, head_dim)`` [, lse][, trace].
    """
    check_flags(return_lse=return_lse, return_trace=return_trace)
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
        allow_gqa=True,
    )
    checked = check_layout(layout, q.shape[1], world_size)
    pad = key_bias(key_padding_mask, q, heads=k.shape[2])
    dropout_p = check_dropout_p(dropout_p)
    q, k, v, chosen = prepare(q, k, v, kernel, config.softmax_scale, masked=pad is not None,
                              dropout=dropout_p > 0)  # fmt: skip
    check_differentiable(q, k, v, chosen)
    traces: list[Trace] = []
    out, lse = SimulatedRingFunction.apply(
        q,
        k,
        v,
        config,
        world_size,
        chosen,
        timeout,
        traces if return_trace else None,
        checked,
        pad,
        dropout_p,
    )
    extra = ((lse,) if return_lse else ()) + ((traces[0],) if return_trace else ())
    return (out, *extra) if extra else out
