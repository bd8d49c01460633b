"""Time the forward's mixing pass (and the backward's sum) at 1M tokens for several
program shapes (positions per program x warps), with the registers Triton gave each.

    python scripts/tune_mix.py   (on a GPU machine)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ringsim.gpu.executor import mix_triton
from ringsim.gpu.harness.profile import main

SHAPES = [(64, 4), (32, 4), (16, 4), (64, 8), (32, 8), (128, 8), (16, 2), (32, 2)]


def registers() -> dict[str, int]:
    """Registers per thread of the variant of each kernel compiled last (this shape's)."""
    found = {}
    for name in ("_mix_kernel", "_sum_kernel"):
        kernel = getattr(mix_triton, name)
        for cache in getattr(kernel, "device_caches", {}).values():
            variants = list(cache[0].values())
            if variants:
                found[name] = getattr(variants[-1], "n_regs", 0)
    return found


rows = []
for block_rows, warps in SHAPES:
    mix_triton.BLOCK_ROWS, mix_triton.WARPS = block_rows, warps
    for extra in ([], ["--causal"], ["--backward"]):
        parts = main(["--seq-len", "1048576", "--rows", "0", *extra])["parts_ms"]
        row = {
            "rows": block_rows, "warps": warps, "run": " ".join(extra) or "forward",
            "mix_ms": parts.get("mix (Triton)"), "sum_ms": parts.get("sum (Triton)"),
            "total_ms": sum(parts.values()), **registers(),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
if len(sys.argv) > 1:
    Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
