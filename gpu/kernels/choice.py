"""Which attention kernel runs: what each can take (:func:`capability`) and, among those that
can, the fastest measured on the device's architecture (:func:`preference`).

Note [The kernel choice]
------------------------
**By speed.** On Hopper (sm90) cuDNN's fused attention runs about 1.8x faster than PyTorch's
FlashAttention-2, forward and backward (measured on one H200, torch 2.11, cuDNN 9.19, bf16,
h=16, d=128: 593 against 345 TFLOP/s forward and 562 against 329 forward + backward at
n = 128K, full; 568 / 323 and 531 / 324 causal; ``docs/results``). Elsewhere (sm80, sm89:
Ampere and Ada) FlashAttention-2 is PyTorch's own first choice and ours; cuDNN is not used
there. Past sm90 (Blackwell) nothing has been measured here, so flash stays first.

**By capability, never by catching an error.** Every known way a kernel fails on inputs it
otherwise takes is a check below, with the report it comes from:

- cuDNN needs fp16/bf16, ``head_dim % 8 == 0`` and ``<= 128`` (cuDNN 9.19 on sm90; larger
  head dims arrive with later cuDNN), and tensors whose data pointer is 16-byte aligned and
  whose strides (other than the last, which must be 1) are multiples of 16 bytes: its Hopper
  kernels read through TMA descriptors, and misaligned inputs gave silently wrong results or
  misaligned-address faults (pytorch/pytorch#194818, NVIDIA/cudnn-frontend#554).
- cuDNN's backward is not deterministic and PyTorch's dispatcher refuses cuDNN under
  ``torch.use_deterministic_algorithms(True)``; so do we (flash honours the flag).
- one key per block: PyTorch's dispatcher refuses cuDNN for ``s_kv == 1``
  (pytorch/pytorch#138529) and cuDNN's backward raises "s_q = s_kv = 1 is not supported";
  such blocks (a dilation rate at least the segment length) run the math kernel, a
  documented substitution (:func:`block_kernel`), in the forward and the backward.
- more than 65535 blocks or heads in one call exceed a CUDA grid dimension (cuDNN:
  pytorch/pytorch#181085; flash: Dao-AILab/flash-attention#1786; efficient:
  pytorch/pytorch#142228): :func:`~ringsim.gpu.kernels.attend` and
  :func:`~ringsim.gpu.kernels.attend_backward` split the batch of blocks instead
  (:data:`MAX_BLOCKS`).
- cuDNN's backward returned a wrong dq for tensors spanning more than 2^31 elements (2M
  tokens x 16 heads x 128 on an H200; the forward is right there): backward calls are split
  so that no tensor spans more (:data:`MAX_EXTENT`, :func:`blocks_per_call`).
- cuDNN 9.19's Hopper backward gives NaN dq on a non-causal block of ``s_kv % 128 == 64``
  keys for rows whose lse is below -88.7 (pytorch/pytorch#196678 reports it with a bias;
  we reproduced it without one): those blocks' backward runs FlashAttention-2
  (:func:`~ringsim.gpu.kernels.backward_kernel`).
- flash aligns a causal mask of a non-square block bottom-right, cuDNN top-left: the plan
  only ever asks for the square diagonal block, and the backward refuses anything else.
- a key mask (``bias``: ``key_padding_mask``) runs the efficient kernel on CUDA, flash_cpu or
  math on the CPU: PyTorch's flash kernel takes no mask, FlexAttention is not wired to one
  here, and cuDNN's sm90 backward with a bias gave NaN dq on rows of very negative scores
  (pytorch/pytorch#196678), which a padded row is. Rows whose keys are all masked come back
  from the efficient and flash_cpu kernels with lse 0 (PyTorch returns 0 for a fully masked
  row's output); :func:`~ringsim.gpu.kernels.attend` sets them to out 0, lse ``-inf`` itself.
- rows whose scores are all very negative, and rows with no key, are covered by the CUDA
  tests (``tests/test_gpu_kernels_cuda.py``) for every kernel, forward and backward; cuDNN's
  sm90 backward gave NaN dq there on a non-causal ``s_kv % 128 == 64`` block (above), and
  for ``s_q = 1`` on cuDNN 9.25-9.26 (NVIDIA/cudnn-frontend#1072; not on 9.19: the tests
  pin that shape too).
"""

from __future__ import annotations

from enum import Enum

import torch


class Kernel(str, Enum):
    """The attention kernels ringsim can call."""

    FLASH = "flash"  # CUDA, fp16/bf16, head_dim % 8 == 0 and <= 256
    CUDNN = "cudnn"  # CUDA (sm90+), fp16/bf16, head_dim % 8 == 0 and <= 128, 16-byte aligned
    EFFICIENT = "efficient"  # CUDA, fp16/bf16/fp32
    FLEX = "flex"  # FlexAttention, compiled; CUDA, fp16/bf16/fp32
    FLASH_CPU = "flash_cpu"  # PyTorch's CPU flash kernel; float32/float64/bf16
    MATH = "math"  # plain torch ops: any device, any float dtype; the reference path


HALF = (torch.float16, torch.bfloat16)

#: The most blocks (or heads) one kernel call takes: a CUDA grid's y and z dimensions.
MAX_BLOCKS = 65535
#: The most elements a tensor of one backward call may span (from its first element to its
#: last, strides included): past 2^31 cuDNN's backward returned a wrong dq (measured on an
#: H200 at 2^21 tokens x 16 heads x 128, torch 2.11, cuDNN 9.19), though its forward and
#: our own kernels are right there.
MAX_EXTENT = 2**31 - 1


def blocks_per_call(*xs: torch.Tensor) -> int:
    """The most blocks (dim 0) of ``xs`` one backward call takes: at most :data:`MAX_BLOCKS`,
    and few enough that no tensor spans more than :data:`MAX_EXTENT` elements."""
    most = MAX_BLOCKS
    for x in xs:
        inner = sum((size - 1) * stride for size, stride in zip(x.shape[1:], x.stride()[1:]))
        if x.shape[0] > 1 and x.stride(0) > 0:
            most = min(most, max(1, (MAX_EXTENT - inner) // x.stride(0) + 1))
    return most


#: Why each kernel takes no dropout here (Note [Dropout] in :mod:`.dropout`).
NO_DROPOUT = {
    "cudnn": "cuDNN's SDPA dropout crashed in cuDNN 9.11-9.13 (pytorch/pytorch#163903) and "
    "rounds p to a multiple of 1/16 in some kernels (pytorch/pytorch#174245)",
    "flash_cpu": "PyTorch's CPU flash kernel does not support dropout > 0",
    "flex": "FlexAttention is not wired to dropout here",
}

#: Why each kernel takes no key mask (``bias``), Note [The kernel choice].
NO_MASK = {
    "flash": "PyTorch's flash kernel takes no mask",
    "cudnn": "cuDNN's sm90 backward with a bias gave NaN gradients (pytorch/pytorch#196678)",
    "flex": "FlexAttention is not wired to a key mask here",
}


def capability(
    kernel: Kernel,
    q: torch.Tensor,
    *others: torch.Tensor,
    masked: bool = False,
    dropout: bool = False,
) -> str | None:
    """Why ``kernel`` cannot run on tensors like ``q`` ``(B, H, M, D)`` (and ``others``, such as
    k and v, where their layout matters), with a key mask if ``masked``, with attention
    dropout if ``dropout``; None if it can."""
    cuda, d = q.is_cuda, q.shape[-1]
    if masked and kernel.value in NO_MASK:
        return f"{kernel.value} takes no key mask: {NO_MASK[kernel.value]}"
    if dropout and kernel.value in NO_DROPOUT:
        return f"{kernel.value} takes no dropout: {NO_DROPOUT[kernel.value]}"
    if kernel is Kernel.MATH:
        return None if q.is_floating_point() else f"dtype {q.dtype} is not floating point"
    if kernel is Kernel.FLASH_CPU:
        if cuda:
            return "flash_cpu runs on the CPU only"
        if q.dtype not in (torch.float32, torch.float64, torch.bfloat16):
            return f"flash_cpu does not take {q.dtype}"
        return None
    if not cuda:
        return f"{kernel.value} needs a CUDA device"
    major, _ = torch.cuda.get_device_capability(q.device)
    if kernel is Kernel.FLASH:
        if q.dtype not in HALF:
            return f"flash takes fp16/bf16, not {q.dtype}"
        if d % 8 or d > 256:
            return f"flash needs head_dim % 8 == 0 and <= 256, got {d}"
        return None if major >= 8 else "flash needs sm80 or newer"
    if kernel is Kernel.CUDNN:
        return _cudnn_capability(q, others, major)
    if kernel is Kernel.EFFICIENT:
        if q.dtype not in (*HALF, torch.float32):
            return f"efficient takes fp16/bf16/fp32, not {q.dtype}"
        return None if d % 8 == 0 else f"efficient needs head_dim % 8 == 0, got {d}"
    if kernel is Kernel.FLEX:
        if q.dtype not in (*HALF, torch.float32):
            return f"flex takes fp16/bf16/fp32, not {q.dtype}"
        if d < 16 or d & (d - 1):
            return f"flex needs a power-of-2 head_dim >= 16, got {d}"
        return None
    raise ValueError(f"kernel: unknown kernel {kernel!r}")


def _cudnn_capability(q: torch.Tensor, others, major: int) -> str | None:
    d = q.shape[-1]
    if q.dtype not in HALF:
        return f"cudnn takes fp16/bf16, not {q.dtype}"
    if d % 8 or d > 128:
        return f"cudnn needs head_dim % 8 == 0 and <= 128, got {d}"
    if not torch.backends.cudnn.is_available():
        return "cudnn is not available in this torch build"
    if major < 9:
        return "cudnn attention is used on sm90 or newer only"
    if torch.are_deterministic_algorithms_enabled():
        return "cudnn's backward is not deterministic (torch.use_deterministic_algorithms)"
    for x in (q, *others):
        misaligned = unaligned(x)
        if misaligned:
            return f"cudnn needs 16-byte aligned tensors: {misaligned}"
    return None


def unaligned(x: torch.Tensor) -> str | None:
    """What keeps ``x`` from being read through 16-byte aligned vectors (its data pointer or a
    stride, the last one excepted, must be); None if nothing."""
    size = x.element_size()
    if x.data_ptr() % 16:
        return f"data pointer {x.data_ptr()} is not a multiple of 16 bytes"
    for dim, (stride, extent) in enumerate(zip(x.stride()[:-1], x.shape[:-1])):
        if extent > 1 and (stride * size) % 16:
            return f"stride {stride} of dim {dim} is not a multiple of 16 bytes"
    return None


def realigned(x: torch.Tensor) -> torch.Tensor:
    """``x``, or for a CUDA tensor whose storage is not 16-byte aligned (a view at an odd
    offset) a contiguous copy: cuDNN needs the alignment, and PyTorch's vectorized gather
    faults on such a tensor ("misaligned address", torch 2.11 on an H200), so every entry
    point reads its inputs through this."""
    if x.is_cuda and unaligned(x) is not None:
        return x.clone(memory_format=torch.contiguous_format)
    return x


#: The preference order on Hopper and elsewhere (Note [The kernel choice]).
HOPPER_PREFERENCE = (Kernel.CUDNN, Kernel.FLASH, Kernel.EFFICIENT, Kernel.MATH)
PREFERENCE = (Kernel.FLASH, Kernel.CUDNN, Kernel.EFFICIENT, Kernel.MATH)


def preference(device: torch.device) -> tuple[Kernel, ...]:
    """The kernels to try, fastest first, on ``device`` (Note [The kernel choice])."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return HOPPER_PREFERENCE
    return PREFERENCE


def as_kernel(requested: Kernel | str) -> Kernel:
    """``requested`` as a :class:`Kernel`; ``ValueError`` naming the choices otherwise."""
    try:
        return Kernel(requested)
    except ValueError:
        names = ", ".join(k.value for k in Kernel)
        raise ValueError(f"kernel: must be one of {names}, got {requested!r}") from None


def choose_kernel(
    q: torch.Tensor,
    requested: Kernel | str | None = None,
    *others: torch.Tensor,
    masked: bool = False,
    dropout: bool = False,
) -> Kernel:
    """The kernel for tensors like ``q`` (and ``others``, e.g. k and v; with a key mask if
    ``masked``, with attention dropout if ``dropout``): ``requested`` if it can run (else
    ``ValueError`` with the reason), otherwise the first of :func:`preference` that can."""
    needs = {"masked": masked, "dropout": dropout}
    if requested is not None:
        kernel = as_kernel(requested)
        reason = capability(kernel, q, *others, **needs)
        if reason is not None:
            raise ValueError(f"kernel: {kernel.value} cannot run here: {reason}")
        return kernel
    return next(k for k in preference(q.device) if capability(k, q, *others, **needs) is None)


def block_kernel(kernel: Kernel, keys: int) -> Kernel:
    """The kernel that runs ``kernel``'s blocks of ``keys`` keys: ``kernel`` itself, except
    MATH for cuDNN on one-key blocks, which cuDNN does not take (Note [The kernel choice])."""
    if kernel is Kernel.CUDNN and keys == 1:
        return Kernel.MATH
    return kernel


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
