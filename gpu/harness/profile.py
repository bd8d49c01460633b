"""Where one forward of ``ringsim.gpu.dilated_attention`` spends its GPU time.

    python -m ringsim.gpu.harness.profile --seq-len 1048576 [--causal]

Runs the benchmark's configuration (b=1, h=16, d=128, bf16, w=(2048..32768),
r=(1..16)) once to warm up, then once under torch.profiler, and prints the CUDA kernels
by total time: the attention kernels against everything else (views, merges, casts).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from ringsim.gpu import dilated_attention

SEGMENTS = (2048, 4096, 8192, 16384, 32768)
RATES = (1, 2, 4, 8, 16)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ringsim.gpu.harness.profile", description=__doc__)
    parser.add_argument("--seq-len", type=int, default=1 << 20)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rows", type=int, default=25, help="kernels to list")
    args = parser.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, args.seq_len, 16, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )

    def run():
        return dilated_attention(q, k, v, SEGMENTS, RATES, is_causal=args.causal)

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70
        )
    )


if __name__ == "__main__":
    main()
