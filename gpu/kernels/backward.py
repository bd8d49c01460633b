"""Backward adapters for the attention kernels of :mod:`ringsim.gpu.kernels`.

:func:`attend_backward` returns one key block's share of dq and that block's dk, dv, given
the *final* ``out`` and ``lse`` of the query rows: the result of the whole dilated attention
(every pattern, every ring step), not the block's own forward.

Note [Backward with the final out and lse]
    For one query row x, the patterns (and the ring's key blocks) mix as
    ``out = sum_i exp(lse_i - L) o_i`` with ``o_i = sum_{y in K_i} exp(s_xy - lse_i) v_y``,
    so ``out = sum_{y in K_1 + K_2 + ...} exp(s_xy - L) v_y``: ONE softmax over the
    concatenated key lists, normalised by ``L`` (a key in two patterns counts twice). Its
    FlashAttention backward (Dao 2023, alg. 2)::

        P  = exp(scale * q k^T - L)        (0 where masked)
        D  = rowsum(dout * out)            (the final out)
        dS = P * (dout v^T - D + dlse)     (dlse: the loss's gradient w.r.t. L, if it reads L)
        dq = scale * dS k,   dk = scale * dS^T q,   dv = P^T dout

    splits by key block: a block's terms need its own q, k, v and the rows' final out, L,
    dout (and dlse). ``P_block = P_i * w_i`` with ``w_i = exp(lse_i - L)``, so the gradient
    through the mixing weights is included, not detached. The fused kernels' backward ops
    take out and logsumexp as inputs and never recompute them, so given the final out and L
    they return exactly these shares; dq adds up over blocks. The NumPy form, with a diagram:
    Note [one softmax over every pattern] in :mod:`ringsim.reference.backward`.

Rows with no key anywhere have ``L = -inf``. ``exp(s - L)`` would be ``exp(+inf)`` or NaN
there, and FlashAttention-2 treats a ``-inf`` row maximum as 0 (its empty-row guard), which
gives garbage; so ``-inf`` is replaced by ``+inf`` before any kernel runs: ``exp(s - inf) = 0``,
``P = 0``, and the row contributes nothing and gets ``dq = 0`` (pitfall 6). ``+inf`` is also
what the kernels themselves write for rows without keys and for padding rows.

Per-kernel details (checked against PyTorch's aten sources; each op is called with dropout 0):

- flash: ``cum_seq_q/k`` must be undefined (``None``): a defined tensor, even an empty one,
  selects the variable-length kernel. The philox seed/offset are read only when dropout > 0.
- cuDNN: lse is passed in the shape the forward returns (``(B, H, M, 1)`` since torch 2.9,
  ``(B, H, M)`` before; read from the forward's meta function). out and dout are laid out
  like q, as the forward allocates out: some torch versions cache the backward graph by the
  q/k/v layouts only, so a differently laid-out out would be read with stale strides.
- efficient: lse is padded with ``+inf`` to a multiple of 32 rows, as the forward returns it
  (the backward checks that lse's head and batch strides are multiples of 8). out must be
  laid out ``(B, M, H, D)`` in memory: the kernel assumes out's row stride is ``H * D``.
- cuDNN refuses a block of one query and one key ("s_q = s_kv = 1 is not supported", cuDNN
  9.19, torch 2.11, H100) and PyTorch never gives it one key; blocks of one key (a dilation
  rate at least the segment length) run the math backward instead (:func:`backward_kernel`,
  as the forward does): one product per head, a documented substitution, not a caught error.
- a call runs as several calls where it has more than
  :data:`~ringsim.gpu.kernels.choice.MAX_BLOCKS` blocks or where a tensor spans more than
  :data:`~ringsim.gpu.kernels.choice.MAX_EXTENT` elements (:func:`blocks_per_call`).
- cuDNN's backward of a non-causal block of ``L % 128 == 64`` keys runs flash's backward
  (:func:`backward_kernel`).
- flash_cpu: takes any strides; lse in float64 for float64 inputs, else float32.
- a key mask (``bias (B, H, 1, L)``, as the forward took it): math adds it to the scores,
  the efficient and flash_cpu kernels read it as their mask (padded as the forward pads it,
  :func:`~ringsim.gpu.kernels.forward.padded_bias`); a masked key gets ``P = 0``, so no
  gradient, and a row with no key at all has ``L = +inf`` as above.
- flex: FlexAttention's backward recomputes its own lse, so it cannot take the final one.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .choice import (
    Kernel,
    accumulator_dtype,
    as_kernel,
    block_kernel,
    blocks_per_call,
    capability,
    choose_kernel,
)
from .dropout import Dropout, active, keep_scale
from .forward import padded_bias

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
aten = torch.ops.aten


def attend_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    kernel: Kernel | str,
    allowed: torch.Tensor | None = None,
    dlse: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dropout: Dropout | None = None,
) -> Grads:
    """One block's share of the gradient of attention with the final ``out`` and ``lse``.

    Args:
        q: ``(B, H, M, D)`` queries of the block (a batch of blocks, heads, rows, head_dim);
            any strides with a contiguous last dim.
        k, v: ``(B, H, L, D)`` the block's keys and values, same dtype as q.
        out: ``(B, H, M, D)`` the FINAL output of these rows (any float dtype; cast to q's
            dtype for the fused kernels, which read it only through ``rowsum(dout * out)``).
        lse: ``(B, H, M)`` the FINAL natural-log lse of these rows, float32 (float64 for
            float64 input); ``-inf`` on a row with no key anywhere.
        dout: ``(B, H, M, D)`` gradient of the loss w.r.t. out.
        causal: the square diagonal block (row i attends keys 0..i), as in
            :func:`~ringsim.gpu.kernels.math_attention`; ignored when ``allowed`` is given.
        scale: the softmax scale.
        kernel: which backward runs; MATH is the explicit formula, FLEX has none.
        allowed: ``(M, L)`` bool, True = attend (a general mask); MATH only.
        dlse: ``(B, H, M)`` gradient of the loss w.r.t. lse; MATH only.
        bias: ``(B, H, 1, L)`` the key mask the forward added to the scores (q's dtype);
            the kernels whose capability allows ``masked`` only.
        dropout: the forward's :class:`~ringsim.gpu.kernels.dropout.Dropout`, replayed call
            by call (Note [Dropout]).
    Returns:
        ``dq (B, H, M, D)``, ``dk, dv (B, H, L, D)``: the fused kernels' own dtype (q's),
        float32 (float64 for float64 input) from MATH. Callers add them into float32
        accumulators in place, so no float32 copy of a large block is ever made.
    Raises:
        NotImplementedError: for FLEX, or ``dlse`` with a kernel other than MATH.
        ValueError: bad shapes, ``allowed`` with a kernel other than MATH, or a kernel that
            cannot run on these tensors.
    """
    kernel = as_kernel(kernel)
    _check_shapes(q, k, v, out, lse, dout, allowed, dlse)
    if kernel is Kernel.FLEX:
        raise NotImplementedError(
            "flex: no backward with an external lse; use flash/cudnn/efficient/math"
        )
    if kernel is not Kernel.MATH:
        if allowed is not None:
            raise ValueError(
                f"allowed: only kernel='math' takes a general mask, not {kernel.value}"
            )
        if dlse is not None:
            raise NotImplementedError(
                f"dlse: kernel {kernel.value} cannot add a gradient w.r.t. lse; use kernel='math'"
            )
        choose_kernel(q, kernel, k, v, masked=bias is not None, dropout=bool(active(dropout)))
        if causal and q.shape[-2] != k.shape[-2]:  # flash aligns a non-square mask bottom-right
            raise ValueError(f"causal: needs a square block, got M={q.shape[-2]}, L={k.shape[-2]}")
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.stride(-1) != 1 and x.shape[-1] > 1:  # a size-1 dim has any stride
                raise ValueError(f"{name}: the last dim must be contiguous for {kernel.value}")
    # Note [Backward with the final out and lse]: a row with no key gets P = exp(s - inf) = 0
    lse = torch.where(torch.isneginf(lse), math.inf, lse)
    if allowed is not None:
        keep = None if active(dropout) is None else _keep(dropout, q, k)
        return _math(q, k, v, out, lse, dout, causal, scale, allowed, dlse, bias, keep)
    return block_backward(q, k, v, out, lse, dout, causal=causal, scale=scale, kernel=kernel,
                          dlse=dlse, bias=bias, dropout=dropout)  # fmt: skip


def block_backward(q, k, v, out, lse, dout, *, causal: bool, scale: float, kernel: Kernel,
                   dlse: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   dropout: Dropout | None = None) -> Grads:  # fmt: skip
    """:func:`attend_backward` without its checks, for a caller that made them once (the step
    executor, which runs dozens of blocks of one checked configuration): the same arguments,
    except that ``lse`` must already read ``+inf`` (not ``-inf``) on rows with no key, and
    there is no ``allowed``."""
    if dlse is not None and kernel is not Kernel.MATH:
        raise NotImplementedError(
            f"dlse: kernel {kernel.value} cannot add a gradient w.r.t. lse; use kernel='math'"
        )
    kernel = backward_kernel(kernel, q, k, causal)
    drop = active(dropout)
    if kernel is Kernel.MATH:
        keep = None if drop is None else _keep(drop, q, k)
        return _math(q, k, v, out, lse, dout, causal, scale, None, dlse, bias, keep)
    if bias is not None and kernel not in (Kernel.EFFICIENT, Kernel.FLASH_CPU):
        raise ValueError(f"bias: kernel {kernel.value} takes no key mask")
    if drop is not None and kernel not in (Kernel.FLASH, Kernel.EFFICIENT):
        raise ValueError(f"dropout: kernel {kernel.value} takes no dropout")
    acc = accumulator_dtype(q.dtype)
    out, dout, lse = out.to(q.dtype), dout.to(q.dtype), lse.to(acc)
    # with dropout, split as the forward split (Note [Dropout])
    per_call = blocks_per_call(q, k, v) if drop else blocks_per_call(q, k, v, out, dout)
    fused = functools.partial(_FUSED[kernel], causal=causal, scale=scale, dropout=drop)
    if q.shape[0] <= per_call:
        return fused(q, k, v, out, lse, dout, bias)
    biases = (None,) * q.shape[0] if bias is None else bias.split(per_call)
    chunks = zip(*(x.split(per_call) for x in (q, k, v, out, lse, dout)), biases)
    grads = [fused(*c) for c in chunks]
    return tuple(torch.cat(xs) for xs in zip(*grads))


def _keep(dropout: Dropout, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The math kernel's ``mask / (1 - p)`` of the next forward call (Note [Dropout])."""
    return keep_scale(q, k, dropout.replay(), dropout.p)


def _philox(dropout: Dropout | None) -> tuple:
    """``(p, seed, offset)`` the fused kernels' backward reads: the next forward call's
    Philox state (Note [Dropout]), or no dropout."""
    if dropout is None:
        return 0.0, None, None
    return (dropout.p, *dropout.replay())


def backward_kernel(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, causal: bool) -> Kernel:
    """The kernel whose backward runs for ``kernel``'s blocks ``q (B, H, M, D)``,
    ``k (B, H, L, D)``: the one the forward ran
    (:func:`~ringsim.gpu.kernels.choice.block_kernel`: MATH for cuDNN on one-key blocks),
    except FlashAttention-2 (or, where flash cannot run, the efficient kernel) for cuDNN on
    a non-causal block of ``L % 128 == 64`` keys: cuDNN 9.19's Hopper backward leaves the
    last key tile's padding unmasked there, and a row whose lse is below -88.7 gets a NaN
    dq (pytorch/pytorch#196678, reproduced without a bias by
    ``tests/test_gpu_kernels_cuda.py`` on an H200). The backward of the final out and lse
    is the same function whichever fused kernel runs it."""
    chosen = block_kernel(kernel, k.shape[-2])
    if chosen is Kernel.CUDNN and not causal and k.shape[-2] % 128 == 64:
        return Kernel.FLASH if capability(Kernel.FLASH, q, k) is None else Kernel.EFFICIENT
    return chosen


def _math(q, k, v, out, lse, dout, causal, scale, allowed, dlse, bias=None, keep=None) -> Grads:
    """The Note's formula with plain ops, scores in float32 (float64 for float64 input);
    ``keep``: dropout's ``mask / (1 - p)`` (Note [Dropout]: ``dV = (P Z)^T dO``,
    ``dS = P (Z dP - D)``)."""
    acc = accumulator_dtype(q.dtype)
    q, k, v, out, dout, lse = (x.to(acc) for x in (q, k, v, out, dout, lse))
    scores = scale * torch.matmul(q, k.transpose(-1, -2))  # (B, H, M, L)
    if bias is not None:
        scores = scores + bias.to(acc)
    if allowed is None and causal:
        m, l_ = scores.shape[-2:]
        allowed = torch.ones(m, l_, dtype=torch.bool, device=q.device).tril()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    probs = torch.exp(scores - lse[..., None])  # 0 where masked, and on rows with lse = +inf
    delta = (dout * out).sum(-1)  # (B, H, M)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    dp = torch.matmul(dout, v.transpose(-1, -2))  # (B, H, M, L)
    kept = probs if keep is None else probs * keep
    ds = probs * ((dp if keep is None else dp * keep) - delta[..., None])
    dq = scale * torch.matmul(ds, k)
    dk = scale * torch.matmul(ds.transpose(-1, -2), q)
    dv = torch.matmul(kept.transpose(-1, -2), dout)
    return dq, dk, dv


def _flash(q, k, v, out, lse, dout, bias=None, *, causal, scale, dropout=None) -> Grads:
    # cum_seq_q/k None (dense, not varlen), philox seed/offset None (unread with dropout 0);
    # the op makes out and dout contiguous itself and reads lse as a dense (B, H, M)
    m, l_ = q.shape[-2], k.shape[-2]
    p, seed, offset = _philox(dropout)
    args = (dout, q, k, v, out, lse.contiguous(), None, None, m, l_, p, causal, seed, offset)
    return aten._scaled_dot_product_flash_attention_backward(*args, scale=scale)


def _cudnn(q, k, v, out, lse, dout, bias=None, *, causal, scale, dropout=None) -> Grads:
    out, dout = _layout_like(out, q), _layout_like(dout, q)  # see the module docstring
    if _cudnn_ragged(q, k, v, out):  # the forward's (B, M, H, 1) stats in this mode
        stats = lse.transpose(1, 2).contiguous().transpose(1, 2)[..., None]
    else:
        stats = lse.contiguous()[..., None] if _cudnn_lse_has_unit_dim() else lse.contiguous()
    # philox seed/offset, attn_bias, cum_seq_q/k: None (dropout 0, no bias, not nested)
    m, l_ = q.shape[-2], k.shape[-2]
    args = (dout, q, k, v, out, stats, None, None, None, None, None, m, l_, 0.0, causal)
    return aten._scaled_dot_product_cudnn_attention_backward(*args, scale=scale)


def _efficient(q, k, v, out, lse, dout, bias=None, *, causal, scale, dropout=None) -> Grads:
    m = q.shape[-2]
    padded = lse.new_full((*lse.shape[:-1], -(-m // 32) * 32), math.inf)  # (B, H, M_32)
    padded[..., :m] = lse
    out = out.transpose(1, 2).contiguous().transpose(1, 2)  # (B, M, H, D) in memory
    mask = None if bias is None else padded_bias(bias, m)
    p, seed, offset = _philox(dropout)
    # no grad for the bias
    grads_wanted = [True, True, True, False]
    args = (dout, q, k, v, mask, out, padded, seed, offset, p, grads_wanted, causal)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(*args, scale=scale)
    return dq, dk, dv


def _flash_cpu(q, k, v, out, lse, dout, bias=None, *, causal, scale, dropout=None) -> Grads:
    args = (dout, q, k, v, out, lse, 0.0, causal)  # lse float64 for float64 input, else float32
    mask = None if bias is None else padded_bias(bias, q.shape[-2])
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *args, attn_mask=mask, scale=scale
    )


_FUSED = {
    Kernel.FLASH: _flash,
    Kernel.CUDNN: _cudnn,
    Kernel.EFFICIENT: _efficient,
    Kernel.FLASH_CPU: _flash_cpu,
}


@functools.cache
def _cudnn_lse_has_unit_dim() -> bool:
    """Whether cuDNN's forward returns lse as ``(B, H, M, 1)`` (torch >= 2.9) rather than
    ``(B, H, M)``: its meta function answers without touching a device."""
    x = torch.empty(1, 1, 1, 8, dtype=torch.float16, device="meta")
    lse = aten._scaled_dot_product_cudnn_attention(x, x, x, None, True, 0.0, False, False)[1]
    return lse.dim() == 4


def _cudnn_ragged(q, k, v, out) -> bool:
    """torch's ``use_ragged_in_dense``: with ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE`` on and every
    tensor laid out ``(B, M, H, D)``, cuDNN reads lse with ragged offsets in that layout."""
    flag = os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "").upper()
    if flag not in ("1", "ON", "YES", "TRUE", "Y"):
        return False
    return all(x.transpose(1, 2).is_contiguous() for x in (q, k, v, out))


def _layout_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` with its dims in memory in the order of ``ref``'s strides (a copy only if needed:
    not when x has ref's strides already, as the executor's views of out and q do)."""
    if x.stride() == ref.stride():
        return x
    order = sorted(range(ref.dim()), key=lambda i: -ref.stride(i))  # outermost first
    inverse = [order.index(i) for i in range(ref.dim())]
    return x.permute(order).contiguous().permute(inverse)


def _check_shapes(q, k, v, out, lse, dout, allowed, dlse) -> None:
    if q.dim() != 4:
        raise ValueError(f"q: must be (B, H, M, D), got shape {tuple(q.shape)}")
    b, h, m, _ = q.shape
    rows, block = (b, h, m), (b, h, k.shape[-2])
    expected = {
        "k": (k, (*block, q.shape[-1])),
        "v": (v, (*block, v.shape[-1])),
        "out": (out, (*rows, v.shape[-1])),
        "dout": (dout, (*rows, v.shape[-1])),
        "lse": (lse, rows),
        "dlse": (dlse, rows),
    }
    for name, (x, shape) in expected.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: dtypes {k.dtype}, {v.dtype} differ from q's {q.dtype}")
    if allowed is not None and (
        allowed.dtype != torch.bool or tuple(allowed.shape) != (m, k.shape[-2])
    ):
        raise ValueError(
            f"allowed: expected a bool ({m}, {k.shape[-2]}) mask, got {allowed.dtype} "
            f"{tuple(allowed.shape)}"
        )
