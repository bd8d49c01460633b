"""How the calls of one zigzag rank's plain causal ring (w = n, r = 1, P = 2) could be cut,
timed with cuDNN's attention on one GPU (bf16, b = 1, h = 16, d = 128): the calls the
executor makes now against fewer, larger calls of the same useful work.

    python scripts/bench_zigzag_calls.py [OUT.json] [--chunk 65536]

Prints a table and writes JSON. An experiment script (docs/results/zigzag_calls.json): it
decided whether the executor should merge a step's pieces into one call.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from ringsim.gpu.harness.timing import event_median_ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("out", nargs="?", default=None)
    parser.add_argument("--chunk", type=int, default=65536)
    args = parser.parse_args(argv)
    s, h, d = args.chunk, 16, 128

    def x(n):  # (b, H, n, d) views of (b, n, H, d), as the executor's blocks are
        return torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    q2, k2, v2 = x(2 * s), x(2 * s), x(2 * s)
    q1, k1, v1 = q2[:, :, :s], k2[:, :, :s], v2[:, :, :s]
    qb, kb, vb = q2[:, :, s:], k2[:, :, s:], v2[:, :, s:]
    full = 4 * h * d * s * s  # FLOPs of one full s x s block (forward)

    def call(q, k, v, causal):
        return sdpa(q, k, v, is_causal=causal)

    variants = {
        # the own step: chunk j causal, chunk 2P-1-j causal, and 2P-1-j against j
        "own: 2 causal + 1 full (now)": (
            lambda: (call(q1, k1, v1, True), call(qb, kb, vb, True), call(qb, k1, v1, False)),
            2 * full,
        ),
        "own: 1 causal over the shard": (lambda: call(q2, k2, v2, True), 2 * full),
        # a step whose block comes from an earlier rank: both chunks against one piece
        "recv: 2 full, one per chunk (now)": (
            lambda: (call(q1, k1, v1, False), call(qb, k1, v1, False)),
            2 * full,
        ),
        "recv: 1 full, the shard against a piece": (lambda: call(q2, k1, v1, False), 2 * full),
        # a step whose block comes from a later rank: one chunk against both pieces
        "recv: 1 full, a chunk against both pieces": (lambda: call(qb, k2, v2, False), 2 * full),
    }
    rows = []
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.no_grad():
        for name, (fn, flops) in variants.items():
            ms = event_median_ms(fn)
            rows.append({"variant": name, "ms": ms, "tflops": flops / ms / 1e9})
            print(f"{name:45s} {ms:8.2f} ms {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "chunk": s,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
