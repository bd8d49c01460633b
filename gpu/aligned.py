"""The aligned forward on CUDA: every pair's kernel calls, then one mixing pass.

When every pair is aligned (``w'`` divides n, r divides ``w'``), each pair runs in one of three
ways, and its results are kept as the kernels return them (:class:`Part`):

- **strided**: one call per pattern group on views of q, k, v (:mod:`ringsim.gpu.strided`),
  no copies. A pair with dilation r has up to r groups, each with ``h/r`` heads;
- **gathered**: the pair's selected rows of every head copied into one ``(b*S, h, m, d)``
  batch per input, one call. That costs a copy of ``n h d / r`` elements of q, k and v, but
  one call instead of r: worth it when a group's call is too small to fill the GPU, as with
  short sequences and large r;
- **streams**: strided, but the groups' calls spread over a few side CUDA streams so that
  calls too small to fill the GPU alone run side by side.

:func:`schedule` chooses, from the row tiles of one group's call per multiprocessor.

Then :func:`ringsim.gpu.mix_triton.mix_` mixes all parts into the output in one pass
(float32 weights, q's dtype out): no float32 accumulators, no per-group merge.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ringsim.config import DilatedConfig, PatternGroup
from ringsim.plan import pair_groups

from .graphs import DeviceCache
from .kernels import Kernel, attend
from .strided import group_blocks

#: A pair is gathered when one of its groups' kernel calls would have fewer row tiles
#: (``b * segments * heads * ceil(m / 128)``) than this many per multiprocessor.
GATHER_BELOW = 1.0
#: Otherwise its groups' calls run side by side on :data:`STREAMS` CUDA streams when each
#: has fewer row tiles than this many per multiprocessor (larger calls fill the GPU alone,
#: and side streams would only hold more memory).
STREAMS_BELOW = 8.0
#: How many side streams (0: none).
STREAMS = 4


@dataclass
class Part:
    """One kernel call's result: ``out (b*S, H, m, d)`` and ``lse (b*S, H, m)``. Row i of
    block ``bi*S + s``, head j, is position ``s*width + i*rate + offsets[j]`` of head
    ``heads[j]`` in pair ``pair``."""

    pair: int
    width: int
    rate: int
    heads: tuple[int, ...]
    offsets: tuple[int, ...]
    out: torch.Tensor
    lse: torch.Tensor


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles_per_sm(groups: tuple[PatternGroup, ...], b: int, n: int, device) -> float:
    """Row tiles of one group's kernel call (the largest) per multiprocessor."""
    w = groups[0].pattern.effective_length(n)
    m = w // groups[0].pattern.dilation_rate
    tiles = b * (n // w) * max(len(g.heads) for g in groups) * -(-m // 128)
    return tiles / _multiprocessors(device)


def schedule(groups: tuple[PatternGroup, ...], b: int, n: int, device: torch.device) -> str:
    """How the pair of ``groups`` runs (module docstring): ``"gathered"``, ``"streams"``
    (strided, its groups' calls side by side) or ``"strided"`` (one after the other). Only
    CUDA pairs of several groups are ever gathered or spread over streams."""
    if len(groups) < 2 or device.type != "cuda":
        return "strided"
    per_sm = _tiles_per_sm(groups, b, n, device)
    if per_sm < GATHER_BELOW:
        return "gathered"
    return "streams" if per_sm < STREAMS_BELOW and STREAMS else "strided"


#: Gather indices of recent gathered pairs (built on the host, copied once per stream).
_ROWS = DeviceCache(16)


def _pair_rows(b: int, n: int, h: int, w: int, r: int, offsets, heads) -> torch.Tensor:
    """Rows of ``x.view(b * n * h, d)`` that an aligned pair gathers, block by block:
    ``(b, S, m, H)`` flattened, for position ``s*w + i*r + offsets[j]`` of head ``heads[j]``
    (int64, on the host)."""
    positions = np.arange(0, n, w)[:, None, None] + np.arange(0, w, r)[None, :, None]
    rows = (positions + np.asarray(offsets)) * h + np.asarray(heads)  # (S, m, H)
    return torch.from_numpy((np.arange(b)[:, None, None, None] * (n * h) + rows).reshape(-1))


def _gathered(q, k, v, groups, n: int, common: dict) -> Part:
    """One call for the whole pair, on gathered copies of its rows (one ``index_select``
    per input)."""
    pattern = groups[0].pattern
    w, r = pattern.effective_length(n), pattern.dilation_rate
    heads = tuple(h for g in groups for h in g.heads)
    offsets = tuple(g.pattern.offset for g in groups for _ in g.heads)
    b, _, h, d = q.shape
    build = functools.partial(_pair_rows, b, n, h, w, r, offsets, heads)
    rows = _ROWS.get((b, n, h, w, r, offsets, heads), q.device, build)

    def blocks(x):
        flat = x.reshape(b * n * h, d)  # a view of the usual contiguous input; else a copy
        picked = torch.index_select(flat, 0, rows)  # (b*S*m*H, d)
        return picked.view(b * (n // w), w // r, len(heads), d).transpose(1, 2)

    out, lse = attend(blocks(q), blocks(k), blocks(v), **common)
    return Part(groups[0].pair, w, r, heads, offsets, out, lse)


@functools.cache
def _side_streams(device: torch.device) -> tuple[torch.cuda.Stream, ...]:
    return tuple(torch.cuda.Stream(device) for _ in range(STREAMS))


class SideStreams:
    """Work forked from the current stream onto the side streams, joined back by
    :meth:`join`: ``with sides.on(i):`` runs the i-th piece (round robin). Pieces must not
    write the same memory; tensors a piece makes and the current stream reads need
    ``record_stream(sides.main)``."""

    def __init__(self, device: torch.device) -> None:
        self.main = torch.cuda.current_stream(device)
        self.sides = _side_streams(device)
        for side in self.sides:  # what the pieces read is ready on the main stream
            side.wait_stream(self.main)

    def on(self, i: int):
        return torch.cuda.stream(self.sides[i % len(self.sides)])

    def join(self) -> None:
        for side in self.sides:
            self.main.wait_stream(side)


def attend_pairs(q, k, v, config: DilatedConfig, kernel: Kernel) -> list[Part]:
    """Every kernel call of the aligned forward over ``q, k, v (b, n, h, d)``, unmerged."""
    b, n, h, d = q.shape
    common = dict(causal=config.is_causal, scale=config.scale(d), kernel=kernel, raw_lse=True)
    parts: list[Part] = []
    pairs = pair_groups(config, h)
    plans = [schedule(groups, b, n, q.device) for groups in pairs]
    sides = SideStreams(q.device) if "streams" in plans else None
    for groups, plan in zip(pairs, plans):
        if plan == "gathered":
            parts.append(_gathered(q, k, v, groups, n, common))
            continue
        for i, g in enumerate(groups):
            w, r = g.pattern.effective_length(n), g.pattern.dilation_rate
            if plan == "streams":
                with sides.on(i):
                    out, lse = attend(*(group_blocks(x, g, n) for x in (q, k, v)), **common)
                out.record_stream(sides.main)  # made on a side stream, read by the mix on main
                lse.record_stream(sides.main)
            else:
                out, lse = attend(*(group_blocks(x, g, n) for x in (q, k, v)), **common)
            parts.append(Part(g.pair, w, r, g.heads, (g.pattern.offset,) * len(g.heads), out, lse))
    if sides is not None:
        sides.join()
    return parts


def aligned_forward(q, k, v, config: DilatedConfig, kernel: Kernel):
    """:func:`ringsim.gpu.dilated.dilated_forward` for an aligned configuration, mixed by
    Triton (the caller checked :func:`ringsim.gpu.merge.mix_reason`): out ``(b, n, h, d)``
    in q's dtype, lse ``(b, n, h)`` float32."""
    from .mix_triton import mix_

    b, n, h, _ = q.shape
    parts = attend_pairs(q, k, v, config, kernel)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, n, h, dtype=torch.float32, device=q.device)
    mix_(parts, config.effective_segment_lengths(n), config.dilation_rates, out, lse)
    return out, lse
