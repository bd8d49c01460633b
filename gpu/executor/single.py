"""Dilated attention on one device, in torch (spec §2, §4, §6): the step executor at P = 1.

On one device the plan (:func:`ringsim.plan.rank_plan` with one rank) has a single step in
which every block is the device's own: one batch per pair (two for a pair with a ragged
last segment), whose segments become the batch dimension of its kernel calls. The forward
and backward executors (:mod:`ringsim.gpu.executor.forward`, :mod:`.backward`) run those
batches exactly as they run each step of the ring: strided views and one mixing pass for
aligned configurations, gathered row batches and float32 accumulators otherwise. Rows are
selected by global positions, so ragged segments, r > w and r not dividing w are exact (no
mask is needed: every block is FULL or the square CAUSAL diagonal).

:class:`DilatedFunction` is the autograd: the forward keeps ``(q, k, v, out, lse)``, the
backward runs the kernels' own backward with the final out and lse (exact through the LSE
mixing, spec §4) instead of differentiating the forward's merges.
"""

from __future__ import annotations

import torch

from ringsim.config import DilatedConfig, check_flags, validate
from ringsim.plan import rank_plan

from ..kernels import Kernel, choose_kernel, realigned
from .backward import BackwardExecutor
from .forward import ForwardExecutor


def check_tensor(q, k=None, v=None) -> None:
    """The torch backend takes floating-point torch tensors, k and v on q's device."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"q: dtype must be floating point, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.device != q.device:
            raise ValueError(f"{name}: must be on q's device ({q.device}), got {x.device}")


def key_bias(mask, q: torch.Tensor) -> torch.Tensor | None:
    """``key_padding_mask`` as the executor takes it (Note [Key masks] in
    :mod:`ringsim.gpu.executor.base`): None, or ``(b, n, h, 1)`` in q's dtype, each key's
    bias repeated per head of q ``(b, n, h, d)``.

    The mask is ``(b, n)`` on q's device: bool, True = padding (bias ``-inf``: never a key),
    or float, added to the scores of each key as ``nn.MultiheadAttention`` adds a float
    ``key_padding_mask`` (``-inf`` = never a key; NaN and ``+inf`` are refused).
    """
    if mask is None:
        return None
    b, n, h, _ = q.shape
    check_key_mask(mask, b, n, q.device)
    if mask.dtype == torch.bool:
        bias = torch.zeros(b, n, dtype=q.dtype, device=q.device).masked_fill(mask, -torch.inf)
    else:
        bias = mask.detach().to(q.dtype)
    return bias[:, :, None, None].expand(b, n, h, 1).contiguous()


def check_key_mask(mask, b: int, n: int, device: torch.device) -> None:
    """A ``key_padding_mask``: a ``(b, n)`` bool or float tensor on ``device``, a float one
    without NaN or ``+inf``; errors name the argument."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"key_padding_mask: expected bool or float, got {mask.dtype}")
    if tuple(mask.shape) != (b, n):
        raise ValueError(
            f"key_padding_mask: shape must be (batch, seq_len) = {(b, n)}, got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"key_padding_mask: must be on q's device ({device}), got {mask.device}")
    if mask.is_floating_point() and bool((torch.isnan(mask) | (mask == torch.inf)).any()):
        raise ValueError("key_padding_mask: a float mask must not hold NaN or +inf")


#: The largest softmax_scale the torch backend takes: its fast kernels compute the scores in
#: float32, where a larger scale is infinite and every score NaN.
MAX_SCALE = float(torch.finfo(torch.float32).max)


def prepare(q, k, v, requested: Kernel | str | None, softmax_scale: float | None, *,
            masked: bool = False):  # fmt: skip
    """Every entry point's inputs, before any work: q checked (:func:`check_tensor`), the
    scale within :data:`MAX_SCALE`, q, k, v :func:`~ringsim.gpu.kernels.realigned`, and the
    kernel chosen for them (one that takes a key mask if ``masked``). Returns ``(q, k, v,
    kernel)``."""
    check_tensor(q, k, v)
    if softmax_scale is not None and abs(softmax_scale) > MAX_SCALE:
        raise ValueError(
            f"softmax_scale: {softmax_scale:g} is beyond float32's range ({MAX_SCALE:.3g}), "
            "in which the torch kernels compute the scores"
        )
    q, k, v = (realigned(x) for x in (q, k, v))
    return q, k, v, choose_kernel(q, requested, k, v, masked=masked)


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def check_differentiable(q, k, v, kernel: Kernel) -> None:
    """Refuse, before any work, a backward pass the kernel cannot run: FlexAttention has no
    backward that takes an external lse (:func:`~ringsim.gpu.kernels.attend_backward`)."""
    if needs_grad(q, k, v) and kernel is Kernel.FLEX:
        raise NotImplementedError(
            "kernel: flex has no backward from an external lse; use flash, cudnn, efficient "
            "or math to train, or run under torch.no_grad()"
        )


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
):
    """Dilated attention on one device (spec §6).

    Args:
        q, k, v: ``(batch, seq_len, num_heads, head_dim)`` floating-point tensors, one dtype
            and device; k and v may have fewer heads, a divisor of q's (grouped-query
            attention: :func:`repeat_kv` repeats them per query head, so K/V memory grows by
            the ratio; the torch ring refuses fewer K/V heads for now).
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
    out, lse = DilatedFunction.apply(q, k, v, config, chosen, pad)
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


def dilated_forward(q, k, v, config: DilatedConfig, kernel: Kernel, pad=None):
    """The forward on one device, no autograd: out ``(b, n, h, d)`` in q's dtype and the
    lse ``(b, h, n)``, float32 or float64. ``pad``: the key bias (:func:`key_bias`)."""
    _, n, h, _ = q.shape
    plan = rank_plan(config, h, n, 1, 0)
    executor = ForwardExecutor(q, k, v, plan, config, kernel, pad)
    executor.run(0, plan.steps[0].batches, {})
    return executor.finish()


def dilated_backward(q, k, v, out, lse, dout, dlse, config: DilatedConfig, kernel: Kernel,
                     pad=None):  # fmt: skip
    """dq, dk, dv of dilated attention on one device, in q's dtype.

    Args:
        q, k, v, out, dout: ``(b, n, h, d)``; out is the forward's (final) output.
        lse, dlse: ``(b, h, n)``, the forward's lse and its gradient (None: lse unused).
        config, kernel, pad: as the forward ran.
    """
    _, n, h, _ = q.shape
    plan = rank_plan(config, h, n, 1, 0)
    executor = BackwardExecutor(q, k, v, out, lse, dout, dlse, plan, config, kernel, pad)
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


class DilatedFunction(torch.autograd.Function):
    """Dilated attention on one device:
    ``apply(q, k, v, config, kernel, pad) -> (out, lse)`` (pad: :func:`key_bias`, or None)."""

    @staticmethod
    def forward(ctx, q, k, v, config: DilatedConfig, kernel: Kernel, pad=None):
        """:func:`dilated_forward`; keeps q, k, v, out and lse (and the key bias)."""
        ctx.config, ctx.kernel, ctx.pad = config, kernel, pad
        return keep(ctx, q, k, v, *dilated_forward(q, k, v, config, kernel, pad))

    @staticmethod
    def backward(ctx, dout, dlse):
        """:func:`dilated_backward`: dq, dk, dv."""
        refuse_double_backward()
        grads = dilated_backward(*restore(ctx, dout, dlse), ctx.config, ctx.kernel, ctx.pad)
        return (*grads, None, None, None)
