"""The figures' shared canvas: colours, an empty figure on its own Agg canvas, saving."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ringsim.extras import require

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
    "compute": "#937860",  # work: the scores a rank computed
}
MASK_COLOURS = ("#ffffff", "#4c72b0", "#1b2a49")  # keys chosen 0, 1, 2+ times
SEGMENT_COLOUR = "#e377c2"


def new_figure(width: float, height: float) -> Figure:
    """An empty figure on an Agg canvas of ``width`` x ``height`` inches."""
    require("matplotlib", "drawing figures")
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
