"""Dilated attention on one device, in torch (spec §2, §4, §6): the step executor at P = 1.

On one device the plan (:func:`ringsim.plan.rank_plan` with one rank) has a single step in
which every block is the device's own: one batch per pair (two for a pair with a ragged
last segment), whose segments become the batch dimension of its kernel calls. The forward
and backward executors (:mod:`ringsim.gpu.executor.forward`, :mod:`.backward`) run those
batches exactly as they run each step of the ring: strided views and one mixing pass for
aligned configurations, gathered row batches and float32 accumulators otherwise. Rows are
selected by global positions, so ragged segments, r > w and r not dividing w are exact (no
mask is needed: every block is FULL or the square CAUSAL diagonal).

The autograd is the operator ``torch.ops.ringsim.dilated_attention``
(:mod:`ringsim.gpu.executor.operator`): the forward keeps ``(q, k, v, out, lse)``, the
backward runs the kernels' own backward with the final out and lse. With dropout the
autograd function :class:`~ringsim.gpu.executor.operator.DropoutFunction` does, eagerly: it
carries the record of each call's random state from the forward to the backward.

Under ``torch.compile`` the checks here are traced (they read shapes, not data); those that
read data (alignment, the kernel choice) run inside the operator, and a float
``key_padding_mask`` is not searched for NaN there (one host sync, a graph break).
"""

from __future__ import annotations

import torch

from ringsim.config import check_flags, validate

from ..kernels import Dropout, Kernel, as_kernel
from .checks import check_differentiable, check_dropout_p, key_bias, needs_grad, prepare
from .operator import DropoutFunction, dilated_forward, dilated_operator
from .pool import MemoryPool, check_pool, pool_number


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths,
    dilation_rates,
    *,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    kernel: Kernel | str | None = None,
    cuda_graph: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    memory_pool: MemoryPool | None = None,
):
    """Dilated attention on one device (spec §6).

    Args:
        q, k, v: ``(batch, seq_len, num_heads, head_dim)`` floating-point tensors, one dtype
            and device; k and v may have fewer heads, a divisor of q's (grouped-query
            attention: :func:`repeat_kv` repeats them per query head, so K/V memory grows by
            the ratio; the ring sends K/V heads instead).
        segment_lengths, dilation_rates, is_causal, mode, softmax_scale: as
            :func:`ringsim.reference.dilated_attention`.
        return_lse: also return lse ``(batch, num_heads, seq_len)``, float32 (float64 for
            float64 input), natural log, ``-inf`` on rows with no key.
        kernel: a :class:`~ringsim.gpu.kernels.Kernel` to use; by default the fastest that
            can run (:func:`~ringsim.gpu.kernels.choose_kernel`). Asking for one that cannot
            run raises ``ValueError`` with the reason.
        cuda_graph: replay the forward as a CUDA graph (:mod:`ringsim.gpu.executor.graphs`): one
            launch instead of dozens, for a host too slow to issue them. Forward only,
            CUDA, aligned configurations; otherwise ``ValueError`` says why.
        key_padding_mask: ``(batch, seq_len)`` on q's device: bool, True = padding (such a
            position is never a key of any pattern; a row left with no key gives 0), or
            float, added to every score of each key (:func:`key_bias`). Runs the
            gathered-rows path and a kernel that takes a mask (efficient on CUDA, math or
            flash_cpu on the CPU: Note [The kernel choice]).
        dropout_p: attention dropout, in ``[0, 1)``: each probability dropped with this
            probability, the rest scaled by ``1 / (1 - dropout_p)``; the patterns mix with
            the weights of the scores before dropout (Note [Dropout] in
            :mod:`ringsim.gpu.kernels.dropout`). Reproducible under ``torch.manual_seed``.
            It runs the gathered-rows path with flash, efficient or math, eagerly (under
            ``torch.compile`` a graph break). Applied whenever > 0, as
            ``scaled_dot_product_attention`` applies it: pass 0 in eval.
        memory_pool: a :class:`~ringsim.gpu.executor.pool.MemoryPool` that keeps the working
            buffers across calls of the same shapes (Note [The memory pool]); calls on one
            pool follow each other on one stream. Not with ``cuda_graph``.
    Returns:
        out ``(batch, seq_len, num_heads, head_dim)`` in q's dtype [, lse].
    """
    check_flags(return_lse=return_lse)
    config = validate(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        mode=mode,
        softmax_scale=softmax_scale,
        allow_gqa=True,
    )
    k, v = repeat_kv(q, k, v)
    fields = (list(config.segment_lengths), list(config.dilation_rates), config.is_causal,
              config.mode.value, config.softmax_scale)  # fmt: skip
    dropout_p = check_dropout_p(dropout_p)
    check_pool(memory_pool, cuda_graph)
    if dropout_p > 0:
        return _with_dropout(q, k, v, config, kernel, key_padding_mask, dropout_p, return_lse,
                             cuda_graph, memory_pool)  # fmt: skip
    if torch.compiler.is_compiling() and not cuda_graph:  # data checks: inside the operator
        pad = key_bias(key_padding_mask, q)
        if kernel is not None:
            check_differentiable(q, k, v, as_kernel(kernel))
        requested = "" if kernel is None else as_kernel(kernel).value
        out, lse = dilated_operator(q, k, v, pad, *fields, requested, return_lse,
                                    pool_number(memory_pool))  # fmt: skip
        return (out, lse) if return_lse else out
    pad = key_bias(key_padding_mask, q)
    q, k, v, chosen = prepare(q, k, v, kernel, config.softmax_scale, masked=pad is not None)
    if cuda_graph and pad is not None:
        raise ValueError("cuda_graph: the graphed forward takes no key_padding_mask")
    if cuda_graph:
        from .graphs import graph_refusal, graphed_forward

        refusal = graph_refusal(q, config, needs_grad(q, k, v))
        if refusal is not None:
            raise ValueError(f"cuda_graph: the graphed forward {refusal}")
        out, lse = graphed_forward(dilated_forward, q, k, v, config, chosen)
        return (out, lse) if return_lse else out
    check_differentiable(q, k, v, chosen)
    out, lse = dilated_operator(q, k, v, pad, *fields, chosen.value, return_lse,
                                pool_number(memory_pool))  # fmt: skip
    return (out, lse) if return_lse else out


def _with_dropout(q, k, v, config, kernel, key_padding_mask, p: float, return_lse, cuda_graph,
                  pool):  # fmt: skip
    """:func:`dilated_attention` with attention dropout (its argument checks made)."""
    if cuda_graph:
        raise ValueError("cuda_graph: the graphed forward takes no dropout")
    pad = key_bias(key_padding_mask, q)
    q, k, v, chosen = prepare(q, k, v, kernel, config.softmax_scale, masked=pad is not None,
                              dropout=True)  # fmt: skip
    check_differentiable(q, k, v, chosen)
    out, lse = DropoutFunction.apply(q, k, v, config, chosen, pad, Dropout(p), pool)
    return (out, lse) if return_lse else out


def repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """k, v with q's heads: each K/V head repeated for the query heads that read it
    (grouped-query attention, spec §1; query head h reads K/V head ``h // ratio``).

    On one device the kernels then see equal heads, at the cost of K/V memory times the
    ratio; autograd sums the repeated heads' gradients into dk, dv. Equal heads: unchanged.
    """
    ratio = q.shape[2] // k.shape[2]
    if ratio == 1:
        return k, v
    return k.repeat_interleave(ratio, dim=2), v.repeat_interleave(ratio, dim=2)
