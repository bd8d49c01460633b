"""How one batch's kernel calls run on CUDA: as views one after the other, side by side on
side streams, or as one call on gathered rows.

A pair with dilation r has up to r pattern groups, each with ``h/r`` heads. Each runs in one
of three ways (:class:`Schedule`):

- ``STRIDED``: one call per pattern group on views (:mod:`ringsim.gpu.executor.layout`),
  no copies;
- ``STREAMS``: the same calls spread over a few side CUDA streams, so that calls too small
  to fill the GPU alone run side by side;
- ``GATHERED``: the pair's rows of every head copied into the gathered layout, one call for
  the whole pair. That costs a copy of ``n h d / r`` elements of q (and of k, v for the own
  block), but one call instead of r: worth it when a group's call is too small to fill the
  GPU, as with short sequences and large r. Blocks received over the ring are already in
  that layout. Where the layout is a view of the inputs (one head per group,
  :func:`~ringsim.gpu.executor.layout.pair_view`), or the pair splits into head slices that
  are (one head of every group each: h/r calls, where groups have fewer heads than there
  are groups; :meth:`~ringsim.gpu.executor.base.Executor.views`), nothing is copied, and
  that is always taken.

:func:`schedule` chooses from the row tiles of one group's call per multiprocessor.
"""

from __future__ import annotations

import functools
from enum import Enum

import torch

from ringsim.config import PatternGroup

#: A pair is gathered when one of its groups' kernel calls would have fewer row tiles
#: (``b * segments * heads * ceil(m / 128)``) than this many per multiprocessor.
GATHER_BELOW = 1.0
#: Otherwise its groups' calls run side by side on :data:`STREAMS` CUDA streams when each
#: has fewer row tiles than this many per multiprocessor (larger calls fill the GPU alone,
#: and side streams would only hold more memory).
STREAMS_BELOW = 8.0
#: How many side streams (0: none).
STREAMS = 4


class Schedule(Enum):
    """How the kernel calls of one batch run (module docstring)."""

    STRIDED = "strided"
    STREAMS = "streams"
    GATHERED = "gathered"


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def tiles_per_sm(
    groups: tuple[PatternGroup, ...], b: int, segments: int, rows: int, device
) -> float:
    """Row tiles of one group's kernel call (the largest) per multiprocessor: ``segments``
    blocks of ``rows`` query rows per batch entry."""
    tiles = b * segments * max(len(g.heads) for g in groups) * -(-rows // 128)
    return tiles / _multiprocessors(device)


def schedule(
    groups: tuple[PatternGroup, ...],
    b: int,
    segments: int,
    rows: int,
    device: torch.device,
    *,
    gather: bool = True,
    free: bool = False,
) -> Schedule:
    """How the batch of a pair with ``groups`` runs (module docstring). Only CUDA pairs of
    several groups are ever gathered (``gather``: the caller can mix a part of several
    offsets) or spread over streams; ``free``: the gathered layout is a view of the inputs
    (no copy), so gathering is always worth it."""
    if len(groups) < 2 or device.type != "cuda":
        return Schedule.STRIDED
    if free and gather:
        return Schedule.GATHERED
    per_sm = tiles_per_sm(groups, b, segments, rows, device)
    if per_sm < GATHER_BELOW and gather:
        return Schedule.GATHERED
    return Schedule.STREAMS if per_sm < STREAMS_BELOW and STREAMS else Schedule.STRIDED


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
