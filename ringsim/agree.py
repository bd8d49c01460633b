"""Ranks of one ring agree on their input before the ring starts, or fail together.

Each rank validates its own input first (no communication). Then every rank shares, in one
collective, a description of its configuration and shard shapes and whether its own check
failed. Every rank then raises the same kind of error with one message, instead of some
ranks entering the ring and waiting forever for ranks that never come (spec §7).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ringsim.comm.base import Communicator
from ringsim.config import DilatedConfig, check_qkv, make_config
from ringsim.layout import Layout, check_layout

#: How many agreed descriptions a communicator with an ``agreed`` memory keeps.
REMEMBERED = 32


def agree(comm: Communicator, description: str, error: Exception | None) -> None:
    """Raise on every rank unless every rank passed its checks with the same description.

    A communicator with an ``agreed`` memory (an ordered dict, as the torch.distributed one
    has) skips the collective for a description every rank has agreed on before: a steady
    training loop agrees once per new configuration, not at every call. Ranks that then
    diverge (one repeats an agreed configuration while another changes it) are no longer
    caught here but by the ring's own communication timing out (torch.distributed's
    ``timeout``).

    Args:
        comm: the ring's communicator (one ``allgather``).
        description: this rank's configuration and shard shapes, as text.
        error: the exception this rank's own checks raised, or None.
    Raises:
        the rank's own ``error``; else ``ValueError`` naming the rank that failed or the
        ranks that disagree.
    """
    known = getattr(comm, "agreed", None)
    if known is not None and error is None and description in known:
        known.move_to_end(description)
        return
    message = None if error is None else f"{type(error).__name__}: {error}"
    reports = comm.allgather((description, message))
    if error is not None:
        raise error
    for rank, (_, other) in enumerate(reports):
        if other is not None:
            raise ValueError(f"rank {rank} rejected its input, so every rank stops: {other}")
    descriptions = [d for d, _ in reports]
    if any(d != descriptions[0] for d in descriptions):
        lines = "; ".join(f"rank {r}: {d}" for r, d in enumerate(descriptions))
        raise ValueError(f"ranks disagree on the configuration or shard shapes: {lines}")
    if known is not None:
        known[description] = None
        while len(known) > REMEMBERED:
            known.popitem(last=False)


def _device_type(x: Any) -> str:
    """``'cpu'`` for a NumPy array, the device type (``'cuda'``, ``'cpu'``...) of a tensor:
    ranks on different kinds of device cannot exchange blocks, so they disagree."""
    device = getattr(x, "device", "cpu")
    return str(getattr(device, "type", device))


def agreed_config(
    comm: Communicator,
    q: Any,
    k: Any,
    v: Any,
    segment_lengths: Any,
    dilation_rates: Any,
    *,
    is_causal: bool,
    mode: str,
    softmax_scale: float | None,
    check_array: Callable[[Any], None],
    layout: Layout | str = Layout.CONTIGUOUS,
    allow_gqa: bool = False,
    key_padding: bool = False,
    dropout: float = 0.0,
) -> tuple[DilatedConfig, tuple[int, int, int, int]]:
    """Check this rank's shards, configuration and layout, then :func:`agree` with every
    rank.

    ``check_array(q)`` is the backend's own type check (NumPy or torch). Returns the
    configuration and the shard shape ``(b, c, h, d)``.
    """
    error, description, config, shape = None, "", None, (0, 0, 0, 0)
    try:
        config = make_config(
            segment_lengths,
            dilation_rates,
            is_causal=is_causal,
            mode=mode,
            softmax_scale=softmax_scale,
        )
        shape = check_qkv(q, k, v, allow_gqa=allow_gqa)
        check_array(q)
        config.head_groups(shape[2])
        layout = check_layout(layout, shape[1] * comm.world_size, comm.world_size)
        description = (
            f"w={config.segment_lengths} r={config.dilation_rates} "
            f"{config.mode.value} causal={config.is_causal} "
            f"scale={config.softmax_scale} shard={shape} kv_heads={k.shape[2]} {q.dtype} "
            f"on {_device_type(q)} "
            f"layout={layout.value} key_padding={key_padding}"
            + (f" dropout={dropout}" if dropout else "")
        )
    except (TypeError, ValueError, NotImplementedError) as err:
        error = err
    agree(comm, description, error)
    return config, shape
