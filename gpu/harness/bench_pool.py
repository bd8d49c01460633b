"""The memory pool's effect: forward + backward per call with and without it.

    python -m ringsim.gpu.harness.bench_pool [--smoke] [--lengths 32768,131072] [--out DIR]
    torchrun --nproc-per-node 2 -m ringsim.gpu.harness.bench_pool --ring [--lengths ...]

Problem: b=1, h=16, d=128, bf16, causal; two configurations per length: LongNet's aligned
one (w = 2048..32768, r = 1..16: the strided path, whose one-device backward writes its
gradients directly) and a ragged one (w = 3000, 9000, n; r = 1, 3, 5: the gathered-rows
path, with float32 accumulators and gradient totals). ``--ring``: the same problems over
the torch.distributed ring of the processes torchrun starts (n in all, n/P per rank; NCCL,
or gloo with ``--smoke``), where the pool also takes the receive buffers of every block
and dK/dV share; each figure is the largest of any rank. Rows ``plain``
(``memory_pool=None``) and ``pooled`` (a :class:`~ringsim.gpu.executor.pool.MemoryPool`,
warmed by one call):

- ms: median time of one forward + backward (CUDA events);
- allocs: the allocator's allocation requests during one steady-state call
  (``allocation.all.allocated`` of ``torch.cuda.memory_stats``): the kernels' own outputs
  are the allocator's either way; the pool takes the executor's working buffers;
- segments: the device allocations (``cudaMalloc``: ``segment.all.allocated``) during that
  call: 0 means every request was served from memory the process already held;
- peak GiB: peak memory of the call beyond what was allocated before it;
- pool MiB: what the pool holds between calls (the memory it costs).

Writes ``bench_pool.json`` and ``bench_pool.md`` (``bench_pool_ring``, with ``_smoke``
after ``--smoke``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from ringsim.cli.tables import markdown_table, text_table
from ringsim.layout import shard

from ..executor import dilated_attention
from ..executor.pool import MemoryPool
from ..ring import ring_dilated_attention
from .check_support import environment
from .output import OUT_HELP, output_folder
from .ring_timing import agreed_median
from .timing import first_call, median_ms, sync

HEADER = ["P", "n", "config", "row", "ms", "allocs", "segments", "peak GiB", "pool MiB",
          "buffers kept"]  # fmt: skip
NUMBERS = ("ms", "allocs", "segments", "peak_gib", "pool_mib", "buffers_kept")


def configs(n: int, smoke: bool) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    if smoke:
        return {"aligned": ((32, 64, 128, 256), (1, 2, 4, 8)), "ragged": ((30, 90, n), (1, 3, 5))}
    aligned = tuple(w for w in (2048, 4096, 8192, 16384, 32768) if w <= n)
    return {"aligned": (aligned, (1, 2, 4, 8, 16)[: len(aligned)]),
            "ragged": ((3000, 9000, n), (1, 3, 5))}  # fmt: skip


def allocations(device: torch.device) -> tuple[int, int] | None:
    """The allocator's requests and its device allocations so far (None on the CPU)."""
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return stats["allocation.all.allocated"], stats["segment.all.allocated"]


def one_row(n, name, attend, pool, x, dout, device, timed) -> dict:
    """One row: ``attend(q, k, v, memory_pool=pool)`` forward and backward on ``x``, timed
    by ``timed(call)`` (ms)."""

    def call():
        out = attend(*x, memory_pool=pool)
        out.backward(dout)
        return out

    call()  # warm: the pool takes its buffers, the plan and the kernels are ready
    sync(device)
    before = allocations(device)
    _, peak = first_call(call, device)  # a steady-state call: its peak memory
    after = allocations(device)
    allocs, segments = (None, None) if before is None else (a - b for a, b in zip(after, before))
    ms = timed(call)
    for t in x:
        t.grad = None
    return {
        "n": n, "config": name, "row": "pooled" if pool else "plain", "ms": ms,
        "allocs": allocs, "segments": segments, "peak_gib": peak,
        "pool_mib": None if pool is None else pool.nbytes / 2**20,
        "buffers_kept": None if pool is None else len(pool.buffers),
    }  # fmt: skip


def largest(rows: list[dict]) -> dict:
    """Every rank's row of one problem as one: each figure the largest of any rank."""
    merged = dict(rows[0])
    for key in NUMBERS:
        values = [r[key] for r in rows if r[key] is not None]
        merged[key] = max(values) if values else None
    return merged


def cells(r: dict) -> list[str]:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    numbers = [("ms", ".2f"), ("allocs", "d"), ("segments", "d"), ("peak_gib", ".2f"),
               ("pool_mib", ".1f"), ("buffers_kept", "d")]  # fmt: skip
    return [str(r.get("world_size", 1)), str(r["n"]), r["config"], r["row"],
            *(fmt(r[key], spec) for key, spec in numbers)]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    title = __doc__.partition("\n")[0]
    parser = argparse.ArgumentParser("python -m ringsim.gpu.harness.bench_pool", description=title)
    parser.add_argument("--smoke", action="store_true", help="tiny, on the CPU: tests the script")
    parser.add_argument("--lengths", help="comma-separated n (default 32768,131072)")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per row")
    parser.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    parser.add_argument("--ring", action="store_true",
                        help="the ring over the processes torchrun starts (NCCL; gloo with "
                        "--smoke)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_pool: no CUDA device; run with --smoke on a CPU", file=sys.stderr)
        return 2
    budget = 0.0 if args.smoke else args.budget
    if args.ring:  # a ring call waits for every rank: the repetitions are agreed
        from .bench_ring import init
        from .distcheck import end_process

        device = init(args)
        rank, p = dist.get_rank(), dist.get_world_size()
        timed = functools.partial(agreed_median, device=device, budget=budget)
    else:
        device, rank, p = torch.device("cpu" if args.smoke else "cuda"), 0, 1
        timed = lambda call: median_ms(call, device, budget)[0]  # noqa: E731
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (
        [256] if args.smoke else [32768, 131072])  # fmt: skip
    h, d = (4, 16) if args.smoke else (16, 128)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    out = output_folder(args.out, "bench_pool") if rank == 0 else None
    start, rows = time.perf_counter(), []
    for n in lengths:
        gen = torch.Generator(device=device).manual_seed(n)
        x = [torch.randn(1, n, h, d, generator=gen, device=device, dtype=dtype)
             for _ in range(3)]  # fmt: skip
        dout = torch.randn(1, n, h, d, generator=gen, device=device, dtype=dtype)
        if args.ring:  # this rank's shards (the same global tensors on every rank)
            x, dout = [shard(t, rank, p).contiguous() for t in x], shard(dout, rank, p).contiguous()
        x = [t.requires_grad_() for t in x]
        for name, (segs, rates) in configs(n, args.smoke).items():
            attend = functools.partial(ring_dilated_attention if args.ring else dilated_attention,
                                       segment_lengths=segs, dilation_rates=rates,
                                       is_causal=True)  # fmt: skip
            for pool in (None, MemoryPool()):
                row = one_row(n, name, attend, pool, x, dout, device, timed)
                if args.ring:
                    every = [None] * p
                    dist.all_gather_object(every, row)
                    row = dict(largest(every), world_size=p)
                rows.append(row)
                if rank == 0:
                    print("  ".join(cells(row)), flush=True)
    if rank != 0:
        end_process(0)
    print("\n" + text_table(HEADER, [cells(r) for r in rows]))
    stem = "bench_pool" + ("_ring" if args.ring else "") + ("_smoke" if args.smoke else "")
    env = environment(device)
    if args.ring and device.type == "cuda":
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    (out / f"{stem}.json").write_text(json.dumps(dict(env, rows=rows), indent=1, default=str))
    (out / f"{stem}.md").write_text(
        f"# bench_pool\n\n{env}\n\n" + markdown_table(HEADER, [cells(r) for r in rows]) + "\n"
    )
    print(f"wrote {out / stem}.json and .md in {time.perf_counter() - start:.0f} s")
    if args.ring:
        end_process(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
