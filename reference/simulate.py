"""Ring dilated attention on global arrays, over the in-process simulated cluster.

The global arrays are cut into shards (:func:`ringsim.layout.shard`, in the chosen layout)
*before* the ranks start; each rank's thread receives copies of its own shards only and runs
:func:`~ringsim.reference.ring.ring_dilated_attention_shard`, the same code MPI runs. The
shards of out and lse are gathered afterwards. No MPI, no torch, any world size (pitfall 15).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ringsim.cases import Case
from ringsim.comm.faults import Fault
from ringsim.comm.traced import run_traced
from ringsim.config import check_flags, check_key_padding, validate
from ringsim.layout import check_layout, shard, unshard

from .backward import validate_backward
from .dilated import check_float
from .ring import ring_dilated_attention_shard
from .ring_backward import ring_dilated_attention_shard_backward


def _shards(x: np.ndarray, world_size: int, layout: str, axis: int = 1) -> list[np.ndarray]:
    """Every rank's shard of ``x`` (:func:`ringsim.layout.shard`), rank 0 first."""
    return [shard(x, r, world_size, layout=layout, axis=axis) for r in range(world_size)]


def _mask_shards(mask, q, world_size: int, layout: str) -> list:
    """Every rank's shard of a global key padding mask (checked first), or Nones."""
    if check_key_padding(mask, q.shape[0], q.shape[1]) is None:
        return [None] * world_size
    return _shards(mask, world_size, layout)


def run_case(case: Case, q, k, v, *, timeout: float = 60.0):
    """``case``'s configuration on its ``world_size`` simulated ranks, on global q, k, v:
    out, lse and the :class:`ringsim.trace.Trace` (what the CLI, ``ringsim verify`` and the
    ring tests run)."""
    return ring_dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, world_size=case.world_size,
        **case.kwargs(), layout=case.layout, return_lse=True, return_trace=True, timeout=timeout,
    )  # fmt: skip


def ring_dilated_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    segment_lengths,
    dilation_rates,
    *,
    world_size: int,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    return_trace: bool = False,
    faults: Sequence[Fault] = (),
    timeout: float = 60.0,
    checksums: bool = False,
    layout: str = "contiguous",
    key_padding_mask: np.ndarray | None = None,
):
    """Ring dilated attention of global arrays on ``world_size`` simulated ranks (spec §6).

    Args:
        q, k, v: ``(batch, seq_len, num_heads, head_dim)``, float32 or float64;
            ``seq_len % world_size == 0`` (zigzag: ``seq_len % (2 * world_size) == 0``); k
            and v may have fewer heads (grouped-query attention).
        world_size: the number of simulated ranks P.
        segment_lengths, dilation_rates, is_causal, mode, softmax_scale: as
            :func:`ringsim.reference.dilated_attention`.
        return_lse: also return the lse ``(batch, num_heads, seq_len)``.
        return_trace: also return the :class:`ringsim.trace.Trace` of the run.
        faults: faults to inject (:class:`ringsim.comm.Fault`), for testing failure paths.
        timeout: seconds any rank may wait for one message before the run fails.
        checksums: seal every message with a CRC-32 checked on receipt, so that a corrupted
            message fails the run at once, naming the rank, step and sub-ring
            (:class:`ringsim.comm.CorruptMessage`).
        layout: which positions each rank holds, ``"contiguous"`` or ``"zigzag"``
            (:mod:`ringsim.layout`); the results are in global order either way.
        key_padding_mask: ``(batch, seq_len)`` bool, True = padding (spec §1); each rank
            gets its shard, which travels with its keys.
    Returns:
        the gathered global out ``(batch, seq_len, num_heads, head_dim)`` [, lse][, trace].
    Raises:
        ``ValueError``/``TypeError`` for bad input (before any rank starts);
        :class:`ringsim.comm.CommError` when a rank fails, a message never comes, or the
        ring deadlocks.
    """
    check_flags(return_lse=return_lse, return_trace=return_trace, checksums=checksums)
    config = validate(
        q, k, v, segment_lengths, dilation_rates, is_causal=is_causal, mode=mode,
        softmax_scale=softmax_scale, world_size=world_size, allow_gqa=True,
    )  # fmt: skip
    check_float(q)
    check_layout(layout, q.shape[1], world_size)
    shards = list(zip(*(_shards(x, world_size, layout) for x in (q, k, v))))
    pads = _mask_shards(key_padding_mask, q, world_size, layout)
    del q, k, v  # from here on, every array a rank touches is its own shard

    def run_rank(comm, trace):
        return ring_dilated_attention_shard(
            *shards[comm.rank],
            config.segment_lengths,
            config.dilation_rates,
            comm=comm,
            **config.kwargs(),
            return_lse=True,
            trace=trace,
            layout=layout,
            key_padding_mask=pads[comm.rank],
        )

    results, trace = run_traced(
        world_size, run_rank, faults=faults, timeout=timeout, checksums=checksums
    )
    out = unshard([r[0] for r in results], layout=layout)
    lse = unshard([r[1] for r in results], layout=layout, axis=-1)
    extra = ((lse,) if return_lse else ()) + ((trace,) if return_trace else ())
    return (out, *extra) if extra else out


def ring_dilated_attention_backward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, lse: np.ndarray,
    dout: np.ndarray, segment_lengths, dilation_rates, *, world_size: int,
    is_causal: bool = False, mode: str = "longnet", softmax_scale: float | None = None,
    dlse: np.ndarray | None = None, return_trace: bool = False, faults: Sequence[Fault] = (),
    timeout: float = 60.0, checksums: bool = False, layout: str = "contiguous",
    key_padding_mask: np.ndarray | None = None,
):  # fmt: skip
    """The backward of :func:`ring_dilated_attention` on ``world_size`` simulated ranks.

    Args:
        q, k, v: as given to :func:`ring_dilated_attention`, like ``segment_lengths``,
            ``dilation_rates``, ``world_size``, ``is_causal``, ``mode`` and ``softmax_scale``.
        out, lse: what it returned: out ``(batch, seq_len, num_heads, head_dim)``, lse
            ``(batch, num_heads, seq_len)``.
        dout: the gradient of the loss with respect to out, shaped like out.
        dlse: the gradient with respect to lse, shaped like lse (None: lse unused).
        return_trace: also return the :class:`ringsim.trace.Trace` of the backward run.
        faults, timeout, checksums, layout, key_padding_mask: as
            :func:`ring_dilated_attention`.
    Returns:
        the gathered global ``(dq, dk, dv)`` [, trace].
    """
    check_flags(return_trace=return_trace, checksums=checksums)
    config = validate_backward(
        q, k, v, out, lse, dout, dlse, segment_lengths, dilation_rates,
        is_causal=is_causal, mode=mode, softmax_scale=softmax_scale, world_size=world_size,
    )  # fmt: skip
    check_layout(layout, q.shape[1], world_size)
    per_rank = [_shards(x, world_size, layout) for x in (q, k, v, out)]
    per_rank.append(_shards(lse, world_size, layout, axis=-1))
    per_rank.append(_shards(dout, world_size, layout))
    dlse_shards = [None] * world_size if dlse is None else _shards(dlse, world_size, layout, -1)
    pads = _mask_shards(key_padding_mask, q, world_size, layout)
    shards = list(zip(*per_rank))
    del q, k, v, out, lse, dout, dlse  # from here on, every array a rank touches is its own

    def run_rank(comm, trace):
        return ring_dilated_attention_shard_backward(
            *shards[comm.rank],
            config.segment_lengths,
            config.dilation_rates,
            comm=comm,
            **config.kwargs(),
            dlse=dlse_shards[comm.rank],
            trace=trace,
            layout=layout,
            key_padding_mask=pads[comm.rank],
        )

    results, trace = run_traced(
        world_size, run_rank, faults=faults, timeout=timeout, checksums=checksums
    )
    grads = tuple(unshard([r[i] for r in results], layout=layout) for i in range(3))
    return (*grads, trace) if return_trace else grads
