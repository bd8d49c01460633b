"""``ringsim plot``: the figures of one configuration (:mod:`ringsim.figures`), as files.

Examples::

    ringsim plot                                  # every figure of the demo configuration
    ringsim plot trace traffic --causal --out figures
    ringsim plot masks --mode grouped --format svg
    ringsim plot scaling --seq-len 48 --world-sizes 1,2,4,8

The configuration options are the ones of ``ringsim demo``; ``trace`` and ``traffic`` run it
on the simulated ring, ``scaling`` runs it once per world size. Needs matplotlib (the
``docs`` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from .args import add_config_arguments, config_case, parse_world_sizes

if TYPE_CHECKING:
    from ringsim.cases import Case

FIGURES = {
    "masks": "the mask of every head and pair, and of each head's patterns together",
    "trace": "space-time diagram: ranks by steps, blocks held, messages with bytes",
    "traffic": "work (scores computed), payload bytes sent and received, and peak bytes held, "
    "per rank",
    "scaling": "peak bytes per rank (and bytes sent) as the world size grows",
}
SCALING_WORLD_SIZES = range(1, 9)  # default: those of these that divide --seq-len


def _figure_name(text: str) -> str:
    if text not in FIGURES:
        raise argparse.ArgumentTypeError(
            f"unknown figure {text!r}; choose from {', '.join(FIGURES)}"
        )
    return text


def add_plot_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plot`` command to the ``ringsim`` parser's subparsers; returns its parser."""

    plot = subparsers.add_parser(
        "plot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="draw figures of one configuration: masks, trace, traffic, scaling",
        description="Draw figures of one configuration and write them to files in --out "
        "(one file per figure):\n"
        + "\n".join(f"  {name:<8} {text}" for name, text in FIGURES.items()),
        epilog="examples:\n  ringsim plot\n  ringsim plot trace traffic --causal --out figures\n"
        "  ringsim plot masks --mode grouped --format svg\n"
        "  ringsim plot scaling --seq-len 48 --world-sizes 1,2,4,8",
    )
    plot.add_argument(
        "figures",
        nargs="*",
        type=_figure_name,
        metavar="FIGURE",
        help=f"figures to draw, any of {', '.join(FIGURES)} (default: all)",
    )
    add_config_arguments(plot)
    output = plot.add_argument_group("output")
    output.add_argument(
        "--out", default="figures", help="folder to write into (default: %(default)s)"
    )
    output.add_argument(
        "--format",
        choices=("png", "svg", "pdf"),
        default="png",
        help="file format (default: %(default)s)",
    )
    output.add_argument("--dpi", type=int, default=150, help="png resolution (default: 150)")
    output.add_argument(
        "--world-sizes",
        type=parse_world_sizes,
        default=None,
        metavar="P1,P2,...",
        help="world sizes of the scaling figure (default: those of 1..8 dividing --seq-len)",
    )
    plot.set_defaults(prepare=_prepare, func=_run_plot)
    return plot


def _prepare(args: argparse.Namespace) -> Case:
    """The configuration (as ``ringsim demo`` checks it), and the scaling world sizes."""

    case = config_case(args)
    from ringsim.layout import Layout

    chunks = Layout(case.layout).chunks_per_rank
    if args.world_sizes is None:
        args.world_sizes = tuple(p for p in SCALING_WORLD_SIZES if case.seq_len % (chunks * p) == 0)
    bad = [p for p in args.world_sizes if case.seq_len % (chunks * p)]
    if bad:
        raise ValueError(
            f"--world-sizes: every world size{' times 2 (zigzag)' if chunks > 1 else ''} "
            f"must divide --seq-len {case.seq_len}, got {bad}"
        )
    if args.dpi < 1:
        raise ValueError(f"--dpi: must be >= 1, got {args.dpi}")
    return case


def scaling_data(case: Case, world_sizes, seed: int, dtype: str) -> tuple[list[int], list[int]]:
    """For each world size: the largest peak bytes of any rank, and the most bytes sent."""
    from .commands import run_case

    peaks, sent = [], []
    for p in world_sizes:
        *_, trace = run_case(dataclasses.replace(case, world_size=p), seed, dtype)
        peaks.append(max(trace.peak_bytes))
        sent.append(max(trace.sent_bytes(r) for r in range(p)))
    return peaks, sent


def _run_plot(args: argparse.Namespace, case: Case) -> int:
    from ringsim import figures
    from ringsim.extras import require

    require("matplotlib", "ringsim plot")  # before any work: one line naming the extra

    from .commands import run_case

    names = list(dict.fromkeys(args.figures)) or list(FIGURES)
    trace = None
    if {"trace", "traffic"} & set(names):
        *_, trace = run_case(case, args.seed, args.dtype)
    print(f"ringsim plot: {case.describe()}")
    for name in names:
        if name == "masks":
            figure = figures.mask_figure(
                case.segment_lengths,
                case.dilation_rates,
                case.seq_len,
                case.num_heads,
                mode=case.mode,
                is_causal=case.is_causal,
            )
        elif name == "trace":
            figure = figures.trace_figure(trace)
        elif name == "traffic":
            figure = figures.traffic_figure(trace)
        else:
            sizes = sorted(set(args.world_sizes))
            peaks, sent = scaling_data(case, sizes, args.seed, args.dtype)
            figure = figures.scaling_figure(sizes, peaks, sent)
        path = figures.save_figure(figure, Path(args.out) / f"{name}.{args.format}", dpi=args.dpi)
        print(f"  wrote {path}: {FIGURES[name]}")
    return 0
