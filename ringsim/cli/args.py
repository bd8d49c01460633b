"""What every ``ringsim`` command shares: the configuration options, their validation into a
:class:`~ringsim.cases.Case`, and the one-line error that names the option."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ringsim.layout import LAYOUTS

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


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: ...``, exit code 2)
    instead of the usage block and the error; ``--help`` still shows the usage."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


DEMO_WORLD_SIZE = 4  # demo and trace, unless --world-size says otherwise
VERIFY_WORLD_SIZES = (1, 2, 3, 4, 8)


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def parse_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):  # NaN fails the comparison too
        raise argparse.ArgumentTypeError(f"must be a positive finite number of seconds, got {text}")
    return value


def parse_world_sizes(text: str) -> tuple[int, ...]:
    sizes = parse_ints(text)
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
        type=parse_ints,
        default=(8, 24),
        metavar="W1,W2,...",
        help="segment length w_i of each pair (default: 8,24)",
    )
    group.add_argument(
        "--dilation-rates",
        type=parse_ints,
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
        "--seed",
        type=parse_count,
        default=0,
        metavar="SEED",
        help="seed of the random q, k, v, >= 0 (default: %(default)s)",
    )
    group.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="P",
        help=f"ranks of the simulated ring; must divide --seq-len (default: {DEMO_WORLD_SIZE})",
    )
    group.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="contiguous",
        help="which positions each rank holds: contiguous shards, or zigzag (rank j holds "
        "chunks j and 2P-1-j of 2P; balances causal work; 2P must divide --seq-len) "
        "(default: %(default)s)",
    )


def config_case(args: argparse.Namespace) -> Case:
    """Validate the configuration options (spec §7) and return them as a ``Case``."""
    from ringsim.cases import Case
    from ringsim.config import check_world_size, make_config
    from ringsim.layout import check_layout

    for name in ("batch", "seq_len", "num_heads", "head_dim"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    world_size = DEMO_WORLD_SIZE if args.world_size is None else args.world_size
    if args.world_size is None and args.seq_len % world_size:  # said, not changed silently
        raise ValueError(
            f"world_size: the default {world_size} does not divide seq_len {args.seq_len}; "
            "pass --world-size P with P dividing --seq-len (1 runs without a ring)"
        )
    config = make_config(
        args.segment_lengths,
        args.dilation_rates,
        is_causal=args.causal,
        mode=args.mode,
        softmax_scale=args.softmax_scale,
    )
    config.head_groups(args.num_heads)  # grouped mode: at least one head per pair
    check_world_size(args.seq_len, world_size)
    check_layout(args.layout, args.seq_len, world_size)
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
        layout=args.layout,
    )


def cli_message(error: Exception) -> str:
    """``'world_size: ...'`` -> ``'world_size (--world-size): ...'``."""
    name, sep, rest = str(error).partition(": ")
    if sep and name in OPTION_NAMES:
        return f"{name} ({OPTION_NAMES[name]}): {rest}"
    return str(error)
