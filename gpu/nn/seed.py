"""The seed's names for the modules (spec §8), with the seed's arguments and defaults.

- :class:`RingDilatedAttentionHybrid`: :class:`~ringsim.gpu.nn.modules.RingDilatedAttention`
  with the seed's ``device``, ``dtype``, ``ring_size``, ``use_flash_attention`` and
  ``enable_memory_pool``;
- :class:`RingMultiheadDilatedAttentionHybrid`:
  :class:`~ringsim.gpu.nn.multihead.RingMultiheadDilatedAttention` with the seed's defaults
  (``layer_norm=True``, ``batch_first=True``, no weights unless asked).

Every argument works as documented or raises an error naming it; none is silently ignored
(pitfall 17). The docs page "Coming from the seed's classes" maps each of them.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import torch

from ..executor import check_tensor
from ..kernels import Kernel
from .modules import (
    DEFAULT_GROUP,
    RingDilatedAttention,
    check_bool,
    check_device,
    check_dtype,
    check_group,
)
from .multihead import RingMultiheadDilatedAttention

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def ring_group(ring_size: Any, group: Any) -> ProcessGroup | str | None:
    """The group for the seed's ``ring_size`` (and an explicit ``group``).

    ``ring_size`` None: ``group`` as given. ``ring_size == 1`` with no group: one device.
    ``ring_size > 1`` with no group: the default group. In the last two cases with a group,
    ``ring_size`` must equal its world size, checked now (``ValueError`` otherwise).
    """
    group = check_group(group)
    if ring_size is None:
        return group
    if isinstance(ring_size, bool) or not isinstance(ring_size, numbers.Integral):
        raise TypeError(f"ring_size: expected an int or None, got {ring_size!r}")
    if ring_size < 1:
        raise ValueError(f"ring_size: must be >= 1, got {ring_size}")
    if group is None:
        if ring_size == 1:
            return None
        group = DEFAULT_GROUP
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"ring_size: ring_size={ring_size} runs over a torch.distributed process group, "
            "but torch.distributed is not initialised; call init_process_group before "
            "building the module, or use ring_size=None or 1 on one device"
        )
    size = dist.get_world_size(None if isinstance(group, str) else group)
    if size != ring_size:
        raise ValueError(
            f"ring_size: must equal the process group's world size {size}, got {ring_size}"
        )
    return group


def seed_dtype(dtype: torch.dtype | None, device: torch.device | None) -> torch.dtype | None:
    """The seed's "smart dtype selection": ``dtype`` if given; with ``dtype=None`` and a
    device, bfloat16 on a CUDA device that supports it (Ampere and later), float32 on any
    other; with neither, None (the attention alias then takes any dtype, the multihead one
    torch's default)."""
    if dtype is not None or device is None:
        return dtype
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def flash_kernel(use_flash_attention: Any) -> Kernel | None:
    """The seed's flag: True = the fastest kernel that can run, False = the math kernel."""
    return None if check_bool("use_flash_attention", use_flash_attention) else Kernel.MATH


def seed_arguments(ring_size, use_flash_attention, enable_memory_pool, group) -> dict:
    """The seed's ring, kernel and pool arguments, checked, as the ``kernel``, ``group`` and
    ``enable_memory_pool`` of this package's modules (each seed alias passes them to its base
    class)."""
    return dict(kernel=flash_kernel(use_flash_attention), group=ring_group(ring_size, group),
                enable_memory_pool=enable_memory_pool)  # fmt: skip


class RingDilatedAttentionHybrid(RingDilatedAttention):
    """The seed's ``RingDilatedAttentionHybrid``: its arguments on :class:`RingDilatedAttention`.

    ``dropout`` may be positional; the rest are keyword-only, because the seed's versions
    ordered them differently.

    Args:
        segment_lengths, dilation_rates, dropout, mode, softmax_scale, group, layout: as
            :class:`RingDilatedAttention`.
        device, dtype: the device and dtype the inputs must have (the module has no
            parameters); forward raises ``ValueError`` / ``TypeError`` for others. A device
            without an index accepts any index. ``dtype=None`` with a device picks one (the
            seed's dtype selection, :func:`seed_dtype`: bfloat16 on a CUDA device that has
            it, float32 elsewhere); with neither, any is accepted.
        ring_size: None or 1: one device (unless ``group`` is given); ``p > 1``: the default
            process group, whose world size must be p (checked at construction,
            ``ValueError`` otherwise). With ``group`` it must equal that group's size.
        use_flash_attention: True: the fastest kernel that can run (flash, cuDNN, efficient,
            then math: :func:`~ringsim.gpu.kernels.choose_kernel`); False: the math kernel.
        enable_memory_pool: as :class:`RingDilatedAttention`'s.
    """

    def __init__(
        self, segment_lengths, dilation_rates, dropout: float = 0.0, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        ring_size: int | None = None, use_flash_attention: bool = True,
        enable_memory_pool: bool = False,  # the seed's arguments (spec §8), then ours
        mode: str = "longnet", softmax_scale: float | None = None,
        group: ProcessGroup | str | None = None, layout: str = "contiguous",
    ):  # fmt: skip
        super().__init__(
            segment_lengths, dilation_rates, dropout=dropout, mode=mode,
            softmax_scale=softmax_scale, layout=layout,
            **seed_arguments(ring_size, use_flash_attention, enable_memory_pool, group),
        )  # fmt: skip
        self.input_device = check_device(device)
        self.input_dtype = seed_dtype(check_dtype(dtype), self.input_device)
        self.ring_size = ring_size

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`RingDilatedAttention.forward`, after checking q's device and dtype."""
        check_tensor(q)
        want = self.input_device
        if want is not None and (
            q.device.type != want.type or want.index not in (None, q.device.index)
        ):
            raise ValueError(f"device: the module was built for {want}, got q on {q.device}")
        if self.input_dtype is not None and q.dtype != self.input_dtype:
            raise TypeError(f"dtype: the module was built for {self.input_dtype}, got {q.dtype}")
        return super().forward(q, k, v, is_causal, key_padding_mask)


class RingMultiheadDilatedAttentionHybrid(RingMultiheadDilatedAttention):
    """The seed's ``RingMultiheadDilatedAttentionHybrid``: its arguments on
    :class:`RingMultiheadDilatedAttention`.

    ``dropout`` may be positional; the rest are keyword-only, because the seed's versions
    ordered them differently. Its defaults are the seed's: ``layer_norm=True``,
    ``batch_first=True`` (the class itself has ``nn.MultiheadAttention``'s).

    Args:
        embed_dim, num_heads, segment_lengths, dilation_rates, dropout: as
            :class:`RingMultiheadDilatedAttention`.
        bias, layer_norm, gamma_init, batch_first, mode, softmax_scale, group, layout: as
            :class:`RingMultiheadDilatedAttention`.
        device, dtype: of the parameters; ``dtype=None`` with a device picks bfloat16 on a
            CUDA device that has it, float32 elsewhere (the seed's dtype selection,
            :func:`seed_dtype`).
        ring_size, use_flash_attention, enable_memory_pool: as
            :class:`RingDilatedAttentionHybrid` (``ring_size`` is
            checked against the group at construction).
    """

    def __init__(
        self, embed_dim: int, num_heads: int, segment_lengths, dilation_rates,
        dropout: float = 0.0, *, bias: bool = True, layer_norm: bool = True,
        gamma_init: float = 1.0, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, batch_first: bool = True, ring_size: int | None = None,
        use_flash_attention: bool = True, enable_memory_pool: bool = False,  # (spec §8)
        mode: str = "longnet", softmax_scale: float | None = None,
        group: ProcessGroup | str | None = None, layout: str = "contiguous",
    ):  # fmt: skip
        super().__init__(
            embed_dim,
            num_heads,
            segment_lengths,
            dilation_rates,
            dropout=dropout,
            bias=bias,
            layer_norm=layer_norm,
            gamma_init=gamma_init,
            batch_first=batch_first,
            mode=mode,
            softmax_scale=softmax_scale,
            layout=layout,
            device=device,
            dtype=seed_dtype(check_dtype(dtype), check_device(device)),
            **seed_arguments(ring_size, use_flash_attention, enable_memory_pool, group),
        )
        self.ring_size = ring_size

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False,
                attn_mask=None, average_attn_weights=True, is_causal=False):  # fmt: skip
        """:meth:`RingMultiheadDilatedAttention.forward` with the seed's default: no weights
        unless asked, so ``out, _ = mha(query, key, value)`` never forms ``seq x seq``."""
        return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                               average_attn_weights, is_causal)  # fmt: skip
