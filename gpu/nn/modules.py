"""The attention module of ring dilated attention (spec §4, §6), and the argument checks the
modules share.

:class:`RingDilatedAttention`: q, k, v ``(batch, seq_len, num_heads, head_dim)`` in, out of
the same shape; on one device it runs :func:`ringsim.gpu.dilated_attention`, over a process
group :func:`ringsim.gpu.ring_dilated_attention` on each rank's shards.

The multihead module lives in :mod:`ringsim.gpu.nn.multihead`, the seed's names for both in
:mod:`ringsim.gpu.nn.seed`. Every argument works as documented or raises an error naming
it; none is silently ignored (pitfall 17).
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ringsim.config import DilatedConfig, make_config, validate
from ringsim.layout import Layout, check_layout

from ..executor import dilated_attention, prepare
from ..executor.pool import MemoryPool
from ..kernels import Kernel, as_kernel

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

#: ``group="default"``: the default process group, looked up when forward runs.
DEFAULT_GROUP = "default"


# --- argument checks, shared with ringsim.gpu.nn.multihead and ringsim.gpu.nn.seed ----------


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


def check_dropout(dropout: Any) -> float:
    """A probability in ``[0, 1)``: attention dropout scales what it keeps by
    ``1 / (1 - p)``, so 1 has no meaning."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout: expected a float in [0, 1), got {dropout!r}")
    if not 0.0 <= float(dropout) < 1.0:  # NaN fails too
        raise ValueError(f"dropout: must be in [0, 1), got {dropout}")
    return float(dropout)


def check_kernel(kernel: Kernel | str | None) -> Kernel | None:
    """A :class:`Kernel` name or None (the fastest that can run, chosen on the inputs)."""
    return None if kernel is None else as_kernel(kernel)


def check_group(group: Any) -> ProcessGroup | str | None:
    """None (one device), ``"default"`` or a ``torch.distributed.ProcessGroup``."""
    if group is None:
        return None
    if isinstance(group, str):
        if group != DEFAULT_GROUP:
            raise ValueError(
                f"group: the only string accepted is 'default' (the default process group), "
                f"got {group!r}"
            )
        return group
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("group: torch.distributed is not available in this torch build")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group: expected None, 'default' or a torch.distributed.ProcessGroup, "
            f"got {type(group).__name__}"
        )
    return group


def check_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise TypeError(f"device: expected a torch.device, str or int, got {device!r}")
    try:
        return torch.device(device)
    except RuntimeError as err:  # torch's own message says which strings are legal
        raise ValueError(f"device: {err}") from err


def check_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    return dtype


# --- the module ----------------------------------------------------------------------------


class RingDilatedAttention(nn.Module):
    """Dilated attention (spec §4) as a module, on one device or over a process group.

    Args:
        segment_lengths, dilation_rates: positive ints, equal length (spec §1).
        dropout: probability of dropping an attention probability in training mode (spec
            §4; the kernels' own dropout, the patterns mixed with the weights before dropout:
            Note [Dropout] in :mod:`ringsim.gpu.kernels.dropout`), in ``[0, 1)``; eval mode
            applies none.
        mode: ``"longnet"`` or ``"grouped"`` (spec §2).
        softmax_scale: default ``1/sqrt(head_dim)``.
        kernel: a :class:`~ringsim.gpu.kernels.Kernel` (or its name) to use; default the
            fastest that can run on the inputs (:func:`~ringsim.gpu.kernels.choose_kernel`).
            One that cannot run raises ``ValueError`` in forward. ``last_kernel`` records
            the kernel of the last successful eager forward (under ``torch.compile`` the
            choice is made inside the operator, on the real tensors, and not recorded).
        group: None: one device, q/k/v are whole sequences. ``"default"``: the default
            ``torch.distributed`` process group, looked up in forward. A ``ProcessGroup``:
            that group. With a group, q/k/v are this rank's shards (the positions ``layout``
            gives rank j; :func:`ringsim.shard` cuts them) and out is this rank's shard
            (spec §5).
        layout: with a group, ``"contiguous"`` (rank j holds ``[j*c, (j+1)*c)``) or
            ``"zigzag"`` (chunks j and 2P-1-j of 2P: balanced causal work); without one, a
            layout other than the default raises ``ValueError`` (one device has no shards).
        enable_memory_pool: keep the executor's working buffers (accumulators, lse, gradient
            totals) across calls of the same shapes in ``self.memory_pool`` (a
            :class:`~ringsim.gpu.executor.pool.MemoryPool`, freed with the module; Note [The
            memory pool]); False allocates them per call.

    The configuration is validated here; errors name the argument (spec §7).
    """

    def __init__(
        self,
        segment_lengths,
        dilation_rates,
        *,
        dropout: float = 0.0,
        mode: str = "longnet",
        softmax_scale: float | None = None,
        kernel: Kernel | str | None = None,
        group: ProcessGroup | str | None = None,
        layout: str = "contiguous",
        enable_memory_pool: bool = False,
    ):
        super().__init__()
        self.config: DilatedConfig = make_config(
            segment_lengths, dilation_rates, mode=mode, softmax_scale=softmax_scale
        )
        self.dropout = check_dropout(dropout)
        self.kernel = check_kernel(kernel)
        self.group = check_group(group)
        self.layout = check_layout(layout)
        if self.group is None and self.layout is not Layout.CONTIGUOUS:
            raise ValueError(
                f"layout: {self.layout.value!r} says which positions each rank of a ring holds; "
                "without a group the module runs on one device: pass a group, or leave layout"
            )
        self.last_kernel: Kernel | None = None
        pooled = check_bool("enable_memory_pool", enable_memory_pool)
        self.memory_pool = MemoryPool() if pooled else None

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"segment_lengths={c.segment_lengths}, dilation_rates={c.dilation_rates}, "
            f"mode={c.mode.value!r}, dropout={self.dropout}, "
            f"kernel={self.kernel.value if self.kernel else None!r}, group={self.group!r}"
            + (f", layout={self.layout.value!r}" if self.group is not None else "")
        )

    @property
    def dropout_p(self) -> float:
        """The dropout applied now: ``dropout`` in training mode, 0 in eval mode."""
        return self.dropout if self.training else 0.0

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend ``q, k, v (batch, seq_len, num_heads, head_dim)``, one float dtype and device.

        With a group, ``seq_len`` is this rank's shard length. k and v may have fewer heads
        than q (grouped-query attention, :func:`ringsim.gpu.dilated_attention`).
        ``key_padding_mask``: ``(batch, seq_len)`` (a rank's shard with a group), bool True =
        padding or float added to each key's scores, as
        :func:`ringsim.gpu.dilated_attention` takes it.
        Returns out, same shape and dtype as q (differentiable).
        """
        c = self.config
        kwargs = {"is_causal": is_causal, "mode": c.mode.value, "softmax_scale": c.softmax_scale}
        validate(q, k, v, c.segment_lengths, c.dilation_rates, **kwargs,
                 allow_gqa=True)  # before the kernel  # fmt: skip
        kwargs["key_padding_mask"] = key_padding_mask
        kwargs["dropout_p"] = self.dropout_p
        kwargs["memory_pool"] = self.memory_pool
        if self.group is None and torch.compiler.is_compiling() and not kwargs["dropout_p"]:
            args = (q, k, v, c.segment_lengths, c.dilation_rates)
            return dilated_attention(*args, **kwargs, kernel=self.kernel)
        needs = {"masked": key_padding_mask is not None, "dropout": self.dropout_p > 0}
        q, k, v, chosen = prepare(q, k, v, self.kernel, c.softmax_scale, **needs)
        args = (q, k, v, c.segment_lengths, c.dilation_rates)
        if self.group is None:
            out = dilated_attention(*args, **kwargs, kernel=chosen)
        else:
            from ..ring import ring_dilated_attention

            group = None if isinstance(self.group, str) else self.group  # None: default
            out = ring_dilated_attention(
                *args, **kwargs, group=group, kernel=chosen, layout=self.layout
            )
        self.last_kernel = chosen
        return out
