"""The ``ringsim`` command line: ``demo``, ``verify``, ``trace``, ``plot`` and ``conform``.

Examples::

    ringsim demo                          # a small ring, its steps, and its parity
    ringsim demo --causal                 # the same under causal masking: blocks skipped
    ringsim verify --world-sizes 1,2,3,4  # every path against the definition
    ringsim trace --world-size 3 --step   # one configuration, step by step
    ringsim conform mymodule:attention    # your own implementation against the definition

This module only builds the parser (the options every command shares are in
:mod:`ringsim.cli.args`); the commands live in :mod:`ringsim.cli.commands` (demo, trace),
:mod:`ringsim.cli.verify` (verify) and :mod:`ringsim.cli.plot` (plot), imported when they run
so that ``--help`` stays fast. Bad input (a ``ValueError``/``TypeError`` from
validation, before anything runs) exits with code 2 and one line naming the option.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ringsim.cases import Case

from ringsim.extras import MissingExtra
from ringsim.layout import LAYOUTS

from .args import (
    OPTION_NAMES,
    VERIFY_WORLD_SIZES,
    OneLineParser,
    add_config_arguments,
    cli_message,
    config_case,
    parse_count,
    parse_seconds,
    parse_world_sizes,
)
from .conform import DESCRIPTION as CONFORM_DESCRIPTION
from .conform import EPILOG as CONFORM_EPILOG
from .conform import add_conform_arguments
from .plot import add_plot_parser


def _run_demo(args: argparse.Namespace, case: Case) -> int:
    from .commands import run_demo

    return run_demo(args, case)


def _run_trace(args: argparse.Namespace, case: Case) -> int:
    from .commands import run_trace

    return run_trace(args, case)


def _run_verify(args: argparse.Namespace, case: None) -> int:
    from .verify import run_verify

    return run_verify(args)


def _run_conform(args: argparse.Namespace, case: None) -> int:
    from .conform import run_conform

    return run_conform(args)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ringsim",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ring dilated attention: a NumPy reference, a simulated cluster of ranks, "
        "and checks against the dense-mask definition.",
        epilog="examples:\n  ringsim demo --causal\n  ringsim verify --no-mpi\n"
        "  ringsim trace --world-size 3 --step\n\n"
        "Run 'ringsim COMMAND --help' for a command's options.",
    )
    from ringsim import __version__

    parser.add_argument("--version", action="version", version=f"ringsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="a small example on the simulated ring: its steps and its parity",
        description="Run ring dilated attention on a small random example over a simulated "
        "ring of --world-size ranks.\nPrints the configuration, which patterns each head "
        "uses, the sub-ring of every segment,\nthe per-step table of sends, receives and "
        "block actions, the bytes each rank sent and held,\nand the agreement with the "
        "dense-mask definition. Exit code 0 on PASS, 1 on FAIL.",
        epilog="examples:\n  ringsim demo\n  ringsim demo --causal\n"
        "  ringsim demo --seq-len 48 --segment-lengths 12,48 --dilation-rates 2,4 "
        "--world-size 4 --mode grouped",
    )
    add_config_arguments(demo)
    demo.add_argument(
        "--no-check",
        action="store_true",
        help="skip the parity check against the dense definition (it holds n x n scores: "
        "GBs past n = 10K)",
    )
    demo.set_defaults(prepare=config_case, func=_run_demo)

    verify = sub.add_parser(
        "verify",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="check every path and world size against the definition",
        description="Run random and hand-picked cases on every available path and compare "
        "each with the\ndense-mask definition: the single-process reference, the simulated "
        "ring at each world size,\nand the ring under mpiexec (unless --no-mpi or MPI is "
        "missing: then those rows say why).\nExit code 0 only if every path that ran passed.",
        epilog="examples:\n  ringsim verify\n  ringsim verify --no-mpi --world-sizes 1,2,3 "
        "--cases 5\n  ringsim verify --dtype float32 --seed 7",
    )
    verify.add_argument(
        "--world-sizes",
        type=parse_world_sizes,
        default=VERIFY_WORLD_SIZES,
        metavar="P1,P2,...",
        help=f"world sizes of the ring paths (default: {','.join(map(str, VERIFY_WORLD_SIZES))})",
    )
    verify.add_argument(
        "--cases",
        type=parse_count,
        default=20,
        metavar="N",
        help="random cases per path, plus 6 hand-picked ones (default: %(default)s)",
    )
    verify.add_argument(
        "--seed",
        type=parse_count,
        default=0,
        metavar="SEED",
        help="seed of the cases and inputs, >= 0 (default: %(default)s)",
    )
    verify.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="dtype of q, k, v; tolerance as the docs' contract page gives it, spec §9 "
        "(default: %(default)s)",
    )
    verify.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="contiguous",
        help="which positions each rank of the ring paths holds (default: %(default)s)",
    )
    verify.add_argument("--no-mpi", action="store_true", help="leave out the mpiexec paths")
    verify.add_argument(
        "--mpi-timeout",
        type=parse_seconds,
        default=300.0,
        metavar="SECONDS",
        help="time limit of one mpiexec run (default: %(default)s)",
    )
    verify.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw a progress bar on stderr (default: only on a terminal)",
    )
    verify.set_defaults(prepare=None, func=_run_verify)

    trace = sub.add_parser(
        "trace",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="one configuration step by step: sends, receives, block actions",
        description="Run one configuration on the simulated ring and print, step by step, "
        "what each rank\nsends (to whom, bytes, pair and sub-ring, whose block), receives, "
        "and does with each\nblock it holds (full, causal, masked or skip), then totals "
        "per rank.\nWith --step on a terminal it waits for Enter between steps.",
        epilog="examples:\n  ringsim trace --world-size 3\n"
        "  ringsim trace --causal --world-size 4 --step",
    )
    add_config_arguments(trace)
    trace.add_argument(
        "--step", action="store_true", help="pause after each step (only when stdin is a terminal)"
    )
    trace.set_defaults(prepare=config_case, func=_run_trace)
    add_plot_parser(sub)
    conform = sub.add_parser(
        "conform",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="check your own dilated attention (or ring) against the definition",
        description=CONFORM_DESCRIPTION,
        epilog=CONFORM_EPILOG,
    )
    add_conform_arguments(conform)
    conform.set_defaults(prepare=None, func=_run_conform)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ringsim`` command. A closed pipe (``ringsim demo | head``) ends it quietly, and
    Ctrl-C with one line and exit code 130."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader is gone: point stdout at nothing, so the interpreter's final flush is
        # quiet too (Python's documented way: docs.python.org/3/library/signal.html)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\nringsim: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:  # validation; errors while running are bugs and keep their traceback, except ...
        prepared = args.prepare(args) if args.prepare is not None else None
    except (ValueError, TypeError) as err:
        print(f"ringsim: error: {cli_message(err)}", file=sys.stderr)
        return 2
    try:
        return args.func(args, prepared)
    except MissingExtra as err:  # e.g. plot without matplotlib
        print(f"ringsim: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as err:  # ... what only the data shows, naming an option
        if args.command == "conform" and isinstance(err, ValueError):  # options, the target
            print(f"ringsim: error: {err}", file=sys.stderr)
            return 2
        if not str(err).startswith(tuple(f"{name}:" for name in OPTION_NAMES)):
            raise
        print(f"ringsim: error: {cli_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
