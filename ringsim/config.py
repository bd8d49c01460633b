"""Configuration shared by every backend: patterns, heads, validation (spec §1, §3, §5, §7).

Nothing here computes attention. It answers three questions the same way for the NumPy
reference, the simulated ring and the torch backend:

1. which patterns ``(segment_length, dilation_rate, offset)`` each head uses (spec §2);
2. which global positions a pattern selects (spec §3);
3. whether the inputs are legal (spec §7), with errors that name the argument and the rule.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np


class Mode(str, Enum):
    """How heads map to ``(segment_length, dilation_rate)`` pairs (spec §2)."""

    LONGNET = "longnet"  # every head uses every pair, offset = head mod rate
    GROUPED = "grouped"  # contiguous head groups, group i uses pair i only


@dataclass(frozen=True)
class Pattern:
    """One ``(segment_length, dilation_rate, offset)`` triple (spec §1).

    ``segment_length`` is the configured one; :meth:`effective_length` clips it to n.
    """

    segment_length: int
    dilation_rate: int
    offset: int

    def effective_length(self, seq_len: int) -> int:
        """``w' = min(w, n)`` (spec §3)."""
        return min(self.segment_length, seq_len)


@dataclass(frozen=True)
class PatternGroup:
    """The heads that share one pattern; ``pair`` is the index i of ``(w_i, r_i)``."""

    pair: int
    pattern: Pattern
    heads: tuple[int, ...]


@dataclass(frozen=True)
class DilatedConfig:
    """A validated configuration; build it with :func:`make_config`."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    mode: Mode = Mode.LONGNET
    is_causal: bool = False
    softmax_scale: float | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.segment_lengths)

    def kwargs(self) -> dict:
        """The keyword arguments every entry point takes, to pass this configuration on."""
        return dict(
            is_causal=self.is_causal, mode=self.mode.value, softmax_scale=self.softmax_scale
        )

    def scale(self, head_dim: int) -> float:
        """The softmax scale, ``1/sqrt(head_dim)`` unless given (spec §1)."""
        if self.softmax_scale is not None:
            return float(self.softmax_scale)
        return 1.0 / math.sqrt(head_dim)

    def head_groups(self, num_heads: int) -> tuple[range, ...]:
        """The heads of each pair: all heads (longnet) or pair i's group (grouped)."""
        if self.mode is Mode.LONGNET:
            return tuple(range(num_heads) for _ in range(self.num_pairs))
        if num_heads < self.num_pairs:
            raise ValueError(
                f"num_heads: grouped mode needs at least one head per pair, got "
                f"num_heads={num_heads} for {self.num_pairs} pairs"
            )
        base, extra = divmod(num_heads, self.num_pairs)
        groups, start = [], 0
        for i in range(self.num_pairs):
            size = base + (1 if i < extra else 0)  # the first `extra` groups one larger
            groups.append(range(start, start + size))
            start += size
        return tuple(groups)

    def head_patterns(self, num_heads: int) -> tuple[tuple[Pattern, ...], ...]:
        """For each head h, the patterns it uses; offset is ``h mod r_i`` (spec §2)."""
        per_head: list[list[Pattern]] = [[] for _ in range(num_heads)]
        for group in self.pattern_groups(num_heads):
            for h in group.heads:
                per_head[h].append(group.pattern)
        return tuple(tuple(p) for p in per_head)

    def pattern_groups(self, num_heads: int) -> tuple[PatternGroup, ...]:
        """Heads grouped by identical pattern, ordered by pair then offset.

        Every backend loops over these: one group is one select/attend/scatter.
        """
        groups = []
        for pair, heads in enumerate(self.head_groups(num_heads)):
            w, r = self.segment_lengths[pair], self.dilation_rates[pair]
            by_offset: dict[int, list[int]] = {}
            for h in heads:
                by_offset.setdefault(h % r, []).append(h)
            for offset in sorted(by_offset):
                groups.append(PatternGroup(pair, Pattern(w, r, offset), tuple(by_offset[offset])))
        return tuple(groups)

    def effective_segment_lengths(self, seq_len: int) -> tuple[int, ...]:
        """``w'_i = min(w_i, n)`` for every pair (spec §3)."""
        return tuple(min(w, seq_len) for w in self.segment_lengths)

    def is_aligned(self, seq_len: int, world_size: int = 1) -> bool:
        """spec §5's aligned case, where the closed-form byte count holds.

        Each ``w'`` divides n; each ``w' <= c`` divides c and each ``w' > c`` is a multiple of
        c; each ``r`` divides its ``w'`` and c (``c = n / world_size``).
        """
        if seq_len % world_size:
            return False
        c = seq_len // world_size
        for w_eff, r in zip(self.effective_segment_lengths(seq_len), self.dilation_rates):
            if seq_len % w_eff or w_eff % r or c % r:
                return False
            if (w_eff <= c and c % w_eff) or (w_eff > c and w_eff % c):
                return False
        return True


def segment_bounds(segment_length: int, seq_len: int) -> list[tuple[int, int]]:
    """Segments ``[s*w', min((s+1)*w', n))`` of a sequence of length n (spec §3)."""
    w_eff = min(segment_length, seq_len)
    return [(start, min(start + w_eff, seq_len)) for start in range(0, seq_len, w_eff)]


def selected_range(pattern: Pattern, seg_start: int, lo: int, hi: int) -> range:
    """Positions in ``[lo, hi)`` selected by ``pattern`` in the segment starting at ``seg_start``.

    ``[lo, hi)`` is any part of that segment (for example the part one rank holds).
    Positions are global and the offset counts from the segment start, never from ``lo``
    (pitfall 1). Returns an ascending ``range``, empty when nothing is selected.
    """
    r, o = pattern.dilation_rate, pattern.offset
    first = seg_start + o  # first selected position of the segment
    if lo > first:
        first += -(-(lo - first) // r) * r  # round up to the next selected position
    return range(first, max(first, hi), r)


def positions(rows: range) -> np.ndarray:
    """A range of positions as an int64 array."""
    return np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)


def selected_in_segment(pattern: Pattern, seg_start: int, lo: int, hi: int) -> np.ndarray:
    """:func:`selected_range` as an int64 array of global positions."""
    return positions(selected_range(pattern, seg_start, lo, hi))


# --- validation (spec §7) -------------------------------------------------------------------


def _check_int_tuple(name: str, values: Any) -> tuple[int, ...]:
    """An ordered sequence of positive ints: a list, tuple or range, or a 1-d integer array (not
    a set or dict, whose order is not the user's, nor a 0-d array or a string)."""
    ordered = isinstance(values, Sequence) and not isinstance(values, (str, bytes))
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise TypeError(f"{name}: expected a 1-d sequence of positive ints, got a "
                        f"{values.ndim}-d array")  # fmt: skip
    if not (ordered or isinstance(values, np.ndarray)):
        raise TypeError(
            f"{name}: expected a sequence (list or tuple) of positive ints, got {values!r}"
        )
    out = []
    for x in values:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name}: every entry must be an int, got {x!r}")
        if x < 1:
            raise ValueError(f"{name}: every entry must be >= 1, got {int(x)}")
        if x > MAX_LENGTH:
            raise ValueError(f"{name}: every entry must be <= 2**62, got {int(x)}")
        out.append(int(x))
    if not out:
        raise ValueError(f"{name}: must not be empty")
    return tuple(out)


#: The largest segment length or dilation rate: positions and rates are 64-bit integers in
#: NumPy and torch, and a length of 2**62 is already past any sequence.
MAX_LENGTH = 2**62


def make_config(
    segment_lengths: Any,
    dilation_rates: Any,
    *,
    is_causal: bool = False,
    mode: str | Mode = "longnet",
    softmax_scale: float | None = None,
) -> DilatedConfig:
    """Validate the configuration arguments and freeze them (spec §7).

    Raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value, each naming
    the argument and the rule it breaks.
    """
    seg = _check_int_tuple("segment_lengths", segment_lengths)
    rates = _check_int_tuple("dilation_rates", dilation_rates)
    if len(seg) != len(rates):
        raise ValueError(
            f"segment_lengths and dilation_rates: must have equal length, got {len(seg)} "
            f"and {len(rates)}"
        )
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal: expected a bool, got {is_causal!r}")
    if isinstance(mode, Mode):
        mode_value = mode
    elif isinstance(mode, str):
        try:
            mode_value = Mode(mode)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in Mode)
            raise ValueError(f"mode: must be one of {choices}, got {mode!r}") from None
    else:
        raise TypeError(f"mode: expected a str, got {mode!r}")
    scale: float | None = None
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale: expected a real number or None, got {softmax_scale!r}")
        try:
            scale = float(softmax_scale)
        except OverflowError:  # an int past float's range
            digits = len(str(abs(int(softmax_scale))))
            raise ValueError(
                f"softmax_scale: must be finite, got an int of {digits} digits"
            ) from None
        if not math.isfinite(scale):
            raise ValueError(f"softmax_scale: must be finite, got {scale}")
    return DilatedConfig(seg, rates, mode_value, bool(is_causal), scale)


def check_qkv(q: Any, k: Any, v: Any, *, allow_gqa: bool = False) -> tuple[int, int, int, int]:
    """Check that q, k, v are 4-d ``(batch, seq_len, num_heads, head_dim)`` and alike.

    With ``allow_gqa``, k and v may have fewer heads than q (grouped-query attention, spec
    §1): a number of K/V heads that divides q's. Works on anything with ``ndim``, ``shape``
    and ``dtype`` (NumPy arrays, torch tensors). Returns q's shape.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not all(hasattr(x, a) for a in ("ndim", "shape", "dtype")):
            raise TypeError(f"{name}: expected an array or tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"{name}: must be 4-dimensional (batch, seq_len, num_heads, head_dim), "
                f"got shape {tuple(x.shape)}"
            )
    q_shape, k_shape = tuple(q.shape), tuple(k.shape)
    for name, x in (("k", k), ("v", v)):
        x_shape = tuple(x.shape)
        same_but_heads = x_shape[:2] + x_shape[3:] == q_shape[:2] + q_shape[3:]
        if not same_but_heads or (x_shape[2] != q_shape[2] and not allow_gqa):
            raise ValueError(f"{name}: shape must equal q's, got {x_shape} and {q_shape}"
                             + ("" if not same_but_heads else GQA_NOT_HERE))  # fmt: skip
    if tuple(v.shape) != k_shape:
        raise ValueError(f"v: shape must equal k's, got {tuple(v.shape)} and {k_shape}")
    if k_shape[2] < 1 or q_shape[2] % k_shape[2]:
        raise ValueError(
            f"k: the number of K/V heads must divide q's (grouped-query attention), got "
            f"{k_shape[2]} K/V heads for {q_shape[2]} query heads"
        )
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: dtype must equal q's, got {x.dtype} and {q.dtype}")
    shape = tuple(int(s) for s in q_shape)
    for axis, size in zip(("batch", "seq_len", "num_heads", "head_dim"), shape):
        if size < 1:
            raise ValueError(f"q: {axis} must be >= 1, got shape {shape}")
    return shape  # type: ignore[return-value]


#: Why a path that has not got grouped-query attention yet refuses fewer K/V heads.
GQA_NOT_HERE = (
    " (fewer K/V heads than query heads, grouped-query attention, is supported by "
    "ringsim.reference and by ringsim.gpu.dilated_attention on one device; the torch ring "
    "does not have it yet)"
)


def kv_ratio(num_heads: int, num_kv_heads: int) -> int:
    """Query heads per K/V head: query head h reads K/V head ``h // kv_ratio`` (spec §1)."""
    return num_heads // num_kv_heads


def kv_heads(heads: Sequence[int], ratio: int) -> tuple[int, ...]:
    """The K/V heads that query ``heads`` read, each once, in order."""
    return tuple(sorted({h // ratio for h in heads}))


def check_key_padding(mask: Any, batch: int, seq_len: int) -> np.ndarray | None:
    """``key_padding_mask`` (spec §1): None, or a bool array ``(batch, seq_len)`` (a ring
    rank: its shard's rows), True = padding. Returns it as a NumPy bool array."""
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise TypeError(
            f"key_padding_mask: expected a NumPy bool array (True = padding), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if mask.shape != (batch, seq_len):
        raise ValueError(
            f"key_padding_mask: shape must be (batch, seq_len) = {(batch, seq_len)}, got "
            f"{mask.shape}"
        )
    return mask


def check_flags(**flags: Any) -> None:
    """Each keyword (``return_lse=...``, ``return_trace=...``) is a bool: a string such as
    ``'yes'`` would otherwise be read as True."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name}: expected a bool, got {value!r}")


def check_world_size(seq_len: int, world_size: Any) -> int:
    """``world_size`` is a positive int dividing ``seq_len`` (spec §5, §7)."""
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral):
        raise TypeError(f"world_size: expected an int, got {world_size!r}")
    if world_size < 1:
        raise ValueError(f"world_size: must be >= 1, got {world_size}")
    if seq_len % world_size:
        raise ValueError(
            f"world_size: seq_len must be divisible by world_size, got seq_len={seq_len}, "
            f"world_size={world_size}"
        )
    return int(world_size)


def validate(
    q: Any,
    k: Any,
    v: Any,
    segment_lengths: Any,
    dilation_rates: Any,
    *,
    is_causal: bool = False,
    mode: str | Mode = "longnet",
    softmax_scale: float | None = None,
    world_size: int = 1,
    allow_gqa: bool = False,
) -> DilatedConfig:
    """Every spec §7 check for global q, k, v; returns the frozen configuration.
    ``allow_gqa``: k and v may have fewer heads than q (:func:`check_qkv`)."""
    config = make_config(
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        mode=mode,
        softmax_scale=softmax_scale,
    )
    _, seq_len, num_heads, _ = check_qkv(q, k, v, allow_gqa=allow_gqa)
    config.head_groups(num_heads)  # raises for grouped mode with too few heads
    check_world_size(seq_len, world_size)
    return config
