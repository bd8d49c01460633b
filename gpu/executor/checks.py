"""The torch backend's input checks, made before any work: the tensors, the key mask, the
scale, and the kernel that can run on them (:func:`prepare`)."""

from __future__ import annotations

import torch

from ..kernels import Kernel, choose_kernel, realigned


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


def key_bias(mask, q: torch.Tensor, heads: int | None = None) -> torch.Tensor | None:
    """``key_padding_mask`` as the executor takes it (Note [Key masks] in
    :mod:`ringsim.gpu.executor.base`): None, or ``(b, n, h, 1)`` in q's dtype, each key's
    bias repeated per head: of q ``(b, n, h, d)``, or ``heads`` of them (k's, on a ring with
    fewer K/V heads).

    The mask is ``(b, n)`` on q's device: bool, True = padding (bias ``-inf``: never a key),
    or float, added to the scores of each key as ``nn.MultiheadAttention`` adds a float
    ``key_padding_mask`` (``-inf`` = never a key; NaN and ``+inf`` are refused).
    """
    if mask is None:
        return None
    b, n, h, _ = q.shape
    h = h if heads is None else heads
    check_key_mask(mask, b, n, q.device)
    if mask.dtype == torch.bool:
        bias = torch.zeros(b, n, dtype=q.dtype, device=q.device).masked_fill(mask, -torch.inf)
    else:
        bias = mask.detach().to(q.dtype)
    return bias[:, :, None, None].expand(b, n, h, 1).contiguous()


def check_key_mask(mask, b: int, n: int, device: torch.device) -> None:
    """A ``key_padding_mask``: a ``(b, n)`` bool or float tensor on ``device``, a float one
    without NaN or ``+inf`` (one host sync, skipped under ``torch.compile``, where it would
    break the graph); errors name the argument."""
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
    read = mask.is_floating_point() and not torch.compiler.is_compiling()
    if read and bool((torch.isnan(mask) | (mask == torch.inf)).any()):
        raise ValueError("key_padding_mask: a float mask must not hold NaN or +inf")


#: The largest softmax_scale the torch backend takes: its fast kernels compute the scores in
#: float32, where a larger scale is infinite and every score NaN.
MAX_SCALE = float(torch.finfo(torch.float32).max)


def check_dropout_p(dropout_p) -> float:
    """Attention dropout's probability: a float in ``[0, 1)`` (1 would scale by 1/0)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if not 0.0 <= float(dropout_p) < 1.0:  # NaN fails too
        raise ValueError(f"dropout_p: must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def prepare(q, k, v, requested: Kernel | str | None, softmax_scale: float | None, *,
            masked: bool = False, dropout: bool = False):  # fmt: skip
    """Every entry point's inputs, before any work: q checked (:func:`check_tensor`), the
    scale within :data:`MAX_SCALE`, q, k, v :func:`~ringsim.gpu.kernels.realigned`, and the
    kernel chosen for them (one that takes a key mask if ``masked``, attention dropout if
    ``dropout``). Returns ``(q, k, v, kernel)``."""
    check_tensor(q, k, v)
    if softmax_scale is not None and abs(softmax_scale) > MAX_SCALE:
        raise ValueError(
            f"softmax_scale: {softmax_scale:g} is beyond float32's range ({MAX_SCALE:.3g}), "
            "in which the torch kernels compute the scores"
        )
    q, k, v = (realigned(x) for x in (q, k, v))
    return q, k, v, choose_kernel(q, requested, k, v, masked=masked, dropout=dropout)


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
