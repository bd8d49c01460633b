"""Forward + backward of :func:`ringsim.gpu.dilated_attention` on one GPU: time, memory,
and the ring's memory per virtual rank.

    python -m ringsim.gpu.harness.bench_backward [--smoke] [--lengths 32768,...] [--max-n N]
        [--ring-n N] [--out DIR] [--budget S]

The problem of :mod:`ringsim.gpu.harness.bench` (b=1, h=16, d=128, bf16, segment_lengths (2048 ..
32768), dilation_rates (1 .. 16), longnet, causal and not). Three tables:

1. time, per (n, causal): ``ours`` is ``dilated_attention`` then ``out.backward(dout)``;
   ``pre-gathered`` the same kernel's forward and backward
   (:func:`~ringsim.gpu.kernels.attend_backward`) on blocks gathered beforehand,
   the floor of our overhead; ``dense cudnn`` (the anchor) cuDNN's fused forward + backward on
   the whole sequence, every head up to ``--dense-max``, fewer past it (work equal to that at
   ``--dense-max``; the status says how many heads), and ``vs dense`` on ours: its useful
   TFLOP/s over the anchor's (target >= 0.8). TFLOP/s count useful FLOPs: forward + backward
   = 3.5x the forward's ``4 d`` per selected pair (two matmuls forward, five backward).
2. memory: the peak memory of ours forward + backward (``max_memory_allocated`` after a
   reset, inputs and dout included) at growing n, doubling past the last length until the
   card runs out or ``--max-n``: GiB and KiB per token.
3. ring: the simulated ring on one device at ``--ring-n`` for P = 1, 2, 4, 8: the peak
   bytes one virtual rank holds (the trace's memory meter: its shards, accumulators, blocks
   held and in flight), forward and backward, against P = 1 (O(n / P), spec §5).

Writes ``bench_backward.json`` and ``.md`` (``_smoke`` with ``--smoke``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ringsim.cli.tables import markdown_table, text_table
from ringsim.config import make_config
from ringsim.layout import Layout

from ..executor import dilated_attention
from ..kernels import Kernel, attend, attend_backward, capability, choose_kernel
from ..ring.autograd import SimulatedRingFunction
from . import bench_baselines as baselines
from .bench import problem_of
from .check_support import environment
from .output import OUT_HELP, output_folder
from .timing import free, median_ms, sync

TIME_HEADER = ["n", "mask", "row", "kernel", "ms", "TFLOP/s", "row/ours time", "vs dense",
               "status"]  # fmt: skip
MEMORY_HEADER = ["n", "mask", "peak GiB", "KiB/token", "status"]
RING_HEADER = ["n", "P", "forward MiB/rank", "backward MiB/rank", "backward x P / P=1"]


def pregathered_fwd_bwd(q, k, v, dout, config, kernel):
    blocks = baselines.gathered_blocks(q, k, v, config)
    douts = [b[0] for b in baselines.gathered_blocks(dout, dout, dout, config)]
    scale, causal = config.scale(q.shape[-1]), config.is_causal

    def run() -> None:
        for (qb, kb, vb), db in zip(blocks, douts):
            out, lse = attend(qb, kb, vb, causal=causal, scale=scale, kernel=kernel)
            attend_backward(qb, kb, vb, out, lse, db, causal=causal, scale=scale, kernel=kernel)

    return run


def time_rows(n, problem, args, device, emit) -> None:
    b, h, d, segs, rates = 1, problem["h"], problem["d"], problem["segments"], problem["rates"]
    gen = torch.Generator(device=device).manual_seed(n)
    x = [
        torch.randn(b, n, h, d, generator=gen, device=device, dtype=problem["dtype"])
        for _ in "qkvd"
    ]
    q, k, v = (t.requires_grad_() for t in x[:3])
    dout, kernel = x[3], choose_kernel(x[0], args.kernel)
    plain = (q.detach(), k.detach(), v.detach(), dout)
    for causal in (False, True):
        config = make_config(segs, rates, is_causal=causal)
        flops = 3.5 * baselines.useful_flops(config, b, n, h, d)

        def ours(causal=causal):
            out = dilated_attention(q, k, v, segs, rates, is_causal=causal, kernel=kernel)
            torch.autograd.grad(out, (q, k, v), dout)

        ms, _ = median_ms(ours, device, args.budget)
        rows = [
            ["pre-gathered", kernel.value, *pregathered_row(plain, config, kernel, args, device)],
            ["dense cudnn", Kernel.CUDNN.value, *dense_row(plain, config, args, device)],
        ]
        dense_tflops = rows[1][3]
        vs_dense = None if dense_tflops is None else flops / ms / 1e9 / dense_tflops
        emit("time", [n, causal, "ours", kernel.value, ms, flops / ms / 1e9, 1.0, vs_dense, "ok"])
        for row in rows:
            ratio = None if row[2] is None else row[2] / ms
            emit("time", [n, causal, *row[:4], ratio, None, row[4]])


def pregathered_row(plain, config, kernel, args, device) -> tuple:
    """``(ms, TFLOP/s, status)`` of the pre-gathered forward + backward (OOM recorded)."""
    q, k, v, dout = plain
    flops = 3.5 * baselines.useful_flops(config, *q.shape)
    try:  # a comparison row: running out of memory is recorded, not raised
        with torch.no_grad():
            ms, _ = median_ms(pregathered_fwd_bwd(q, k, v, dout, config, kernel), device,
                              args.budget)  # fmt: skip
        return ms, flops / ms / 1e9, "ok"
    except torch.cuda.OutOfMemoryError:
        return None, None, "OOM"
    finally:
        free(device)


def dense_row(plain, config, args, device) -> tuple:
    """``(ms, TFLOP/s, status)`` of the ``dense cudnn`` anchor: cuDNN's fused forward and
    backward on the whole sequence, every head up to ``--dense-max``, fewer past it (as in
    :mod:`ringsim.gpu.harness.bench`)."""
    b, n, h, d = plain[0].shape
    why = capability(Kernel.CUDNN, plain[0])
    if why is not None:
        return None, None, f"skipped: {why}"
    heads = baselines.dense_heads(n, h, args.dense_max)
    qt, kt, vt, dt = (x[:, :, :heads].transpose(1, 2).contiguous() for x in plain)
    scale, causal = config.scale(d), config.is_causal

    def run() -> None:
        out, lse = attend(qt, kt, vt, causal=causal, scale=scale, kernel=Kernel.CUDNN)
        attend_backward(qt, kt, vt, out, lse, dt, causal=causal, scale=scale, kernel=Kernel.CUDNN)

    flops = 3.5 * baselines.dense_flops(b, n, heads, d, causal)
    try:
        ms, _ = median_ms(run, device, args.budget)
    except torch.cuda.OutOfMemoryError:
        return None, None, "OOM"
    finally:
        free(device)
    status = "ok" if heads == h else f"ok: {heads} of {h} heads (n > --dense-max)"
    return ms, flops / ms / 1e9, status


def peak_fwd_bwd(n, problem, device, causal) -> float:
    """GiB allocated at the peak of one forward + backward, inputs and dout included."""
    free(device)
    torch.cuda.reset_peak_memory_stats(device)
    shape, dtype = (1, n, problem["h"], problem["d"]), problem["dtype"]
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
    out = dilated_attention(q, k, v, problem["segments"], problem["rates"], is_causal=causal)
    out.backward(torch.randn_like(out))
    sync(device)
    del q, k, v, out
    return torch.cuda.max_memory_allocated(device) / 2**30


def memory_rows(problem, args, device, emit) -> None:
    n = problem["lengths"][0]
    while n <= args.max_n:
        for causal in (False, True):
            try:
                gib = peak_fwd_bwd(n, problem, device, causal)
                emit("memory", [n, causal, gib, gib * 2**20 / n, "ok"])
            except torch.cuda.OutOfMemoryError:
                emit("memory", [n, causal, None, None, "OOM"])
                free(device)
                return
        n *= 2


def ring_rows(problem, args, device, emit) -> None:
    n, h, d = args.ring_n, problem["h"], problem["d"]
    config = make_config(problem["segments"], problem["rates"])
    base = None
    for p in (1, 2, 4, 8):
        q, k, v = (torch.randn(1, n, h, d, device=device, dtype=problem["dtype"],
                               requires_grad=True) for _ in "qkv")  # fmt: skip
        traces: list = []
        kernel = choose_kernel(q.detach())
        out, _ = SimulatedRingFunction.apply(
            q, k, v, config, p, kernel, 600.0, traces, Layout.CONTIGUOUS
        )
        out.backward(torch.randn_like(out))
        fwd, bwd = (max(t.peak_bytes) / 2**20 for t in traces)
        base = bwd if base is None else base
        emit("ring", [n, p, fwd, bwd, bwd * p / base])
        del q, k, v, out
        free(device)


def cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "causal" if x else "full"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser("python -m ringsim.gpu.harness.bench_backward")
    parser.add_argument("--smoke", action="store_true", help="tiny, on the CPU: tests the script")
    parser.add_argument("--lengths", help="comma-separated n (default 32768,...,1048576)")
    parser.add_argument("--max-n", type=int, default=8 * 2**20, help="memory table up to")
    parser.add_argument("--ring-n", type=int, default=65536, help="length of the ring table")
    parser.add_argument("--dense-max", type=int, default=131072, help="longest dense row")
    parser.add_argument("--budget", type=float, help="seconds of timing per row (0.5; smoke 0)")
    parser.add_argument("--kernel", choices=[k.value for k in Kernel], help="default: auto")
    parser.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    args = parser.parse_args(argv)
    args.out = output_folder(args.out, "bench_backward")
    if not args.smoke and not torch.cuda.is_available():
        print("ringsim.gpu.harness.bench_backward: no CUDA device; use --smoke", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    problem = problem_of(args)
    if args.smoke:
        args.ring_n, args.max_n = 256, 0
    env = environment(device)
    print(
        f"ringsim.gpu.harness.bench_backward on {env['device']}, torch {env['torch']}", flush=True
    )
    tables: dict[str, list[list]] = {"time": [], "memory": [], "ring": []}

    def emit(table: str, row: list) -> None:
        tables[table].append(row)
        print(f"  {table}: " + "  ".join(cell(c) for c in row), flush=True)

    start = time.perf_counter()
    for n in problem["lengths"]:
        time_rows(n, problem, args, device, emit)
    if device.type == "cuda":
        memory_rows(problem, args, device, emit)
    ring_rows(problem, args, device, emit)
    headers = {"time": TIME_HEADER, "memory": MEMORY_HEADER, "ring": RING_HEADER}
    text = [f"{name}:\n{text_table(headers[name], [[cell(c) for c in r] for r in rows])}"
            for name, rows in tables.items()]  # fmt: skip
    print("\n\n".join(text))
    suffix = "_smoke" if args.smoke else ""
    args.out.mkdir(parents=True, exist_ok=True)
    problem = dict(problem, dtype=str(problem["dtype"]).removeprefix("torch."))
    seconds = round(time.perf_counter() - start, 1)
    report = dict(env, problem=problem, seconds=seconds, **tables)
    (args.out / f"bench_backward{suffix}.json").write_text(json.dumps(report, indent=1))
    md = [f"# ringsim.gpu.harness.bench_backward{suffix}", "",
          f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}; "
          f"b=1 {problem}, longnet.", ""]  # fmt: skip
    for name, rows in tables.items():
        md += [
            f"## {name}",
            "",
            markdown_table(headers[name], [[cell(c) for c in r] for r in rows]),
            "",
        ]
    (args.out / f"bench_backward{suffix}.md").write_text("\n".join(md))
    print(f"wrote {args.out}/bench_backward{suffix}.json and .md in {seconds} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
