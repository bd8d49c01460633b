"""Work, bytes and memory per rank: one trace's balance and traffic, and peak memory as the
world size grows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ringsim.trace import Trace

from .canvas import COLOURS, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def traffic_figure(trace: Trace, *, title: str | None = None) -> Figure:
    """Each rank's work (the scores it computed, :meth:`~ringsim.trace.Trace.work`, against
    the mean: a step lasts as long as its busiest rank), the bytes it sent and received, and
    its peak bytes held."""
    ranks = np.arange(trace.world_size)
    sent = [trace.sent_bytes(r) for r in ranks]
    received = [trace.received_bytes(r) for r in ranks]
    work = [trace.work(r) for r in ranks]
    figure = new_figure(max(10.0, 1.5 * trace.world_size + 5.0), 3.4)
    busy, left, right = figure.subplots(1, 3)
    mean = float(np.mean(work)) if work else 0.0
    busy.bar(ranks, work, 0.6, color=COLOURS["compute"])
    busy.axhline(mean, color="grey", linestyle="--", linewidth=1, label="mean")
    busy.set_title(f"work per rank (busiest / mean = {max(work) / (mean or 1):.2f})")
    busy.legend(fontsize=8)
    busy.set_ylabel("(query, key) scores")
    width = 0.38
    left.bar(ranks - width / 2, sent, width, label="sent", color=COLOURS["sent"])
    left.bar(ranks + width / 2, received, width, label="received", color=COLOURS["received"])
    left.set_title("payload bytes per rank")
    left.legend(fontsize=8)
    right.bar(ranks, trace.peak_bytes, 0.6, color=COLOURS["peak"])
    right.set_title("peak bytes held per rank")
    for ax, values in ((busy, work), (left, sent + received), (right, list(trace.peak_bytes))):
        ax.set_xlabel("rank")
        if ax is not busy:
            ax.set_ylabel("bytes")
        ax.set_xticks(ranks)
        ax.set_ylim(0, 1.15 * max(max(values, default=0), 1))
        ax.grid(axis="y", alpha=0.3)
    for r, peak in zip(ranks, trace.peak_bytes):
        right.annotate(f"{peak}", (r, peak), ha="center", va="bottom", fontsize=7)
    total = sum(sent)
    figure.suptitle(
        title or f"Work, traffic and memory: {trace.world_size} ranks, {total} bytes sent"
    )
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
