"""The ``ringsim`` command line: ``demo``, ``verify`` and ``trace``.

Examples::

    ringsim demo                          # a small ring, its steps, and its parity
    ringsim demo --causal                 # the same under causal masking: blocks skipped
    ringsim verify --world-sizes 1,2,3,4  # every path against the definition
    ringsim trace --world-size 3 --step   # one configuration, step by step

This module only parses and validates arguments; the commands live in
:mod:`ringsim.cli_commands` (demo, trace) and :mod:`ringsim.cli_verify` (verify), imported
when they run so that ``--help`` stays fast. Bad input (a ``ValueError``/``TypeError`` from
validation, before anything runs) exits with code 2 and one line naming the option.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ringsim.cases import Case

# validation messages start with the library's argument name; the CLI adds its option's
OPTION_NAMES = {
    "batch": "--batch",
    "seq_len": "--seq-len",
    "head_dim": "--head-dim",
    "segment_lengths and dilation_rates": "--segment-lengths and --dilation-rates",
    "segment_lengths": "--segment-lengths",
    "dilation_rates": "--dilation-rates",
    "world_size": "--world-size",
    "num_heads": "--num-heads",
    "mode": "--mode",
    "softmax_scale": "--softmax-scale",
}


DEMO_WORLD_SIZE = 4  # demo and trace: this, or the largest world size below it dividing n
VERIFY_WORLD_SIZES = (1, 2, 3, 4, 8)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _world_sizes(text: str) -> tuple[int, ...]:
    sizes = _ints(text)
    if any(p < 1 for p in sizes):
        raise argparse.ArgumentTypeError(f"every world size must be >= 1, got {text!r}")
    return sizes


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that describe one configuration and its ring (demo, trace)."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    group.add_argument(
        "--seq-len", type=int, default=24, help="sequence length n (default: %(default)s)"
    )
    group.add_argument(
        "--num-heads", type=int, default=4, help="attention heads (default: %(default)s)"
    )
    group.add_argument(
        "--head-dim", type=int, default=8, help="dims per head (default: %(default)s)"
    )
    group.add_argument(
        "--segment-lengths",
        type=_ints,
        default=(8, 24),
        metavar="W1,W2,...",
        help="segment length w_i of each pair (default: 8,24)",
    )
    group.add_argument(
        "--dilation-rates",
        type=_ints,
        default=(1, 3),
        metavar="R1,R2,...",
        help="dilation rate r_i of each pair (default: 1,3)",
    )
    group.add_argument(
        "--mode",
        choices=("longnet", "grouped"),
        default="longnet",
        help="longnet: every head uses every pair; grouped: head group i "
        "uses pair i (default: %(default)s)",
    )
    group.add_argument("--causal", action="store_true", help="causal masking (key <= query)")
    group.add_argument(
        "--softmax-scale", type=float, default=None, help="softmax scale (default 1/sqrt(head_dim))"
    )
    group.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="dtype of q, k, v (default: %(default)s)",
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed of the random q, k, v (default: %(default)s)"
    )
    group.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="P",
        help=f"ranks of the simulated ring; must divide --seq-len (default: "
        f"{DEMO_WORLD_SIZE}, or the largest world size below it that divides --seq-len)",
    )


def config_case(args: argparse.Namespace) -> Case:
    """Validate the configuration options (SPEC 7) and return them as a ``Case``."""
    from ringsim.cases import Case
    from ringsim.config import check_world_size, make_config

    for name in ("batch", "seq_len", "num_heads", "head_dim"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    world_size = args.world_size
    if world_size is None:  # a default that fits any --seq-len
        world_size = max(p for p in range(1, DEMO_WORLD_SIZE + 1) if args.seq_len % p == 0)
    config = make_config(
        args.segment_lengths,
        args.dilation_rates,
        is_causal=args.causal,
        mode=args.mode,
        softmax_scale=args.softmax_scale,
    )
    config.head_groups(args.num_heads)  # grouped mode: at least one head per pair
    check_world_size(args.seq_len, world_size)
    return Case(
        args.batch,
        args.seq_len,
        args.num_heads,
        args.head_dim,
        config.segment_lengths,
        config.dilation_rates,
        config.is_causal,
        config.mode.value,
        world_size,
        config.softmax_scale,
    )


def cli_message(error: Exception) -> str:
    """``'world_size: ...'`` -> ``'world_size (--world-size): ...'``."""
    name, sep, rest = str(error).partition(": ")
    if sep and name in OPTION_NAMES:
        return f"{name} ({OPTION_NAMES[name]}): {rest}"
    return str(error)


def _run_demo(args: argparse.Namespace, case: Case) -> int:
    from ringsim.cli_commands import run_demo

    return run_demo(args, case)


def _run_trace(args: argparse.Namespace, case: Case) -> int:
    from ringsim.cli_commands import run_trace

    return run_trace(args, case)


def _run_verify(args: argparse.Namespace, case: None) -> int:
    from ringsim.cli_verify import run_verify

    return run_verify(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringsim",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ring dilated attention: a NumPy reference, a simulated cluster of ranks, "
        "and checks against the dense-mask definition.",
        epilog="examples:\n  ringsim demo --causal\n  ringsim verify --no-mpi\n"
        "  ringsim trace --world-size 3 --step\n\n"
        "Run 'ringsim COMMAND --help' for a command's options.",
    )
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
        type=_world_sizes,
        default=VERIFY_WORLD_SIZES,
        metavar="P1,P2,...",
        help=f"world sizes of the ring paths (default: {','.join(map(str, VERIFY_WORLD_SIZES))})",
    )
    verify.add_argument(
        "--cases",
        type=_count,
        default=20,
        metavar="N",
        help="random cases per path, plus 6 hand-picked ones (default: %(default)s)",
    )
    verify.add_argument(
        "--seed", type=int, default=0, help="seed of the cases and inputs (default: %(default)s)"
    )
    verify.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="dtype of q, k, v; tolerance from SPEC 9 (default: %(default)s)",
    )
    verify.add_argument("--no-mpi", action="store_true", help="leave out the mpiexec paths")
    verify.add_argument(
        "--mpi-timeout",
        type=float,
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
    from ringsim.cli_plot import add_plot_parser

    add_plot_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # only validation: errors while running are bugs and keep their traceback
        prepared = args.prepare(args) if args.prepare is not None else None
    except (ValueError, TypeError) as err:
        print(f"ringsim: error: {cli_message(err)}", file=sys.stderr)
        return 2
    return args.func(args, prepared)


if __name__ == "__main__":
    sys.exit(main())
