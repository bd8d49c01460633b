"""The ring over torch.distributed on GPUs: time, scaling, bytes, overlap and memory, against
one GPU running the whole problem and PyTorch's own context parallel, in one run::

    torchrun --nproc-per-node 2 -m ringsim.gpu.harness.bench_ring [--problems a,b,c]
        [--passes fwd,fwd+bwd] [--lengths N,...] [--budget S] [--kernel K] [--no-cp]
        [--layouts contiguous,zigzag] [--out DIR]
    python -m ringsim.gpu.harness.bench_ring --smoke     # one CPU process (gloo): tests it

Problems (b=1, h=16, d=128, bf16, longnet, causal and not):

- ``a``: LongNet's configuration, w=(2048, 4096, 8192, 16384, 32768), r=(1, 2, 4, 8, 16),
  n = 256K and 1M;
- ``b``: plain ring attention, w=n, r=1, n = 64K, 128K, 256K, with PyTorch's context parallel
  (``context_parallel`` around SDPA, the same kernel, K/V passed by all-to-all; its load
  balancer off on contiguous rows, on for zigzag rows: its head-tail chunks are zigzag's);
- ``c``: a longest segment spanning every rank, w=(2048, 8192, 32768, n), r=(1, 2, 4, 16),
  n = 256K and 1M.

Causal rows run in every layout of ``--layouts`` (:mod:`ringsim.layout`; zigzag balances
causal work), non-causal rows in the contiguous one.

Per row: the ring's median time (the slowest rank's), useful TFLOP/s per GPU (4 d per
selected query-key pair, forward + backward 3.5x), the one-GPU time of the whole problem
with the single-device path (every rank measures it on its own GPU), strong-scaling
efficiency ``T1 / (P * TP)``, peak memory per GPU during the call (beyond the inputs), the
bytes this rank sends against spec §5's closed form, and for the forward the share of the
communication hidden behind compute: ``(T_comm + T_compute - T_ring) / T_comm``, with
``T_comm`` the ring with no attention and ``T_compute`` the ring whose exchanges return at
once (:class:`Loopback`). Times are medians over CUDA events after a warm-up call, the
repetitions agreed by all ranks. Rank 0 prints the table and writes ``bench_ring.json`` and
``bench_ring.md`` (``bench_ring_smoke.*``) under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ringsim.cli.tables import text_table
from ringsim.config import DilatedConfig, make_config
from ringsim.layout import Layout, check_layout, shard
from ringsim.trace import closed_form_bytes

from ..executor import dilated_attention
from ..kernels import Kernel, choose_kernel
from ..ring import communicator, ring_dilated_attention
from ..ring.rank import StepParts
from .bench_baselines import useful_flops
from .check_support import environment
from .output import OUT_HELP, output_folder
from .ring_report import HEADER, Row, write
from .ring_timing import (
    CommOnly,
    Loopback,
    agreed_median,
    forward_backward,
    peak_call,
    ring_parts_ms,
    sent_bytes,
    torch_cp,
)

K = 1024
PROBLEMS = {
    "a": ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16), (256 * K, 1024 * K)),
    "b": ((None,), (1,), (64 * K, 128 * K, 256 * K)),
    "c": ((2048, 8192, 32768, None), (1, 2, 4, 16), (256 * K, 1024 * K)),
}  # (segment_lengths with None for n, dilation_rates, lengths)
SMOKE = {
    "a": ((32, 64), (1, 2), (256,)),
    "b": ((None,), (1,), (128,)),
    "c": ((32, 64, None), (1, 2, 4), (256,)),
}
BACKWARD_FLOPS = 3.5  # forward + backward over forward, as in bench_backward


@dataclass
class Problem:
    """One row's problem on this rank: the global tensors, its shards, the configuration."""

    name: str
    q: torch.Tensor  # (b, n, h, d) global
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    shards: list[torch.Tensor]  # this rank's q, k, v, dout, in ``layout``
    config: DilatedConfig
    kernel: Kernel
    layout: Layout

    def one_gpu(self, *x):
        c = self.config
        return dilated_attention(
            *x, c.segment_lengths, c.dilation_rates, is_causal=c.is_causal, kernel=self.kernel
        )

    def ring(self, comm):
        c = self.config

        def attention(*x):
            return ring_dilated_attention(
                *x,
                c.segment_lengths,
                c.dilation_rates,
                is_causal=c.is_causal,
                kernel=self.kernel,
                comm=comm,
                layout=self.layout,
            )

        return attention


def measure(row: Row, problem: Problem, comm, device, args, mesh) -> None:
    """Fill in ``row``: one GPU, the ring, the hidden share (forward), context parallel."""
    backward = row.pass_ == "fwd+bwd"
    p, (b, n, h, d) = comm.world_size, problem.q.shape
    flops = useful_flops(problem.config, b, n, h, d) * (BACKWARD_FLOPS if backward else 1.0)
    ring = problem.ring(comm)
    whole_x, ring_x = (problem.q, problem.k, problem.v), problem.shards[:3]

    def whole():
        if backward:
            return forward_backward(problem.one_gpu, whole_x, problem.dout)
        return problem.one_gpu(*whole_x)

    def ranked():
        return forward_backward(ring, ring_x, problem.shards[3]) if backward else ring(*ring_x)

    def shard_alone():  # the memory target: the single-device path on n/P
        x = problem.shards[:3]
        return (
            forward_backward(problem.one_gpu, x, problem.shards[3])
            if backward
            else problem.one_gpu(*x)
        )

    row.one_gpu_peak_gib = peak_call(whole, device)
    row.one_gpu_ms = agreed_median(whole, device, args.budget)
    row.shard_peak_gib = peak_call(shard_alone, device)
    if row.shard_peak_gib is not None:
        row.peak_target_gib = row.shard_peak_gib + 2 * row.block_bytes / 2**30
    row.peak_gib = peak_call(ranked, device)
    row.ms = agreed_median(ranked, device, args.budget)
    row.tflops_per_gpu = flops / p / row.ms / 1e9
    row.efficiency = row.one_gpu_ms / (p * row.ms)
    if not backward and row.transfer_steps:
        common = (ring_x, problem.config, comm, problem.kernel, device, args.budget)
        row.comm_ms = ring_parts_ms(*common, CommOnly, comm, problem.layout)
        row.compute_ms = ring_parts_ms(*common, StepParts, Loopback(comm, device), problem.layout)
        overlap = (row.comm_ms + row.compute_ms - row.ms) / row.comm_ms
        row.hidden = min(1.0, max(0.0, overlap))
        row.bandwidth_gbs = row.bytes_sent / row.comm_ms / 1e6
    if problem.name == "b" and mesh is not None:
        want = ring(*ring_x)
        row.torch_cp_ms, row.torch_cp_max_diff = torch_cp(
            problem, device, args.budget, backward, mesh, want
        )
        row.torch_cp_tflops_per_gpu = flops / p / row.torch_cp_ms / 1e9
    elif problem.name == "b":
        why = "--no-cp" if args.no_cp else "needs CUDA and P > 1"
        row.status = f"context parallel not run: {why}"
    if row.bytes_sent != row.closed_form_bytes:
        row.status = f"bytes {row.bytes_sent} != closed form {row.closed_form_bytes}"


def masks_and_layouts(layouts: Sequence[Layout]) -> list[tuple[bool, Layout]]:
    """The rows of one problem and n: causal in every layout asked for; non-causal in the
    contiguous layout only (a layout moves no work without a mask), unless it is not asked
    for."""
    full = [x for x in layouts if x is Layout.CONTIGUOUS] or list(layouts)[:1]
    return [(False, x) for x in full] + [(True, x) for x in layouts]


def bench(args, device: torch.device, emit) -> None:
    comm = communicator()
    p, b, h, d = comm.world_size, 1, args.heads, args.head_dim
    dtype = torch.float32 if args.smoke else torch.bfloat16
    mesh = None
    if not args.no_cp and device.type == "cuda" and p > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (p,))
    for name in args.problems:
        segs, rates, lengths = (SMOKE if args.smoke else PROBLEMS)[name]
        for n in args.lengths or lengths:
            gen = torch.Generator(device=device).manual_seed(n)
            shape = (b, n, h, d)
            q, k, v, dout = (
                torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4)
            )
            kernel = choose_kernel(q, args.kernel)
            for causal, layout in masks_and_layouts(args.layouts):
                shards = [shard(x, comm.rank, p, layout=layout) for x in (q, k, v, dout)]
                w = tuple(n if s is None else s for s in segs)
                config = make_config(w, rates, is_causal=causal)
                problem = Problem(name, q, k, v, dout, shards, config, kernel, layout)
                size = q.element_size()
                sent, steps, block = sent_bytes(config, h, n, comm, size, b, d, layout)
                form = closed_form_bytes(config, h, b, d, n, p, comm.rank, size, layout)
                for pass_ in args.passes:
                    row = Row(
                        name,
                        n,
                        p,
                        causal,
                        pass_,
                        layout=layout.value,
                        kernel=kernel.value,
                        bytes_sent=sent,
                        closed_form_bytes=form,
                        transfer_steps=steps,
                        block_bytes=block,
                    )
                    measure(row, problem, comm, device, args, mesh)
                    emit(row)
            del q, k, v, dout, shards, problem
            if device.type == "cuda":
                torch.cuda.empty_cache()


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        "python -m ringsim.gpu.harness.bench_ring", description=__doc__.partition("\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="tiny, on the CPU (gloo)")
    parser.add_argument("--problems", default="a,b,c", help="comma-separated of a, b, c")
    parser.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    parser.add_argument("--lengths", help="comma-separated n (default: each problem's own)")
    parser.add_argument("--budget", type=float, help="seconds of timing per measurement")
    parser.add_argument("--kernel", choices=[k.value for k in Kernel], help="default: auto")
    parser.add_argument("--no-cp", action="store_true", help="skip PyTorch's context parallel")
    parser.add_argument(
        "--layouts",
        default="contiguous,zigzag",
        help="comma-separated layouts of the causal rows (non-causal rows: contiguous)",
    )
    parser.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    args = parser.parse_args(argv)
    if os.environ.get("RANK", "0") == "0":  # rank 0 alone writes: no empty folders elsewhere
        args.out = output_folder(args.out, "bench_ring")
    args.problems = [x for x in args.problems.split(",") if x]
    args.passes = [x for x in args.passes.split(",") if x]
    for x in args.problems:
        if x not in PROBLEMS:
            parser.error(f"--problems: unknown problem {x!r} (a, b or c)")
    for x in args.passes:
        if x not in ("fwd", "fwd+bwd"):
            parser.error(f"--passes: unknown pass {x!r} (fwd or fwd+bwd)")
    args.lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    try:
        args.layouts = [check_layout(x) for x in args.layouts.split(",") if x]
    except (TypeError, ValueError) as err:
        parser.error(f"--layouts: {err}")
    args.budget = args.budget if args.budget is not None else (0.0 if args.smoke else 0.3)
    args.heads, args.head_dim = (4, 16) if args.smoke else (16, 128)
    return args


def nccl_options():
    """NCCL on a high-priority CUDA stream: its kernels get multiprocessors as soon as one
    frees up, instead of queueing behind an attention kernel's thousands of blocks (without
    it the exchange of step t+1 ran after step t's kernels, not beside them)."""
    return dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)


def init(args) -> torch.device:
    """torch.distributed from torchrun's variables, or one process of its own."""
    if "RANK" not in os.environ:  # one process: a world of one on a free local port
        from .distcheck import free_port

        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            LOCAL_RANK="0",
        )
    cuda = not args.smoke
    if not cuda:
        dist.init_process_group("gloo")
        return torch.device("cpu")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl", pg_options=nccl_options())
    return torch.device("cuda", torch.cuda.current_device())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("ringsim.gpu.harness.bench_ring: no CUDA device; use --smoke", file=sys.stderr)
        return 2
    device = init(args)
    rank = dist.get_rank()
    env = environment(device)
    env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None
    env["world_size"] = dist.get_world_size()
    env["nccl_stream"] = "high priority" if device.type == "cuda" else None
    rows: list[Row] = []
    if rank == 0:
        print(
            f"bench_ring on {env['device']} x{env['world_size']}, torch {env['torch']}, "
            f"NCCL {env['nccl']}",
            flush=True,
        )

    def emit(row: Row) -> None:
        rows.append(row)
        if rank == 0:
            print("  " + "  ".join(row.cells()), flush=True)
            write(args, env, rows)

    start = time.perf_counter()
    try:
        bench(args, device, emit)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print(f"\n{text_table(HEADER, [r.cells() for r in rows])}")
        print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
