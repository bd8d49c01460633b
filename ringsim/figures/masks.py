"""The mask of every head and pattern (the definition's own masks), one panel each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ringsim.config import make_config, segment_bounds
from ringsim.extras import require

from .canvas import MASK_COLOURS, SEGMENT_COLOUR, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
    """The ``(seq_len, seq_len)`` mask of every head (rows) and pair (columns), spec §3.

    Cell ``(x, y)`` is filled when query x may attend key y under that pattern (True =
    attend). Thin lines mark segment boundaries. The last column shows, per head, how many
    of its patterns choose each key (a key chosen twice counts twice, spec §4). In grouped
    mode a head's unused pairs are marked "not used". ``heads`` picks the heads to draw
    (default: all ``num_heads``).
    """
    require("matplotlib", "drawing figures")
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
