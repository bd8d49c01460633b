"""Probes of the one-GPU forward and backward (issue 13): what the time is made of, beyond
the per-kernel profile of ``python -m ringsim.gpu.harness.profile``.

    python scripts/probe_one_gpu.py PROBE OUT.json   (on a GPU machine)

PROBE is one of:

- ``head-chunks``: forward + backward time and memory per token for the backward's head-chunk
  budget (:data:`ringsim.gpu.executor.direct.PARTS_BUDGET` 1, 2, 4, 8 GiB) at 32K, 128K, 256K;
- ``schedules``: the forward's time for variants of the schedule's thresholds
  (:mod:`ringsim.gpu.executor.schedule`) at 32K..256K;
- ``allocations``: device allocations (``cudaMalloc``) per steady-state forward, without and
  with a :class:`~ringsim.gpu.executor.pool.MemoryPool`, and the eager call captured whole as
  a CUDA graph and replayed (run it twice, with ``PYTORCH_CUDA_ALLOC_CONF`` unset and
  ``expandable_segments:True``, ``TAG`` naming each);
- ``loop-profile``: the forward's kernels under torch.profiler, one call alone against 20
  back to back: their summed time, the time some kernel runs, and the span, per call;
- ``memory-peak``: what is allocated at the peak of one forward + backward (inputs and dout
  included, as ``bench_backward``'s memory table counts), by the line of this project that
  allocated it, from the caching allocator's trace (``_record_memory_history``);
- ``graph-kernels``: the forward's kernels eager, captured as a CUDA graph by the caller and
  by ``cuda_graph=True``, the graphs replayed alone: time and kernels.

LongNet's configuration, b = 1, h = 16, d = 128, bf16; times are medians (CUDA events) of
loops of 10 calls, as a training loop issues them.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from ringsim.gpu import dilated_attention
from ringsim.gpu.executor import backward, graphs, schedule
from ringsim.gpu.executor.pool import MemoryPool
from ringsim.gpu.harness.profile import idle_stretches, kernel_spans
from ringsim.gpu.harness.timing import captured

SEGMENTS, RATES = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16)


def inputs(n: int, grad: bool = False):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(1, n, 16, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(4)
    )
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v, dout


def forward(q, k, v, causal: bool, pool=None):
    return dilated_attention(q, k, v, SEGMENTS, RATES, is_causal=causal, memory_pool=pool)


def forward_backward(q, k, v, dout, causal: bool) -> None:
    torch.autograd.grad(forward(q, k, v, causal), (q, k, v), dout)


def loop_ms(run, loops: int = 5, calls: int = 10) -> float:
    """The median over ``loops`` of the mean time of ``calls`` calls issued back to back."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(loops):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls):
            run()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / calls)
    return statistics.median(times)


def head_chunks() -> list[dict]:
    rows = []
    for n in (32768, 131072, 262144):
        q, k, v, dout = inputs(n, grad=True)
        for causal in (False, True):
            for budget in (1 << 30, 1 << 31, 1 << 32, 1 << 33):
                backward.PARTS_BUDGET = budget

                run = functools.partial(forward_backward, q, k, v, dout, causal)

                run()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                ms = loop_ms(run, loops=8, calls=1)
                # per token: beyond q, k, v, dout (allocated before), which count too
                kib = (peak + 4 * q.nbytes) / n / 1024
                rows.append(dict(n=n, causal=causal, budget_gib=budget / 2**30, ms=ms,
                                 kib_per_token=kib))  # fmt: skip
                print(f"n={n} causal={causal!s:5s} budget {budget / 2**30:3.0f} GiB: "
                      f"{ms:7.2f} ms, ~{kib:5.1f} KiB/token", flush=True)  # fmt: skip
    return rows


#: (name, GATHER_BELOW, STREAMS_BELOW, STREAMS)
VARIANTS = [
    ("default", 1.0, 8.0, 4), ("no streams", 1.0, 8.0, 0), ("gather<2", 2.0, 8.0, 4),
    ("gather<4", 4.0, 8.0, 4), ("gather<4 no streams", 4.0, 8.0, 0), ("gather<16", 16.0, 8.0, 4),
    ("gather<1e9", 1e9, 8.0, 0), ("streams<32", 1.0, 32.0, 4),
]  # fmt: skip


def schedules() -> list[dict]:
    rows = []
    for n in (32768, 65536, 131072, 262144):
        q, k, v, _ = inputs(n)
        for causal in (False, True):
            for name, gather, streams_below, streams in VARIANTS:
                schedule.GATHER_BELOW, schedule.STREAMS_BELOW = gather, streams_below
                schedule.STREAMS = streams
                ms = loop_ms(functools.partial(forward, q, k, v, causal))
                rows.append(dict(n=n, causal=causal, variant=name, ms=ms))
                print(f"n={n:7d} causal={causal!s:5s} {name:22s} {ms:7.3f} ms", flush=True)
    return rows


def allocations() -> list[dict]:
    rows, tag = [], os.environ.get("TAG", "")
    for n, causal in ((131072, False), (131072, True), (262144, True)):
        q, k, v, _ = inputs(n)
        for name, pool in (("plain", None), ("pool", MemoryPool())):
            run = functools.partial(forward, q, k, v, causal, pool)

            run()
            torch.cuda.synchronize()
            before = torch.cuda.memory_stats()
            ms = loop_ms(run)
            after = torch.cuda.memory_stats()
            calls = 3 + 5 * 10
            mallocs = (after["segment.all.allocated"] - before["segment.all.allocated"]) / calls
            frees = (after["segment.all.freed"] - before["segment.all.freed"]) / calls
            rows.append(dict(tag=tag, n=n, causal=causal, variant=name, ms=ms,
                             cudamalloc_per_call=mallocs, cudafree_per_call=frees))  # fmt: skip
            print(f"{tag:12s} n={n:7d} causal={causal!s:5s} {name:6s} {ms:7.3f} ms, cudaMalloc "
                  f"{mallocs:.2f} / cudaFree {frees:.2f} per call", flush=True)  # fmt: skip
        ms = graph_ms(functools.partial(forward, q, k, v, causal))
        rows.append(dict(tag=tag, n=n, causal=causal, variant="captured eager call", ms=ms))
        print(f"{tag:12s} n={n:7d} causal={causal!s:5s} graph  {ms:7.3f} ms", flush=True)
    return rows


def graph_ms(run) -> float:
    """The mean time of 10 replays of ``run`` captured whole as one CUDA graph."""
    graph, _ = captured(run)
    graph.replay()
    return loop_ms(graph.replay)


def loop_profile() -> list[dict]:
    rows = []
    for n, causal in ((131072, False), (131072, True), (262144, True)):
        q, k, v, _ = inputs(n)

        run = functools.partial(forward, q, k, v, causal)

        for _ in range(5):
            run()
        torch.cuda.synchronize()
        figures = {}
        for name, calls in (("alone", 1), ("loop", 20)):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    run()
                torch.cuda.synchronize()
            kernels = kernel_spans(prof)
            found = idle_stretches(kernels, min(k[0] for k in kernels))
            summed = sum(end - start for start, end, _ in kernels)
            span = found["span_us"]
            figures[name] = [x / calls / 1e3 for x in (summed, span - found["idle_us"], span)]
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
             "--format=csv,noheader"], capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        rows.append(dict(n=n, causal=causal, alone_sum_busy_span=figures["alone"],
                         loop_sum_busy_span=figures["loop"], smi_after=smi))  # fmt: skip
        print(f"n={n} causal={causal}: kernels summed / busy / span per call, alone "
              f"{figures['alone']}, in a loop {figures['loop']} ms; {smi}", flush=True)  # fmt: skip
    return rows


def _site(frames) -> str:
    """The innermost frame of this project (else the innermost of all) as ``file:line name``."""
    ours = [f for f in frames if "/gpu/" in f["filename"] or "/ringsim/" in f["filename"]]
    frame = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{'/'.join(frame['filename'].split('/')[-3:])}:{frame['line']} {frame['name']}"


def live_at_peak(trace) -> tuple[int, str, dict[str, int]]:
    """Replays an allocator trace: the peak of allocated bytes, the site whose allocation
    reached it, and the bytes live then by allocation site."""
    live, now, peak, at, best = {}, 0, 0, "", {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], _site(event.get("frames", [])))
            now += event["size"]
            if now > peak:
                peak, at, best = now, live[event["addr"]][1], dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            now -= live.pop(event["addr"])[0]
    sites: dict[str, int] = {}
    for size, site in best.values():
        sites[site] = sites.get(site, 0) + size
    return peak, at, dict(sorted(sites.items(), key=lambda x: -x[1]))


def memory_peak() -> list[dict]:
    rows = []
    for n in (131072, 262144):
        for causal in (False, True):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
            q, k, v, dout = inputs(n, grad=True)
            forward(q, k, v, causal).backward(dout)
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            peak, at, sites = live_at_peak(snapshot["device_traces"][0])
            measured = torch.cuda.max_memory_allocated()
            del q, k, v, dout
            mib = {site: size / 2**20 for site, size in sites.items()}
            rows.append(dict(n=n, causal=causal, peak_gib=peak / 2**30,
                             max_memory_allocated_gib=measured / 2**30,
                             kib_per_token=measured / n / 1024, peak_reached_by=at,
                             live_mib_by_site=mib))  # fmt: skip
            print(f"n={n} causal={causal}: peak {peak / 2**30:.3f} GiB (allocator "
                  f"{measured / 2**30:.3f}, {measured / n / 1024:.2f} KiB/token), reached by "
                  f"{at}", flush=True)  # fmt: skip
            for site, size in list(mib.items())[:12]:
                print(f"    {size:9.1f} MiB  {site}", flush=True)
    return rows


def graph_kernels() -> list[dict]:
    rows = []
    for n, causal in ((131072, True), (131072, False)):
        q, k, v, _ = inputs(n)
        run = functools.partial(forward, q, k, v, causal)
        graph, _ = captured(run, warmups=3)
        # cuda_graph=True keeps the tables its graph reads with the graph; a graph the caller
        # captures keeps them for good (Note [Tables in CUDA graphs]); replays alone, no copies
        dilated_attention(q, k, v, SEGMENTS, RATES, is_causal=causal, cuda_graph=True)
        ours = next(iter(graphs._CACHE.values())).graph
        runs = (("eager", run), ("caller's graph", graph.replay), ("cuda_graph=True", ours.replay))
        for name, call in runs:
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    call()
                torch.cuda.synchronize()
            kernels = kernel_spans(prof)
            found = idle_stretches(kernels, min(x[0] for x in kernels))
            cuda = torch.autograd.DeviceType.CUDA  # per kernel: calls and ms, per call
            by_name = [(e.key[:90], [e.count / 5, e.device_time_total / 5e3])
                       for e in prof.key_averages() if e.device_type == cuda]  # fmt: skip
            top = dict(sorted(by_name, key=lambda x: -x[1][1]))
            rows.append(dict(n=n, causal=causal, run=name, ms=loop_ms(call),
                             span_ms=found["span_us"] / 5e3, idle_ms=found["idle_us"] / 5e3,
                             kernels_calls_ms=top))  # fmt: skip
            print(
                f"n={n} causal={causal} {name}: {rows[-1]['ms']:.3f} ms, span "
                f"{rows[-1]['span_ms']:.3f}, idle {rows[-1]['idle_ms']:.3f}",
                flush=True,
            )
            for kernel, (count, ms) in list(top.items())[:10]:
                print(f"    {count:5.1f} x {ms:7.3f} ms  {kernel}", flush=True)
        del graph, ours
        graphs.clear_graphs()
    return rows


PROBES = {"head-chunks": head_chunks, "schedules": schedules, "allocations": allocations,
          "loop-profile": loop_profile, "memory-peak": memory_peak,
          "graph-kernels": graph_kernels}  # fmt: skip

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in PROBES:
        sys.exit(f"usage: python scripts/probe_one_gpu.py {{{','.join(PROBES)}}} OUT.json")
    found = PROBES[sys.argv[1]]()
    with open(sys.argv[2], "w") as f:
        json.dump(found, f, indent=1)
