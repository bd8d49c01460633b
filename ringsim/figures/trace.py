"""The space-time diagram of a trace: ranks by steps, blocks as boxes, messages as arrows."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ringsim.trace import Trace, TraceAction

from .canvas import COLOURS, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def block_kind(detail: str) -> str:
    """``'full'``, ``'masked'`` or ``'skip'`` from an event's per-group block actions."""
    actions = set(detail.split(","))
    if actions & {"causal", "masked"}:
        return "masked"
    return "full" if "full" in actions else "skip"


def trace_figure(trace: Trace, *, title: str | None = None) -> Figure:
    """Ranks (rows) by steps (columns): the blocks each rank holds, and the messages.

    In each cell, one box per block the rank holds at that step: ``B2 p1`` is rank 2's
    K/V block of pair 1, coloured by what the rank's queries need from it (every key,
    causal/masked, or nothing: skipped, grey). An arrow is one message: it leaves the box
    of the block a rank sends during step t-1 and points at the box of the same block on
    the receiving rank at step t, labelled with its payload bytes.
    """
    from matplotlib.patches import Patch, Rectangle

    steps, world = max(trace.num_steps, 1), trace.world_size
    figure = new_figure(2.2 * steps + 1.6, 1.0 * world + 1.8)
    ax = figure.subplots()
    left, right = 0.08, 0.58  # the boxes' share of a step's width
    boxes: dict[tuple[int, int, int | None], float] = {}  # (step, rank, sub-ring) -> y
    cells: dict[tuple[int, int], list] = {}  # (step, rank) -> its blocks, in trace order
    for e in trace.events:
        if e.action in (TraceAction.COMPUTE, TraceAction.SKIP):
            cells.setdefault((e.step, e.rank), []).append(e)
    for cell in cells.values():
        height = 0.8 / len(cell)
        pairs = [(e.source_rank, e.pair) for e in cell]
        for i, e in enumerate(cell):
            label = f"B{e.source_rank} p{e.pair}"
            if pairs.count((e.source_rank, e.pair)) > 1:  # two segments of one pair
                label += f" s{e.subring}"
            y = e.rank - 0.4 + i * height
            boxes[(e.step, e.rank, e.subring)] = y + height / 2
            kind = "skip" if e.action is TraceAction.SKIP else block_kind(e.detail)
            ax.add_patch(
                Rectangle(
                    (e.step + left, y + 0.02),
                    right - left,
                    height - 0.04,
                    facecolor=COLOURS[kind],
                    edgecolor="#555555",
                    lw=0.6,
                )
            )
            ax.text(
                e.step + (left + right) / 2,
                y + height / 2,
                label + (" skip" if kind == "skip" else ""),
                ha="center",
                va="center",
                fontsize=min(8.0, 26 * height),
                color="#333333" if kind == "skip" else "white",
            )
    for e in trace.select(TraceAction.SEND):  # sent during step e.step - 1, used at e.step
        start = (e.step - 1 + right, boxes.get((e.step - 1, e.rank, e.subring), e.rank))
        end = (e.step + left, boxes.get((e.step, e.peer, e.subring), e.peer))
        up = end[1] < start[1]  # rank 0 is on top: towards a lower rank (the wrap-around)
        ax.annotate(  # the label sits beside the sending box; the arrow leaves its right edge
            f"{e.nbytes} B",
            xy=end,
            xytext=(start[0] + 0.015, start[1]),
            ha="left",
            va="center",
            fontsize=7,
            bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.85),
            arrowprops=dict(
                arrowstyle="-|>",
                color="#222222",
                lw=0.9,
                relpos=(1.0, 0.5),
                shrinkA=2,
                shrinkB=0,
                connectionstyle=f"arc3,rad={-0.15 if up else 0.0}",
            ),
        )
    ax.set_xlim(-0.05, steps - 0.3)
    ax.set_ylim(world - 0.45, -0.55)  # rank 0 on top
    ax.set_xticks([s + (left + right) / 2 for s in range(steps)])
    ax.set_xticklabels([f"step {s}" for s in range(steps)])
    ax.set_yticks(range(world))
    ax.set_yticklabels([f"rank {r}" for r in range(world)])
    ax.tick_params(length=0)
    for rank in range(world - 1):
        ax.axhline(rank + 0.5, color="#dddddd", lw=0.8, zorder=0)
    ax.set_xlabel(
        "box Bj pi: rank j's K/V block of pair i at that step\n(sN: of sub-ring N, where a "
        "rank holds two of one pair); arrow: a message, with its payload bytes",
        fontsize=8,
    )
    handles = [
        Patch(facecolor=COLOURS[k], edgecolor="#555555", label=text)
        for k, text in (
            ("full", "attends every key"),
            ("masked", "causal / masked"),
            ("skip", "skipped (nothing attended)"),
        )
    ]
    figure.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8)
    total = sum(trace.sent_bytes(r) for r in range(world))
    figure.suptitle(
        title or f"Ring trace: {world} ranks, {steps} steps, {total} payload bytes sent"
    )
    return figure
