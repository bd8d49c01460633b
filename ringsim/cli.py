"""The ``ringsim`` command line.

Examples::

    ringsim demo                       # a small example, checked against the definition
    ringsim demo --seq-len 48 --causal
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every subcommand shares to describe one configuration."""
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=8)
    parser.add_argument("--segment-lengths", type=_ints, default=(8, 24), metavar="W1,W2,...")
    parser.add_argument("--dilation-rates", type=_ints, default=(1, 3), metavar="R1,R2,...")
    parser.add_argument("--mode", choices=("longnet", "grouped"), default="longnet")
    parser.add_argument("--causal", action="store_true", help="causal masking")
    parser.add_argument("--seed", type=int, default=0)


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from ringsim.config import validate
    from ringsim.reference import dense_dilated_attention, dilated_attention
    from ringsim.tolerance import max_abs_error, tolerance

    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.seq_len, args.num_heads, args.head_dim)
    q, k, v = (rng.standard_normal(shape) for _ in range(3))
    kwargs = dict(is_causal=args.causal, mode=args.mode)
    config = validate(q, k, v, args.segment_lengths, args.dilation_rates, **kwargs)

    print(f"dilated attention, q/k/v of shape {shape} (batch, seq_len, heads, head_dim)")
    print(f"segment_lengths={config.segment_lengths} dilation_rates={config.dilation_rates} "
          f"mode={config.mode.value} causal={config.is_causal}")
    print("\nhead  patterns (segment_length, dilation_rate, offset)")
    for head, patterns in enumerate(config.head_patterns(args.num_heads)):
        text = "  ".join(f"({p.segment_length}, {p.dilation_rate}, {p.offset})" for p in patterns)
        print(f"{head:>4}  {text}")

    args_ = (q, k, v, config.segment_lengths, config.dilation_rates)
    out, lse = dilated_attention(*args_, **kwargs, return_lse=True)
    ref_out, ref_lse = dense_dilated_attention(*args_, **kwargs)
    err_out, err_lse = max_abs_error(out, ref_out), max_abs_error(lse, ref_lse)
    tol = tolerance(q.dtype)
    ok = err_out <= tol and err_lse <= tol
    empty = int(np.isinf(ref_lse).sum())
    print(f"\nrows with no key (out 0, lse -inf): {empty} of {ref_lse.size}")
    print("agreement with the dense-mask definition (max abs error):")
    print(f"  out {err_out:.2e}   lse {err_lse:.2e}   tolerance {tol:.0e}   "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringsim",
        description="Ring dilated attention: reference, simulated cluster and checks.",
        epilog="Run 'ringsim COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run a small example and check it against the definition",
        description="Run dilated attention on a small random example and print its "
        "agreement with the dense-mask definition.",
        epilog="example: ringsim demo --seq-len 48 --causal --mode grouped",
    )
    add_config_arguments(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:  # bad input: one clear line, exit 2
        print(f"ringsim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
