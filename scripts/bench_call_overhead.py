"""The host's cost of one kernel call, per kernel: what a host-bound short sequence pays per
launch (issue 13's 32K rows).

    python scripts/bench_call_overhead.py [OUT.json]   (on a GPU machine)

Each call is issued 50 times while a sleep kernel holds the GPU back, so the host never
waits for it; the mean host time per call is printed and written as JSON. Shapes: one
2048-row block (the smallest call the executor makes) and LongNet's r = 1 pair at 32K
(16 segments x 16 heads), as strided views of a (b, n, h, d) tensor as the executor reads
them.
"""

from __future__ import annotations

import functools
import json
import sys
import time

import torch

from ringsim.gpu.kernels import Kernel, attend, block_backward

HOLD = 2_000_000_000  # cycles: about a second on an H200


def host_us(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(HOLD)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / reps * 1e6


def main() -> None:
    dev = torch.device("cuda")
    x = torch.randn(1, 32768, 16, 128, device=dev, dtype=torch.bfloat16)
    views = x.view(16, 2048, 16, 128).transpose(1, 2)  # (segments, heads, rows, d), strided
    small = torch.randn(1, 1, 2048, 128, device=dev, dtype=torch.bfloat16)
    rows = []
    for name, blocks in (("one block", small), ("32K r=1 pair (strided)", views)):
        for kernel in (Kernel.CUDNN, Kernel.FLASH):
            for causal in (False, True):
                call = functools.partial(attend, blocks, blocks, blocks, causal=causal,
                                         scale=0.1, kernel=kernel)  # fmt: skip
                out, lse = call()
                grads = functools.partial(block_backward, blocks, blocks, blocks, out, lse, out,
                                          causal=causal, scale=0.1, kernel=kernel)  # fmt: skip
                forward, backward = host_us(call), host_us(grads)
                rows.append(dict(shape=name, kernel=kernel.value, causal=causal,
                                 forward_us=forward, backward_us=backward))  # fmt: skip
                print(
                    f"{name:24s} {kernel.value:6s} causal={causal!s:5s} forward "
                    f"{forward:7.1f} us, backward {backward:7.1f} us per call (host)"
                )
    for name, fn in (
        ("torch.empty", lambda: torch.empty(1024, device=dev)),
        ("index_select", lambda: x.index_select(1, torch.arange(0, 32768, 16, device=dev))),
        ("side stream fork + join", lambda: _fork_join(dev)),
    ):
        us = host_us(fn)
        rows.append(dict(shape=name, host_us=us))
        print(f"{name:24s} {us:7.1f} us per call (host)")
    if len(sys.argv) > 1:
        record = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                      cudnn=torch.backends.cudnn.version(), rows=rows)  # fmt: skip
        with open(sys.argv[1], "w") as f:
            json.dump(record, f, indent=1)


def _fork_join(dev):
    from ringsim.gpu.executor.schedule import SideStreams

    sides = SideStreams(dev)
    for i in range(4):
        with sides.on(i):
            pass
    sides.join()


if __name__ == "__main__":
    main()
