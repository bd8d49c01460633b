"""Ring parity on real processes: the per-rank ring under MPI, forward and backward, against
the definition.

Launch (MPI from the project's own set-up)::

    mpiexec -n 4 python -m mpi4py -m ringsim.checks.parity --cases 20 --seed 0

Every rank draws the same random configurations (seeded), runs
``ringsim.reference.ring_dilated_attention_shard`` over :class:`ringsim.comm.MPICommunicator`
on its own shards, then ``ring_dilated_attention_shard_backward`` (dK/dV travel back to
their owners over MPI too), and sends its out, lse, dq, dk and dv to rank 0, which compares
out and lse with the dense-mask definition and the gradients with the float64 reference
backward. Rank 0 prints one line, ``PASS``/``FAIL``, world size, configurations
and max error; every rank exits non-zero if any case failed. A communication failure (a
message that never comes, a crashed rank, ranks that disagree) prints one ``FAIL`` line
from the rank that saw it and aborts every rank.

``--fault`` injects a fault (drop, delay, corrupt, crash) into ``--fault-rank``'s
``--fault-message``-th send; ``--checksums`` seals every message, so that a corruption
fails at once naming the rank, step and sub-ring; ``--disagree-rank`` gives one rank
another configuration; ``--trace-out`` writes the first case's trace as JSON (to compare
with the simulated one).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import NoReturn

import numpy as np

from ringsim.cases import Case, check_cases, grouped_query
from ringsim.cli.args import OneLineParser, parse_count, parse_seconds
from ringsim.comm import (
    ChecksummedCommunicator,
    CommError,
    Fault,
    FaultKind,
    FaultyCommunicator,
    MPICommunicator,
)
from ringsim.layout import LAYOUTS, shard, unshard
from ringsim.reference import ring_dilated_attention_shard, ring_dilated_attention_shard_backward
from ringsim.reference.parity import check_case, check_gradients
from ringsim.trace import RankTrace, Trace

from .abort import abort_all, finish


class RankParser(OneLineParser):
    """Every rank parses the same options: rank 0 alone prints the one-line error, then
    every rank ends through ``MPI_Finalize`` with exit code 2 (a plain ``exit(2)`` becomes an
    ``MPI_Abort`` under ``python -m mpi4py`` and leaves MPICH's shared memory behind)."""

    def error(self, message: str):  # type: ignore[override]
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_rank() == 0:
            print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        finish(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = RankParser(
        prog="ringsim.checks.parity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cases", type=parse_count, default=20, help="random configurations")
    parser.add_argument("--seed", type=parse_count, default=0)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--no-fixed", action="store_true", help="skip the hand-picked cases")
    parser.add_argument("--timeout", type=parse_seconds, default=30.0, help="seconds per message")
    parser.add_argument("--fault", choices=[k.value for k in FaultKind])
    parser.add_argument("--fault-rank", type=parse_count, default=0)
    parser.add_argument("--fault-message", type=parse_count, default=0)
    parser.add_argument("--disagree-rank", type=parse_count, default=None)
    parser.add_argument(
        "--progress",
        action="store_true",
        help="rank 0 writes 'case i of N' to stderr after each case (ringsim verify reads it)",
    )
    parser.add_argument(
        "--checksums",
        action="store_true",
        help="seal every message with a CRC-32: a corrupted one fails at once, named",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="contiguous",
        help="which positions each rank holds (zigzag: shards of even length)",
    )
    parser.add_argument(
        "--key-padding",
        action="store_true",
        help="every case with a random key padding mask (about a quarter of the keys)",
    )
    parser.add_argument(
        "--gqa",
        action="store_true",
        help="grouped-query attention: every case with 1 to 3 K/V heads shared by the heads",
    )
    parser.add_argument("--trace-out", default=None, help="write the first case's trace")
    return parser.parse_args(argv)


def cases_for(args: argparse.Namespace, world_size: int) -> list[Case]:
    cases = check_cases(
        world_size, args.cases, args.seed, fixed=not args.no_fixed, layout=args.layout
    )
    return grouped_query(cases, args.seed) if args.gqa else cases


def run_case(comm, case: Case, seed: int, dtype, disagree: bool, pad=None):
    """This rank's shard of one case, forward then backward (``pad``: the global key
    padding mask, or None); returns ``(out, lse, (dq, dk, dv), trace)`` (the trace of the
    forward)."""
    q, k, v = case.inputs(seed, dtype)  # the same global draw on every rank, then sliced
    mine = functools.partial(shard, rank=comm.rank, world_size=comm.world_size,
                             layout=case.layout)  # fmt: skip
    shards = [mine(x) for x in (q, k, v)]
    mask = None if pad is None else mine(pad)
    dout = mine(case.upstream(seed, dtype))
    del q, k, v
    segments = tuple(w + 1 for w in case.segment_lengths) if disagree else case.segment_lengths
    trace = RankTrace(comm.rank)
    args = (segments, case.dilation_rates)
    out, lse = ring_dilated_attention_shard(
        *shards, *args, comm=comm, **case.kwargs(), return_lse=True, trace=trace,
        layout=case.layout, key_padding_mask=mask,
    )  # fmt: skip
    grads = ring_dilated_attention_shard_backward(
        *shards, out, lse, dout, *args, comm=comm, **case.kwargs(), layout=case.layout,
        key_padding_mask=mask,
    )  # fmt: skip
    return out, lse, grads, trace


def main(argv: list[str] | None = None) -> NoReturn:
    from mpi4py import MPI

    args = parse_args(argv)
    world = MPI.COMM_WORLD
    comm = MPICommunicator(world, timeout=args.timeout)
    for option in ("fault_rank", "disagree_rank"):  # every rank finds the same: all end
        value = getattr(args, option)
        if value is not None and value >= comm.world_size:
            flag = "--" + option.replace("_", "-")
            RankParser(prog="ringsim.checks.parity").error(
                f"argument {flag}: must be a rank below the world size {comm.world_size}, "
                f"got {value}"
            )
    if args.fault:
        fault = Fault(FaultKind(args.fault), args.fault_rank, args.fault_message)
        comm = FaultyCommunicator(comm, [fault])
    if args.checksums:  # sealed above the fault: it corrupts in transit
        comm = ChecksummedCommunicator(comm)
    dtype = np.dtype(args.dtype)
    cases = cases_for(args, comm.world_size)
    lines, worst, worst_grad = [], 0.0, 0.0
    try:
        for i, case in enumerate(cases):
            disagree = args.disagree_rank == comm.rank
            pad = case.key_padding(args.seed + i) if args.key_padding else None
            out, lse, grads, trace = run_case(comm, case, args.seed + i, dtype, disagree, pad)
            # bounded by --timeout, like every wait: a stopped rank cannot hold the others
            gathered = comm.allgather((out, lse, grads, trace))
            if comm.rank == 0:
                outs, lses, rank_grads, traces = zip(*gathered)
                inputs = case.inputs(args.seed + i, dtype)
                layout = case.layout
                report = check_case(
                    case, unshard(outs, layout=layout), unshard(lses, layout=layout, axis=-1),
                    *inputs, key_padding_mask=pad,
                )  # fmt: skip
                whole = [unshard([g[j] for g in rank_grads], layout=layout) for j in range(3)]
                dout = case.upstream(args.seed + i, dtype)
                grad_report = check_gradients(case, whole, *inputs, dout, key_padding_mask=pad)
                worst = max(worst, report.out_error, report.lse_error)
                worst_grad = max(worst_grad, *grad_report.errors)
                lines += [r.line() for r in (report, grad_report) if not r.ok]
                if args.progress:
                    print(f"case {i + 1} of {len(cases)}", file=sys.stderr, flush=True)
                if i == 0 and args.trace_out:
                    with open(args.trace_out, "w") as f:
                        json.dump(Trace.from_ranks(traces).to_json(), f)
        failed = comm.allgather(len(lines))[0]  # rank 0's count, to every rank
    except (CommError, ValueError, TypeError) as err:
        # one clear line from the rank that saw it, then every rank stops
        abort_all(world, f"FAIL parity world_size={comm.world_size} rank {comm.rank}: "
                         f"{type(err).__name__}: {err}")  # fmt: skip
    if comm.rank == 0:
        for line in lines:
            print(line, file=sys.stderr)
        verdict = "FAIL" if failed else "PASS"
        print(
            f"{verdict} parity world_size={comm.world_size} configurations={len(cases)} "
            f"failed={failed} max_error={worst:.3e} max_grad_error={worst_grad:.3e} "
            f"dtype={dtype} layout={args.layout}"
            + (" gqa" if args.gqa else "")
            + (" key_padding" if args.key_padding else ""),
            flush=True,
        )
    finish(1 if failed else 0)  # the same status on every rank


if __name__ == "__main__":
    main()
