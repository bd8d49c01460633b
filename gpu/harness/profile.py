"""Where one call of ``ringsim.gpu.dilated_attention`` spends its GPU time, part by part.

    python -m ringsim.gpu.harness.profile [--seq-len 1048576] [--causal] [--kernel K]
        [--backward] [--rows 25] [--host [--host-rows 20]] [--json PATH]

Runs the benchmark's configuration (b=1, h=16, d=128, bf16, w=(2048..32768), r=(1..16)) once
to warm up, then once under torch.profiler, and prints the CUDA kernels by total time and the
same time summed by part (:data:`PARTS`): the attention kernels against everything the
executor adds around them (gathers, mixing, sums, casts, fills). ``--backward`` profiles the
forward and the backward together (``out.backward(dout)``). ``--host`` also measures the
host's side (:func:`host_report`): the time to issue one call while the GPU is held back,
its kernel launches, the call's time on the GPU's clock, and the host's functions by
cProfile. ``--json`` writes the parts (and the host's figures).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import re
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ringsim.gpu import dilated_attention

from ..executor.cache import cache_report
from ..kernels import Kernel, choose_kernel
from .timing import event_median_ms

SEGMENTS = (2048, 4096, 8192, 16384, 32768)
RATES = (1, 2, 4, 8, 16)

#: Parts of the time, by the first pattern a CUDA kernel's name matches (lower case).
PARTS = (
    ("attention backward", r"bprop|bwd|backward|dq_dk_dv|dot_do_o|convert_dq"),
    ("attention forward", r"fprop|fmha|flash|attention|sdpa|cudnn"),
    ("mix (Triton)", r"_mix_kernel"),
    ("sum (Triton)", r"_sum_kernel"),
    ("merge (Triton)", r"_merge"),
    ("gather / index", r"index|gather|scatter"),
    ("copy / cast", r"copy|cast|convert"),
    ("add", r"add"),
    ("fill", r"fill|zero"),
)


def part_of(name: str) -> str:
    """The :data:`PARTS` name of a CUDA kernel (``other`` if none matches)."""
    lower = name.lower()
    return next((part for part, pattern in PARTS if re.search(pattern, lower)), "other")


def parts_table(events) -> dict[str, float]:
    """Milliseconds of CUDA time per part, from ``prof.key_averages()``."""
    totals: dict[str, float] = {}
    for event in events:
        us = getattr(event, "device_time_total", 0.0)
        if us and event.device_type == torch.autograd.DeviceType.CUDA:
            part = part_of(event.key)
            totals[part] = totals.get(part, 0.0) + us / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


#: Cycles of the sleep kernel that holds the GPU back while the host issues a call (about
#: 0.5 s on an H200's 1.98 GHz clock): longer than any call's host time here.
HOLD_CYCLES = 1_000_000_000


def host_report(run, events, rows: int = 20) -> dict:
    """The host's side of ``run`` (already warm: its caches hit), and its kernel launches.

    - ``host_ms``: the mean time ``run`` takes to return (5 calls) while a sleep kernel
      holds the GPU back, so that the host never waits for it: what issuing a call costs
      the host. A call that waits for the GPU (a host sync) reads as the sleep's length,
      and ``waits`` says so.
    - ``alone_ms``: the median of 10 calls each started on an idle GPU and timed on its
      clock (CUDA events): the GPU waits for the host's first launches.
    - ``loop_ms``: the mean of 10 calls issued back to back, as a training loop issues them
      (a host slower than the GPU sets this).
    - ``launches``: CUDA kernels, copies and fills in ``events`` (the profiled call).
    - ``functions``: cProfile's top ``rows`` host functions by own time, issued as above.
    """
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    torch.cuda.synchronize()
    held = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    held[0].record()
    torch.cuda._sleep(HOLD_CYCLES)
    held[1].record()
    hosts = []
    for _ in range(5):
        start = time.perf_counter()
        run()
        hosts.append(time.perf_counter() - start)
        torch.cuda._sleep(HOLD_CYCLES // 10)
    torch.cuda.synchronize()
    host = sum(hosts) / len(hosts)
    waits = max(hosts) * 1e3 >= 0.05 * held[0].elapsed_time(held[1])
    alone = event_median_ms(run, repeats=10, warmup=0)
    begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    begin.record()
    for _ in range(10):
        run()
    end.record()
    torch.cuda.synchronize()
    torch.cuda._sleep(HOLD_CYCLES)
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    torch.cuda.synchronize()
    return dict(host_ms=host * 1e3, waits=waits, alone_ms=alone,
                loop_ms=begin.elapsed_time(end) / 10, launches=launches,
                functions=host_functions(profiler, rows))  # fmt: skip


def host_functions(profiler: cProfile.Profile, rows: int) -> str:
    """cProfile's ``rows`` host functions with the most own time, then the ``rows`` with the
    most cumulative time, in µs (pstats prints ms and rounds these away): calls, own µs,
    cumulative µs, function."""
    stats = pstats.Stats(profiler).stats
    lines = []
    for title, column in (("own", 2), ("cumulative", 3)):
        ranked = sorted(stats.items(), key=lambda kv: -kv[1][column])[:rows]
        lines.append(f"by {title} time:\n{'calls':>6s} {'own us':>8s} {'cum us':>8s}  function")
        for (path, line, name), (_, calls, own, cumulative, _) in ranked:
            where = f"{Path(path).name}:{line}({name})" if line else name
            lines.append(f"{calls:6d} {own * 1e6:8.1f} {cumulative * 1e6:8.1f}  {where}")
    return "\n".join(lines)


def timeline(run, gaps: int = 8) -> dict:
    """Where the GPU waits during one call of ``run`` started on an idle GPU (torch.profiler,
    host and device on one clock): ``first_us`` from the call's start to its first kernel,
    ``idle_us`` the time no kernel runs between that start and the last kernel's end (of
    ``span_us``), and the ``gaps`` longest idle stretches after the first kernel, each with
    its start (from the call's start) and the kernel that ends it."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("ringsim call"):
            run()
        torch.cuda.synchronize()
    call = next(e for e in prof.events() if e.name == "ringsim call")
    return idle_stretches(kernel_spans(prof), call.time_range.start, gaps)


def kernel_spans(prof) -> list[tuple[float, float, str]]:
    """``(start, end, name)`` in µs of every CUDA kernel, copy and fill ``prof`` recorded."""
    cuda = torch.autograd.DeviceType.CUDA
    return [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
            if e.device_type == cuda]  # fmt: skip


def idle_stretches(kernels, origin: float, gaps: int = 8) -> dict:
    """:func:`timeline`'s figures from ``kernels``, ``(start, end, name)`` in µs on any
    streams (overlapping kernels count once), and the call's start ``origin``."""
    kernels = sorted(kernels)
    busy, found, reach = 0.0, [], kernels[0][0]
    for start, end, name in kernels:
        if start > reach:
            found.append((start - reach, reach - origin, name))
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    found.sort(reverse=True)
    longest = [dict(us=g, at_us=at, before=name[:60]) for g, at, name in found[:gaps]]
    return dict(first_us=kernels[0][0] - origin, idle_us=reach - origin - busy,
                span_us=reach - origin, gaps=longest)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="ringsim.gpu.harness.profile", description=__doc__)
    parser.add_argument("--seq-len", type=int, default=1 << 20)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--kernel", choices=[k.value for k in Kernel], help="default: auto")
    parser.add_argument("--backward", action="store_true", help="forward + backward")
    parser.add_argument("--rows", type=int, default=25, help="kernels to list")
    parser.add_argument("--host", action="store_true", help="also the host's side (host_report)")
    parser.add_argument("--host-rows", type=int, default=20, help="host functions to list")
    parser.add_argument("--json", type=Path, help="write the parts (ms) here")
    args = parser.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(1, args.seq_len, 16, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(4)
    )
    kernel = choose_kernel(q, args.kernel)
    if args.backward:
        q, k, v = (x.requires_grad_() for x in (q, k, v))

    def run():
        out = dilated_attention(q, k, v, SEGMENTS, RATES, is_causal=args.causal, kernel=kernel)
        if args.backward:
            torch.autograd.grad(out, (q, k, v), dout)

    for _ in range(3):  # warm: compiled, planned, the caches filled
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    parts = parts_table(events)
    total = sum(parts.values())
    what = "forward + backward" if args.backward else "forward"
    mask = "causal" if args.causal else "full"
    print(f"{what}, n={args.seq_len}, {mask}, kernel {kernel.value}: {total:.2f} ms of CUDA time")
    for part, ms in parts.items():
        print(f"  {part:20s} {ms:9.2f} ms  {100 * ms / total:5.1f} %")
    caches = cache_report()
    print("caches (hits / misses since the process started; the seed's pattern caching):")
    for name, (hits, misses) in caches.items():
        rate = hits / (hits + misses) if hits + misses else 0.0
        print(f"  {name:20s} {hits:6d} / {misses:<6d} hit rate {rate:.2f}")
    record = dict(n=args.seq_len, causal=args.causal, kernel=kernel.value,
                  backward=args.backward, parts_ms=parts, caches=caches)  # fmt: skip
    if args.host:
        host = host_report(run, events, args.host_rows)
        print(host["functions"])
        print(
            f"host: {host['host_ms']:.2f} ms to issue{' (it waits for the GPU)' * host['waits']}"
            f", {host['launches']} launches; alone {host['alone_ms']:.2f} ms, in a loop "
            f"{host['loop_ms']:.2f} ms, CUDA time {total:.2f} ms"
        )
        idle = timeline(run)
        print(
            f"timeline: first kernel at {idle['first_us']:.0f} us, idle {idle['idle_us']:.0f}"
            f" of {idle['span_us']:.0f} us; longest gaps:"
        )
        for gap in idle["gaps"]:
            print(f"  {gap['us']:7.1f} us at {gap['at_us']:8.1f} us, before {gap['before']}")
        record["host"], record["timeline"] = host, idle
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
