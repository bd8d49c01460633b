"""Figures: the mask of every head and pattern, a space-time diagram of a trace, bytes and
memory per rank, and peak memory as the world size grows.

Each function returns a :class:`matplotlib.figure.Figure` drawn on its own Agg canvas:
matplotlib (the ``docs`` extra) is imported inside the functions, pyplot and the global
backend are never touched, so importing :mod:`ringsim` never imports matplotlib and figures
can be drawn from tests, threads and scripts alike. Save one with :func:`save_figure`; in a
notebook, a returned figure shows itself once ``%matplotlib inline`` is on.
"""

from .canvas import COLOURS, new_figure, save_figure
from .masks import mask_figure
from .ranks import scaling_figure, traffic_figure
from .trace import trace_figure

__all__ = [
    "COLOURS",
    "mask_figure",
    "new_figure",
    "save_figure",
    "scaling_figure",
    "trace_figure",
    "traffic_figure",
]
