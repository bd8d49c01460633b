"""Where one call of ``ringsim.gpu.dilated_attention`` spends its GPU time, part by part.

    python -m ringsim.gpu.harness.profile [--seq-len 1048576] [--causal] [--kernel K]
        [--backward] [--rows 25] [--json PATH]

Runs the benchmark's configuration (b=1, h=16, d=128, bf16, w=(2048..32768), r=(1..16)) once
to warm up, then once under torch.profiler, and prints the CUDA kernels by total time and the
same time summed by part (:data:`PARTS`): the attention kernels against everything the
executor adds around them (gathers, mixing, sums, casts, fills). ``--backward`` profiles the
forward and the backward together (``out.backward(dout)``). ``--json`` writes the parts.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ringsim.gpu import dilated_attention

from ..executor.cache import cache_report
from ..kernels import Kernel, choose_kernel

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


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="ringsim.gpu.harness.profile", description=__doc__)
    parser.add_argument("--seq-len", type=int, default=1 << 20)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--kernel", choices=[k.value for k in Kernel], help="default: auto")
    parser.add_argument("--backward", action="store_true", help="forward + backward")
    parser.add_argument("--rows", type=int, default=25, help="kernels to list")
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
    if args.json:
        record = dict(n=args.seq_len, causal=args.causal, kernel=kernel.value,
                      backward=args.backward, parts_ms=parts, caches=caches)  # fmt: skip
        args.json.write_text(json.dumps(record, indent=1))
    return parts


if __name__ == "__main__":
    main()
