"""Ring parity over torch.distributed with real processes (gloo on CPUs, NCCL on GPUs).

Launch::

    python -m ringsim.gpu.harness.distcheck --world-size 3 --cases 10             # gloo, CPU
    python -m ringsim.gpu.harness.distcheck --world-size 2 --backend nccl --dtype bfloat16
    python -m ringsim.gpu.harness.distcheck --world-size 2 --gqa --key-padding  # the masks

It starts ``--world-size`` processes on this machine (a free local port, a timeout on every
collective), each running :func:`ringsim.gpu.ring_dilated_attention` on its own shards of
the same cases, forward and backward; rank 0 gathers out, lse, dq, dk, dv and compares them
with the float64 definition evaluated on the same (rounded) inputs. Every dtype has a bound
that can fail (spec §9): 1e-10 in float64, 2e-5 in float32, and in bf16/fp16 2x (outputs) and
3x (gradients) the error of the plain dense formula evaluated in that dtype on the same
inputs, plus 1e-6. With NCCL the cases are sized for the GPU kernels
(:func:`ringsim.cases.device_cases`: head_dim 64, segments inside a GPU, across GPUs and the
whole sequence, both modes, causal and not, one ragged configuration); with gloo the small
fixed and random cases of every check. ``--gqa`` gives each case fewer K/V heads (1 to 3,
:func:`ringsim.cases.grouped_query`); ``--key-padding`` passes each rank its shard of a random
key padding mask (a quarter of the keys, and all of batch element 0's second half);
``--memory-pool`` gives each rank a :class:`~ringsim.gpu.executor.pool.MemoryPool` for all
its calls, runs each case once on other inputs first, and fails a checked call that takes a
buffer the pool does not hold (rank 0's pool; the verdict prints its hits of all buffers
taken). Rank 0
prints one line per case and one verdict, PASS or FAIL; the exit code is non-zero on any
failure.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import socket
import sys
from dataclasses import replace
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ringsim.cases import check_cases, device_cases, grouped_query
from ringsim.layout import LAYOUTS, shard, unshard
from ringsim.tolerance import max_abs_error

from ..executor.pool import MemoryPool
from .check_support import bounds, is_low_precision, naive_dilated

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ringsim.gpu.harness.distcheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float64")
    parser.add_argument(
        "--cases", type=int, default=10, help="gloo: random cases after the fixed ones"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--suite",
        choices=("small", "device"),
        help="the cases: small (default with gloo) or sized for GPU kernels (with NCCL)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per collective")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="contiguous",
        help="which positions each rank holds (default: %(default)s)",
    )
    parser.add_argument("--gqa", action="store_true", help="fewer K/V heads than query heads")
    parser.add_argument("--key-padding", action="store_true", help="a key padding mask")
    parser.add_argument(
        "--memory-pool",
        action="store_true",
        help="each rank's calls share a MemoryPool; each case runs once more before it is "
        "checked, and the checked call must take every buffer from the pool",
    )
    return parser.parse_args(argv)


def padding(case, seed: int) -> torch.Tensor:
    """A random ``(batch, seq_len)`` mask, batch element 0's second half padded."""
    mask = torch.from_numpy(case.key_padding(seed))
    mask[0, case.seq_len // 2 :] = True
    return mask


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, args: argparse.Namespace, port: int) -> None:

    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        args.backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=args.timeout),
        device_id=device if device.type == "cuda" else None,
    )
    p, dtype = args.world_size, DTYPES[args.dtype]
    suite = args.suite or ("device" if args.backend == "nccl" else "small")
    if suite == "device":
        cases = [replace(case, layout=args.layout) for case in device_cases(p)]
    else:
        cases = check_cases(p, args.cases, args.seed, layout=args.layout)
    if args.gqa:
        cases = grouped_query(cases, args.seed)
    pool = MemoryPool() if args.memory_pool else None
    failures, worst = [], [0.0, 0.0]
    for i, case in enumerate(cases):
        pad = padding(case, args.seed + i) if args.key_padding else None
        run = functools.partial(run_case, case, rank=rank, world_size=p, device=device,
                                dtype=dtype, pad=pad, pool=pool)  # fmt: skip
        if pool is not None:  # other inputs first: the checked call reuses their buffers
            run(args.seed + i + 1000)
            misses = pool.misses
        inputs, shards, out, lse = run(args.seed + i)
        mine_results = [x.detach().double().cpu().numpy() for x in (out, lse)]
        mine_results += [x.grad.double().cpu().numpy() for x in shards]
        gathered = [None] * p if rank == 0 else None
        dist.gather_object(mine_results, gathered, dst=0)
        if rank == 0:
            got = [
                unshard([g[j] for g in gathered], layout=case.layout, axis=-1 if j == 1 else 1)
                for j in range(5)
            ]
            line, ok, errors = judge(case, got, inputs, dtype, device, pad)
            worst = [max(a, b) for a, b in zip(worst, errors)]
            if pool is not None and pool.misses != misses:  # (rank 0's pool)
                ok, line = False, f"{line}; FAIL the call allocated {pool.misses - misses} buffers"
            print(line, flush=True)
            if not ok:
                failures.append(line)
    if rank == 0:
        verdict = "FAIL" if failures else "PASS"
        print(
            f"{verdict} distcheck backend={args.backend} world_size={p} dtype={args.dtype} "
            f"configurations={len(cases)} failed={len(failures)} max_error={worst[0]:.3e} "
            f"max_grad_error={worst[1]:.3e} layout={args.layout} gqa={args.gqa} "
            f"key_padding={args.key_padding}"
            + ("" if pool is None else f" memory_pool={pool.hits}/{pool.hits + pool.misses}"),
            flush=True,
        )
    dist.barrier()
    end_process(1 if failures else 0)


def end_process(code: int) -> NoReturn:
    """Leave the process group and exit with ``code`` here, past the interpreter's
    finalization: a gloo thread still joinable at exit aborted a worker after every PASS
    line ("terminate called without an active exception", 1 run in 7 at P = 4 on a loaded
    2-core machine; 1 in 8 to 15 for ``bench_pool --ring --smoke`` at P = 2)."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_case(case, seed: int, *, rank, world_size, device, dtype, pad, pool):
    """``((q, k, v, dout), shards, out, lse)``: every rank draws the same global inputs of
    ``seed``, rounded to ``dtype``, and runs the ring forward and backward on its shards
    (``pad``: the global key padding mask, or None; ``pool``: the rank's memory pool)."""
    from ringsim.gpu import ring_dilated_attention

    mine = functools.partial(shard, rank=rank, world_size=world_size, layout=case.layout)
    q, k, v, dout = (
        torch.from_numpy(x).to(dtype) for x in (*case.inputs(seed), case.upstream(seed))
    )
    shards = [mine(x).to(device).requires_grad_() for x in (q, k, v)]
    out, lse = ring_dilated_attention(
        *shards, case.segment_lengths, case.dilation_rates, **case.kwargs(), return_lse=True,
        layout=case.layout, key_padding_mask=None if pad is None else mine(pad).to(device),
        memory_pool=pool,
    )  # fmt: skip
    out.backward(mine(dout).to(device))
    return (q, k, v, dout), shards, out, lse


def judge(case, got, inputs, dtype: torch.dtype, device: torch.device, pad=None):
    """``(line, ok, (out/lse error, gradient error))`` of the gathered ``got = (out, lse, dq,
    dk, dv)`` against the float64 definition on the rounded ``inputs = (q, k, v, dout)``
    (and the key padding ``pad``), with spec §9's bounds for ``dtype``."""
    from ringsim.reference import dense_dilated_attention
    from ringsim.reference.parity import reference_gradients

    q, k, v, dout = (x.double().numpy() for x in inputs)
    args = (case.segment_lengths, case.dilation_rates)
    mask = None if pad is None else pad.numpy()
    ref = dense_dilated_attention(q, k, v, *args, **case.kwargs(), key_padding_mask=mask)
    ref_grads = reference_gradients(case, q, k, v, dout, key_padding_mask=mask)
    err = (max_abs_error(got[0], ref[0]), max_abs_error(got[1], ref[1]))
    grad_err = (
        max_abs_error(got[2], ref_grads[0]),
        max(max_abs_error(g, w) for g, w in zip(got[3:], ref_grads[1:])),
    )
    naive_err = naive_grad_err = (0.0, 0.0)
    if is_low_precision(dtype):  # the plain formula in this dtype, on the same inputs
        x = [t.to(device) for t in inputs[:3]]
        mask = None if pad is None else pad.to(device)
        naive = functools.partial(naive_dilated, segment_lengths=args[0], dilation_rates=args[1],
                                  **case.kwargs(), dense=False, key_padding_mask=mask)  # fmt: skip
        naive_err = tuple(
            max_abs_error(a.double().cpu().numpy(), b) for a, b in zip(naive(*x), ref)
        )
        leaves = [t.requires_grad_() for t in x]
        naive_out = naive(*leaves)[0]
        naive_grads = torch.autograd.grad(naive_out, leaves, inputs[3].to(device))
        errs = [max_abs_error(g.double().cpu().numpy(), w) for g, w in zip(naive_grads, ref_grads)]
        naive_grad_err = (errs[0], max(errs[1:]))
    bound = bounds(dtype, *naive_err)
    grad_bound = bounds(dtype, *naive_grad_err, kind="grad")
    ok = all(e <= b for e, b in zip((*err, *grad_err), (*bound, *grad_bound)))
    line = (
        f"{'PASS' if ok else 'FAIL'} {case.describe()}: out {err[0]:.1e} <= {bound[0]:.1e}, "
        f"lse {err[1]:.1e} <= {bound[1]:.1e}, dq {grad_err[0]:.1e} <= {grad_bound[0]:.1e}, "
        f"dk/dv {grad_err[1]:.1e} <= {grad_bound[1]:.1e}"
    )
    return line, ok, (max(err), max(grad_err))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend == "nccl" and torch.cuda.device_count() < args.world_size:
        print(
            f"FAIL distcheck: --world-size {args.world_size} needs that many GPUs, "
            f"{torch.cuda.device_count()} visible",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # P processes on a few cores
    print(
        f"distcheck: starting {args.world_size} {args.backend} workers ({args.dtype}); each "
        "configuration's line follows once it is checked (the first after the workers load "
        "torch and the reference: tens of seconds on a few cores)",
        flush=True,
    )
    try:
        mp.spawn(rank_main, args=(args, free_port()), nprocs=args.world_size, join=True)
    except mp.ProcessExitedException as err:  # a worker failed, was killed or stopped
        print(f"FAIL distcheck world_size={args.world_size}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
