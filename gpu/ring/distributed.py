"""The torch ring's entry point on one rank: ``ring_dilated_attention`` over
torch.distributed or any ringsim communicator (spec §5, §6). It validates, agrees on the
configuration with the other ranks, chooses the kernel and hands the shards to
:class:`~ringsim.gpu.ring.autograd.RingFunction`, whose forward and backward run the ring
(:mod:`ringsim.gpu.ring.rank`).
"""

from __future__ import annotations

import torch

from ringsim.agree import agreed_config
from ringsim.comm.base import Communicator
from ringsim.config import check_flags
from ringsim.layout import check_layout
from ringsim.trace import RankTrace

from ..executor import check_differentiable, check_dropout_p, key_bias, prepare
from ..executor.pool import MemoryPool, check_pool
from ..kernels import Kernel
from .autograd import RingFunction


def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths,
    dilation_rates,
    *,
    group=None,
    comm: Communicator | None = None,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    kernel: Kernel | str | None = None,
    trace: RankTrace | None = None,
    backward_trace: RankTrace | None = None,
    layout: str = "contiguous",
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    memory_pool: MemoryPool | None = None,
):
    """This rank's part of ring dilated attention, on local shards (spec §5, §6).

    Differentiable: the backward runs the ring again, so every rank must call backward, as
    with any torch.distributed collective. Over the simulated cluster on a GPU, one autograd
    engine thread serves every virtual rank, so their backward passes cannot wait for each
    other there: use :func:`~ringsim.gpu.simulated_ring_dilated_attention`, which runs the
    backward ring itself.

    Ranks agree on the configuration and shard shapes before the first ring of each new
    configuration (one collective; a repeated configuration communicates nothing:
    :func:`ringsim.agree.agree`).

    Args:
        q, k, v: this rank's shards ``(batch, seq_len / P, num_heads, head_dim)``, holding
            the global positions ``layout`` gives the rank (contiguous: ``[j*c, (j+1)*c)``;
            :func:`ringsim.shard` cuts them); k and v may have fewer heads, a divisor of q's
            (grouped-query attention: each message carries K/V heads, Note [Fewer K/V heads]
            in :mod:`ringsim.gpu.executor.base`).
        group: the torch.distributed process group (default: the default group), used
            when ``comm`` is None.
        comm: any ringsim communicator instead (e.g. a simulated cluster's).
        segment_lengths, dilation_rates, is_causal, mode, softmax_scale: as
            :func:`ringsim.gpu.dilated_attention`, with global positions.
        return_lse: also return this rank's lse ``(batch, num_heads, seq_len / P)``.
        kernel: the attention kernel (default: the fastest that can run).
        trace: a :class:`ringsim.trace.RankTrace` to record this rank's events in (None:
            nothing is recorded, no host work per task).
        backward_trace: another, for the events of the backward pass.
        layout: ``"contiguous"`` or ``"zigzag"`` (:mod:`ringsim.layout`; zigzag balances
            causal work), the same on every rank.
        key_padding_mask: this rank's shard ``(batch, seq_len / P)`` of the mask, in
            ``layout`` (:func:`ringsim.shard`), as :func:`ringsim.gpu.dilated_attention`
            takes the whole one; every rank passes one, or none does (checked together).
        dropout_p: attention dropout, as :func:`ringsim.gpu.dilated_attention` takes it; the
            same on every rank (checked together); each rank draws its own masks.
        memory_pool: this rank's :class:`~ringsim.gpu.executor.pool.MemoryPool` for the
            executor's working buffers and the blocks it receives (Note [The memory pool]),
            or None.
    Returns:
        this rank's out ``(batch, seq_len / P, num_heads, head_dim)`` in q's dtype [, lse],
        rows in the order of its shard.
    """
    if comm is None:
        from .comm import communicator

        comm = communicator(group)
    elif not all(hasattr(comm, a) for a in ("rank", "world_size", "start", "allgather")):
        raise TypeError(f"comm: expected a ringsim communicator, got {comm!r}")
    chosen: list[tuple] = []  # what prepare() made of this rank's tensors and kernel

    def check_rank(x) -> None:
        """Every check of this rank's input, kernel included, inside the agreement: a rank
        whose kernel cannot run fails with the others, not alone after they started."""
        check_flags(return_lse=return_lse)
        check_pool(memory_pool)
        masked, dropping = key_padding_mask is not None, check_dropout_p(dropout_p) > 0
        prepared = prepare(x, k, v, kernel, softmax_scale, masked=masked, dropout=dropping)
        check_differentiable(*prepared)
        chosen.append((*prepared, key_bias(key_padding_mask, x, heads=k.shape[2])))

    # devices, flags and the kernel (check_rank): every rank's verdict first
    config, _ = agreed_config(
        comm, q, k, v, segment_lengths, dilation_rates, is_causal=is_causal, mode=mode,
        softmax_scale=softmax_scale, check_array=check_rank, layout=layout,
        allow_gqa=True, key_padding=key_padding_mask is not None, dropout=dropout_p,
    )  # fmt: skip
    q, k, v, kernel_run, pad = chosen[0]
    out, lse = RingFunction.apply(
        q,
        k,
        v,
        config,
        comm,
        kernel_run,
        trace,
        backward_trace,
        check_layout(layout),
        pad,
        float(dropout_p),
        memory_pool,
    )
    return (out, lse) if return_lse else out
