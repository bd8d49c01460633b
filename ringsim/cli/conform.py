"""``ringsim conform MODULE:FUNCTION``: check a user's own dilated attention.

The same parser serves ``ringsim conform`` and ``python -m ringsim.conform`` (what
``mpiexec -n P python -m mpi4py -m ringsim.conform ... --kind shard`` and ``torchrun -m
ringsim.conform`` run on every rank of a ring). Exit code 0 only if every case passed, 1 if
one failed, 2 for a bad option or a function that cannot be imported.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ringsim.layout import LAYOUTS

from .args import OneLineParser, parse_count, parse_seconds

DESCRIPTION = """\
Check your own dilated attention (or one rank of your own ring) against the dense-mask
definition on the project's cases: ragged segments, w > n, r > w, r not dividing w, rows
with no key, segments across shards. Prints a table (errors, tolerance, PASS/FAIL, the first
wrong rows and heads), a line to reproduce each failing case, a diagnosis (which known wrong
variant your output equals), and a last line PASS conform ... or FAIL conform ....

MODULE:FUNCTION is an importable name (the current directory is on the path) or a file,
path/to/file.py:FUNCTION. FUNCTION(q, k, v, segment_lengths, dilation_rates, **kwargs)
returns out or (out, lse); is_causal= is passed unless --no-causal, mode= only when --modes
names more than longnet, softmax_scale= only with --scale, layout= only with a
--layout-shard other than contiguous, key_padding_mask= only with --key-padding."""

EPILOG = """\
examples:
  ringsim conform mypkg.attention:dilated_attention --returns out,lse
  ringsim conform model.py:attention --backend torch --layout bhnd --grad
  mpiexec -n 4 python -m mpi4py -m ringsim.conform myring:rank_fn --kind shard
  torchrun --nproc-per-node 2 -m ringsim.conform myring:rank_fn --kind shard --backend torch"""


def add_conform_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ringsim conform`` (:class:`ringsim.conformance.Options`)."""
    add = parser.add_argument
    add("target", metavar="MODULE:FUNCTION", help="the function to check")
    add(
        "--kind",
        choices=("single", "shard"),
        default="single",
        help="single: global arrays on one device; shard: one rank of your ring, run under "
        "mpiexec or torchrun (default: %(default)s)",
    )
    add(
        "--backend",
        choices=("numpy", "torch"),
        default="numpy",
        help="arrays or tensors (default: %(default)s)",
    )
    add("--device", default="cpu", help="torch device (default: %(default)s)")
    add(
        "--dtype",
        choices=("float64", "float32", "bfloat16", "float16"),
        default="float64",
        help="dtype of q, k, v; it sets the tolerance (default: %(default)s)",
    )
    add(
        "--layout",
        choices=("bnhd", "bhnd"),
        default="bnhd",
        help="your tensors: (batch, seq, heads, dim) or (batch, heads, seq, dim)",
    )
    add(
        "--returns",
        choices=("out", "out,lse"),
        default="out",
        help="what your function returns (default: %(default)s)",
    )
    add(
        "--modes",
        default="longnet",
        metavar="longnet[,grouped]",
        help="head modes your function implements (default: %(default)s)",
    )
    add(
        "--no-causal",
        dest="causal",
        action="store_false",
        help="no causal cases, and is_causal= is not passed",
    )
    add(
        "--cases",
        type=parse_count,
        default=20,
        metavar="N",
        help="random cases after the fixed ones (default: %(default)s)",
    )
    add("--seed", type=parse_count, default=0, help="seed of cases and inputs")
    add("--scale", action="store_true", help="pass softmax_scale= (not the default value)")
    add(
        "--grad",
        action="store_true",
        help="torch: also compare dq, dk, dv with the reference backward",
    )
    add(
        "--timeout",
        type=parse_seconds,
        default=60.0,
        metavar="SECONDS",
        help="time limit of one case (default: %(default)s)",
    )
    add(
        "--key-padding",
        action="store_true",
        help="pass key_padding_mask= (bool (batch, seq_len), True = padding; a ring rank: "
        "its shard), about a quarter of the keys padded",
    )
    add(
        "--gqa",
        action="store_true",
        help="grouped-query attention: k and v with fewer heads than q in every case",
    )
    add(
        "--layout-shard",
        choices=LAYOUTS,
        default="contiguous",
        help="kind shard: which positions each rank holds (default: %(default)s)",
    )
    add(
        "--case",
        type=parse_count,
        default=None,
        metavar="INDEX",
        help="run only this case (the table's first column)",
    )
    add("--json", default=None, metavar="PATH", help="also write the report as JSON")  # fmt: skip


def load_target(spec: str) -> Callable:
    """The function ``MODULE:FUNCTION`` or ``path/file.py:FUNCTION`` names (attributes may
    be dotted: ``module:Class.method``). Raises ``ValueError`` saying what is missing."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target: expected MODULE:FUNCTION, got {spec!r}")
    try:
        module = _import(module_name)
    except ValueError:
        raise
    except Exception as err:  # the user's module failed to import: a bad target, named
        raise ValueError(f"target: cannot import {module_name}: {type(err).__name__}: "
                         f"{err}") from err  # fmt: skip
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"target: {module_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"target: {spec} is a {type(obj).__name__}, not callable")
    return obj


def _import(module_name: str):
    """A module by name (the current directory on the path, as ``python -m`` has it) or by
    file (its folder on the path, as ``python file.py`` has it)."""
    if not module_name.endswith(".py"):
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(module_name)
    path = Path(module_name)
    if not path.is_file():
        raise ValueError(f"target: no file {module_name}")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # for pickling and the function's own imports
    spec.loader.exec_module(module)
    return module


def run_conform(args: argparse.Namespace) -> int:
    """Run the check the parsed options describe, print the report (rank 0), return the
    exit code."""
    from ringsim.conformance import check

    fn = load_target(args.target)
    if args.json and _is_rank_zero(args):  # a path that cannot be written fails now, not after
        try:
            Path(args.json).write_text("")
        except OSError as err:
            raise ValueError(f"json: cannot write {args.json}: {err.strerror}") from None
    options = {k: v for k, v in vars(args).items()
               if k not in ("target", "json", "func", "prepare", "command")}  # fmt: skip
    interactive = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if interactive:
            print(f"\rcase {done} of {total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)  # fmt: skip

    report = check(fn, target=args.target, on_case=progress, **options)
    if _is_rank_zero(args):
        print(report.text(), flush=True)
        if args.kind == "shard" and report.world_size == 1:
            print("note: a ring of one rank; launch under mpiexec -n P or torchrun "
                  "--nproc-per-node P to check P ranks", file=sys.stderr)  # fmt: skip
        if args.json:
            Path(args.json).write_text(report.dumps() + "\n")
    if report.not_run:  # a thread still runs the case that hung, and cannot be stopped:
        sys.stdout.flush()  # leave now, before the interpreter waits on it at exit
        sys.stderr.flush()
        os._exit(1)
    return 0 if report.ok else 1


def _is_rank_zero(args: argparse.Namespace) -> bool:
    if args.kind == "single":
        return True
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if name in os.environ:
            return os.environ[name] == "0"
    return True


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """``python -m ringsim.conform``: the same options, one process or one rank."""
    parser = OneLineParser(prog="ringsim.conform", description=DESCRIPTION, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_conform_arguments(parser)
    args = parser.parse_args(argv)
    try:
        code = run_conform(args)
    except ValueError as err:  # a bad option or target, before any case ran
        print(f"ringsim.conform: error: {err}", file=sys.stderr, flush=True)
        code = 2
    if args.kind == "shard" and "mpi4py" in sys.modules:
        from ringsim.checks.abort import finish

        finish(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
