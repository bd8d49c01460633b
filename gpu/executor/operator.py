"""Dilated attention on one device as a PyTorch operator: ``torch.ops.ringsim.dilated_attention``
and its backward, ``torch.ops.ringsim.dilated_attention_backward``.

The forward keeps ``(q, k, v, out, lse)`` and the backward runs the kernels' own backward
with the final out and lse (exact through the LSE mixing, spec §4) instead of
differentiating the forward's merges. Registered as custom operators with fake
implementations, so that ``torch.compile`` sees one opaque call of known output shapes: no
graph break and no recompile for a fixed shape, however much host work (the plan, the kernel
choice, the executor) runs inside. The operator's arguments are plain values (the
configuration's fields, the kernel's name); every check that reads tensor data (16-byte
alignment, the kernel choice) runs inside, on the real tensors.

Note [The lse's gradient]
    A custom operator's backward is handed zeros for an output the loss does not read.
    The fused kernels take no gradient w.r.t. lse, so a backward whose lse was returned to
    the caller (``lse_used``) reads whether its gradient is all zeros (one host sync) and
    passes None then; otherwise the math kernel is needed, as before.

Registered with ``torch.library.define`` and ``impl`` rather than ``custom_op``, whose
eager call imports ``torch._dynamo`` (and with it Triton) on first use.
"""

from __future__ import annotations

import torch

from ringsim.config import DilatedConfig, make_config
from ringsim.plan import rank_plan

from ..kernels import Kernel, accumulator_dtype
from .backward import BackwardExecutor
from .checks import prepare
from .forward import ForwardExecutor
from .pool import pool_of


def dilated_forward(q, k, v, config: DilatedConfig, kernel: Kernel, pad=None, dropout=None,
                    pool=None):  # fmt: skip
    """The forward on one device, no autograd: out ``(b, n, h, d)`` in q's dtype and the
    lse ``(b, h, n)``, float32 or float64. ``pad``: the key bias
    (:func:`~ringsim.gpu.executor.checks.key_bias`); ``dropout``: a
    :class:`~ringsim.gpu.kernels.Dropout` that records its calls' random states; ``pool``: a
    :class:`~ringsim.gpu.executor.pool.MemoryPool` for the working buffers."""
    _, n, h, _ = q.shape
    plan = rank_plan(config, h, n, 1, 0)
    executor = ForwardExecutor(q, k, v, plan, config, kernel, pad, dropout, pool)
    executor.run(0, plan.steps[0].batches, {})
    return executor.finish()


def dilated_backward(q, k, v, out, lse, dout, dlse, config: DilatedConfig, kernel: Kernel,
                     pad=None, dropout=None, pool=None):  # fmt: skip
    """dq, dk, dv of dilated attention on one device, in q's dtype.

    Args:
        q, k, v, out, dout: ``(b, n, h, d)``; out is the forward's (final) output.
        lse, dlse: ``(b, h, n)``, the forward's lse and its gradient (None: lse unused).
        config, kernel, pad, dropout, pool: as the forward ran (dropout: its record,
            replayed).
    """
    _, n, h, _ = q.shape
    plan = rank_plan(config, h, n, 1, 0)
    executor = BackwardExecutor(q, k, v, out, lse, dout, dlse, plan, config, kernel, pad,
                                dropout, pool)  # fmt: skip
    executor.run(0, plan.steps[0].batches, {})
    return executor.finish()


def refuse_double_backward() -> None:
    """Every custom Function's backward starts here: its gradient is computed by the kernels,
    not by differentiable torch ops, so a graph of it (``create_graph=True``, as
    ``gradgradcheck`` and second-order methods build) would give wrong second derivatives.
    Refused with the reason instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "double backward: dilated attention's backward is not differentiable "
            "(create_graph=True); take second derivatives of ringsim.reference's NumPy "
            "functions by finite differences, or call backward without create_graph"
        )


def keep(ctx, q, k, v, out, lse):
    """Save what every backward needs; returns out and lse ``(b, h, n)``."""
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.set_materialize_grads(False)
    return out, lse


def restore(ctx, dout, dlse):
    """``(q, k, v, out, lse, dout, dlse)`` as the backward functions take them: dout
    contiguous (zeros when only lse was used), dlse ``(b, h, n)`` contiguous or None."""
    q, k, v, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    return q, k, v, out, lse, dout, dlse


def _config(segment_lengths, dilation_rates, is_causal, mode, softmax_scale) -> DilatedConfig:
    return make_config(tuple(segment_lengths), tuple(dilation_rates), is_causal=is_causal,
                       mode=mode, softmax_scale=softmax_scale)  # fmt: skip


torch.library.define(
    "ringsim::dilated_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? pad, int[] segment_lengths, int[] dilation_rates, "
    "bool is_causal, str mode, float? softmax_scale, str kernel, bool lse_used, int pool) "
    "-> (Tensor, Tensor)",
)
torch.library.define(
    "ringsim::dilated_attention_backward",
    "(Tensor q, Tensor k, Tensor v, Tensor? pad, Tensor out, Tensor lse, Tensor dout, "
    "Tensor? dlse, int[] segment_lengths, int[] dilation_rates, bool is_causal, str mode, "
    "float? softmax_scale, str kernel, int pool) -> (Tensor, Tensor, Tensor)",
)


@torch.library.impl("ringsim::dilated_attention", "default")
def _forward(q, k, v, pad, segment_lengths, dilation_rates, is_causal, mode, softmax_scale,
             kernel, lse_used, pool):  # fmt: skip
    """out ``(b, n, h, d)`` and lse ``(b, h, n)`` of validated inputs with equal heads (k, v
    repeated for grouped-query attention); ``kernel`` the name of the kernel asked for, ""
    for the fastest that can run; ``pad`` the key bias (:func:`~.checks.key_bias`); ``pool``
    the number of a memory pool (:func:`~.pool.pool_number`), 0 for none."""
    config = _config(segment_lengths, dilation_rates, is_causal, mode, softmax_scale)
    q, k, v, chosen = prepare(q, k, v, kernel or None, softmax_scale, masked=pad is not None)
    out, lse = dilated_forward(q, k, v, config, chosen, pad, pool=pool_of(pool))
    return out.contiguous(), lse.contiguous()


@torch.library.register_fake("ringsim::dilated_attention")
def _(q, k, v, pad, segment_lengths, dilation_rates, is_causal, mode, softmax_scale, kernel,
      lse_used, pool):  # fmt: skip
    b, n, h, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((b, h, n), dtype=accumulator_dtype(q.dtype))


@torch.library.impl("ringsim::dilated_attention_backward", "default")
def _backward_impl(q, k, v, pad, out, lse, dout, dlse, segment_lengths, dilation_rates,
                   is_causal, mode, softmax_scale, kernel, pool):  # fmt: skip
    """dq, dk, dv of the forward operator (``dlse``: None if the loss does not read lse)."""
    config = _config(segment_lengths, dilation_rates, is_causal, mode, softmax_scale)
    q, k, v, chosen = prepare(q, k, v, kernel or None, softmax_scale, masked=pad is not None)
    if dlse is not None and chosen is not Kernel.MATH and not bool(dlse.any()):
        dlse = None  # Note [The lse's gradient]
    grads = dilated_backward(q, k, v, out, lse, dout.contiguous(), dlse, config, chosen, pad,
                             pool=pool_of(pool))  # fmt: skip
    return tuple(g.contiguous() for g in grads)


@torch.library.register_fake("ringsim::dilated_attention_backward")
def _(q, k, v, pad, out, lse, dout, dlse, *config):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


#: The operators: ``dilated_operator(q, k, v, pad, segment_lengths, dilation_rates,
#: is_causal, mode, softmax_scale, kernel, lse_used, pool) -> (out, lse)`` and its backward.
dilated_operator = torch.ops.ringsim.dilated_attention
dilated_backward_operator = torch.ops.ringsim.dilated_attention_backward


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, pad, *ctx.config = inputs
    ctx.save_for_backward(q, k, v, pad, *output)


def _backward(ctx, dout, dlse):
    refuse_double_backward()
    q, k, v, pad, out, lse = ctx.saved_tensors
    *config, lse_used, pool = ctx.config
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = dlse if lse_used else None
    grads = dilated_backward_operator(q, k, v, pad, out, lse, dout, dlse, *config, pool)
    return (*grads, *[None] * 9)


torch.library.register_autograd(
    "ringsim::dilated_attention", _backward, setup_context=_setup_context
)


class DropoutFunction(torch.autograd.Function):
    """One device with attention dropout: ``apply(q, k, v, config, kernel, pad, dropout,
    pool) -> (out, lse)``. The operator above cannot carry the record of each call's random state
    from its forward to its backward (Note [Dropout] in :mod:`ringsim.gpu.kernels.dropout`),
    so this autograd function does, on ``ctx``; it runs eagerly (under ``torch.compile``, a
    graph break)."""

    @staticmethod
    def forward(ctx, q, k, v, config: DilatedConfig, kernel: Kernel, pad, dropout, pool=None):
        """:func:`dilated_forward`; keeps q, k, v, out, lse and the dropout record."""
        ctx.config, ctx.kernel, ctx.pad, ctx.dropout, ctx.pool = config, kernel, pad, dropout, pool
        return keep(ctx, q, k, v, *dilated_forward(q, k, v, config, kernel, pad, dropout, pool))

    @staticmethod
    def backward(ctx, dout, dlse):
        """:func:`dilated_backward` with the forward's masks: dq, dk, dv."""
        refuse_double_backward()
        grads = dilated_backward(*restore(ctx, dout, dlse), ctx.config, ctx.kernel, ctx.pad,
                                 ctx.dropout, ctx.pool)  # fmt: skip
        return (*grads, None, None, None, None, None)
