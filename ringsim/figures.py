"""Figures: the mask of every head and pattern, a space-time diagram of a trace, bytes and
memory per rank, and peak memory as the world size grows.

Each function returns a :class:`matplotlib.figure.Figure` drawn on its own Agg canvas:
matplotlib (the ``docs`` extra) is imported inside the functions, pyplot and the global
backend are never touched, so importing :mod:`ringsim` never imports matplotlib and figures
can be drawn from tests, threads and scripts alike. Save one with :func:`save_figure`; in a
notebook, a returned figure shows itself once ``%matplotlib inline`` is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ringsim.config import make_config, segment_bounds
from ringsim.trace import Trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Colours shared by every figure, for what a rank does with a block and for bytes.
COLOURS = {
    "full": "#4c72b0",  # every query attends every key
    "masked": "#dd8452",  # causal or masked: some (query, key) pairs are masked out
    "skip": "#c8c8c8",  # nothing attended: the block is skipped (greyed)
    "sent": "#55a868",
    "received": "#8172b3",
    "peak": "#c44e52",
}
MASK_COLOURS = ("#ffffff", "#4c72b0", "#1b2a49")  # keys chosen 0, 1, 2+ times
SEGMENT_COLOUR = "#e377c2"


def new_figure(width: float, height: float) -> Figure:
    """An empty figure on an Agg canvas of ``width`` x ``height`` inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``figure`` to ``path`` (the format from its suffix: png, svg, pdf); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


# --- masks ---------------------------------------------------------------------------------


def mask_figure(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    seq_len: int,
    num_heads: int,
    *,
    mode: str = "longnet",
    is_causal: bool = False,
    heads: Sequence[int] | None = None,
) -> Figure:
    """The ``(seq_len, seq_len)`` mask of every head (rows) and pair (columns), SPEC 3.

    Cell ``(x, y)`` is filled when query x may attend key y under that pattern (True =
    attend). Thin lines mark segment boundaries. The last column shows, per head, how many
    of its patterns choose each key (a key chosen twice counts twice, SPEC 4). In grouped
    mode a head's unused pairs are marked "not used". ``heads`` picks the heads to draw
    (default: all ``num_heads``).
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from ringsim.reference import pattern_mask  # the definition's own masks

    config = make_config(segment_lengths, dilation_rates, mode=mode, is_causal=is_causal)
    k = config.num_pairs
    cmap = ListedColormap(MASK_COLOURS)
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5], cmap.N)
    heads = list(range(num_heads) if heads is None else heads)
    figure = new_figure(1.9 * (k + 1) + 0.4, 1.9 * len(heads) + 0.6)
    axes = figure.subplots(len(heads), k + 1, squeeze=False)
    causal = ", causal" if is_causal else ""
    figure.suptitle(
        f"Masks, n={seq_len}, {mode} mode{causal}\nquery x (rows) may attend key y (columns)"
    )
    used = {(h, g.pair): g.pattern for g in config.pattern_groups(num_heads) for h in g.heads}
    for row, head in enumerate(heads):
        total = np.zeros((seq_len, seq_len), dtype=int)
        for pair in range(k):
            ax = axes[row, pair]
            p = used.get((head, pair))
            if p is None:  # grouped mode: this head's group uses another pair
                ax.text(0.5, 0.5, "not used", ha="center", va="center", color="grey")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_box_aspect(1)
                ax.set_title(f"head {head}, pair {pair}", fontsize=9)
                continue
            mask = pattern_mask(p, seq_len, is_causal=is_causal)
            total += mask
            _draw_mask(ax, mask.astype(int), cmap, norm, p.segment_length, seq_len)
            ax.set_title(
                f"head {head}: w={p.segment_length} r={p.dilation_rate} o={p.offset}", fontsize=9
            )
        _draw_mask(axes[row, k], np.minimum(total, 2), cmap, norm, None, seq_len)
        axes[row, k].set_title(f"head {head}: all patterns", fontsize=9)
        axes[row, 0].set_ylabel("query x")
    for ax in axes[-1]:
        ax.set_xlabel("key y")
    handles = [
        Patch(facecolor=MASK_COLOURS[1], label="x may attend y"),
        Patch(facecolor=MASK_COLOURS[2], label="chosen by two patterns (counts twice)"),
        Line2D([], [], color=SEGMENT_COLOUR, lw=1, label="segment boundary"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8)
    return figure


def _draw_mask(ax, values: np.ndarray, cmap, norm, segment_length: int | None, n: int) -> None:
    ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(n - 0.5, -0.5)
    for spine in ax.spines.values():
        spine.set_color("#888888")
    if segment_length is not None:  # segment boundaries (not at the edges)
        for start, _ in segment_bounds(segment_length, n)[1:]:
            ax.axhline(start - 0.5, color=SEGMENT_COLOUR, lw=0.8)
            ax.axvline(start - 0.5, color=SEGMENT_COLOUR, lw=0.8)
    if n <= 48:  # thin white lines between cells, so neighbouring cells stay apart
        ax.set_xticks(np.arange(-0.5, n), minor=True)
        ax.set_yticks(np.arange(-0.5, n), minor=True)
        ax.grid(which="minor", color="white", lw=0.4)
        ax.tick_params(which="minor", length=0)
    ticks = list(range(0, n, max(1, n // 4)))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.tick_params(labelsize=7)


# --- bytes and memory per rank -----------------------------------------------------------


def traffic_figure(trace: Trace, *, title: str | None = None) -> Figure:
    """Bytes each rank sent and received (left) and its peak bytes held (right)."""
    ranks = np.arange(trace.world_size)
    sent = [trace.sent_bytes(r) for r in ranks]
    received = [trace.received_bytes(r) for r in ranks]
    figure = new_figure(max(7.0, 1.1 * trace.world_size + 3.5), 3.4)
    left, right = figure.subplots(1, 2)
    width = 0.38
    left.bar(ranks - width / 2, sent, width, label="sent", color=COLOURS["sent"])
    left.bar(ranks + width / 2, received, width, label="received", color=COLOURS["received"])
    left.set_title("payload bytes per rank")
    left.legend(fontsize=8)
    right.bar(ranks, trace.peak_bytes, 0.6, color=COLOURS["peak"])
    right.set_title("peak bytes held per rank")
    for ax, values in ((left, sent + received), (right, list(trace.peak_bytes))):
        ax.set_xlabel("rank")
        ax.set_ylabel("bytes")
        ax.set_xticks(ranks)
        ax.set_ylim(0, 1.15 * max(max(values, default=0), 1))
        ax.grid(axis="y", alpha=0.3)
    for r, peak in zip(ranks, trace.peak_bytes):
        right.annotate(f"{peak}", (r, peak), ha="center", va="bottom", fontsize=7)
    total = sum(sent)
    figure.suptitle(title or f"Traffic and memory: {trace.world_size} ranks, {total} bytes sent")
    return figure


def scaling_figure(
    world_sizes: Sequence[int],
    peak_bytes: Sequence[int],
    sent_bytes: Sequence[int] | None = None,
    *,
    title: str = "Memory per rank as the world size P grows",
) -> Figure:
    """The largest peak bytes of any rank against P, next to ``peak(P0) * P0 / P`` (O(n/P)).

    Args:
        world_sizes: the world sizes P, ascending.
        peak_bytes: for each P, the largest ``trace.peak_bytes`` of any rank.
        sent_bytes: for each P, the largest bytes any rank sent (optional, second panel).
    """
    p = np.asarray(world_sizes, dtype=float)
    peaks = np.asarray(peak_bytes, dtype=float)
    panels = 1 if sent_bytes is None else 2
    figure = new_figure(4.2 * panels + 0.6, 3.5)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    axes[0].plot(p, peaks, "o-", color=COLOURS["peak"], label="largest peak of any rank")
    axes[0].plot(p, peaks[0] * p[0] / p, "--", color="grey", label="O(n/P): peak(P0)·P0/P")
    axes[0].set_title("peak bytes held per rank", fontsize=10)
    if sent_bytes is not None:
        axes[1].plot(p, sent_bytes, "o-", color=COLOURS["sent"], label="most bytes sent by a rank")
        axes[1].set_title("payload bytes sent per rank", fontsize=10)
    for ax in axes:
        ax.set_xlabel("world size P")
        ax.set_ylabel("bytes")
        ax.set_xticks(list(world_sizes))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title)
    return figure


# --- the space-time diagram of a trace ----------------------------------------------------


def trace_figure(trace: Trace, *, title: str | None = None) -> Figure:
    """Ranks (rows) by steps (columns): the blocks each rank holds, and the messages.

    In each cell, one box per block the rank holds at that step: ``B2 p1`` is rank 2's
    K/V block of pair 1, coloured by what the rank's queries need from it (every key,
    causal/masked, or nothing: skipped, grey). An arrow is one message: it leaves the box
    of the block a rank sends during step t-1 and points at the box of the same block on
    the receiving rank at step t, labelled with its payload bytes. Drawn by
    :func:`ringsim.figures_trace.draw_trace`.
    """
    from ringsim.figures_trace import draw_trace

    return draw_trace(trace, title=title)
