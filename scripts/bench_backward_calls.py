"""The cuDNN backward of one pair's blocks as the one-device executor calls it, against the
same work in fewer or denser calls: is the backward's gap to the pre-gathered problem the
head chunks (Note [Direct gradients]), the strided views, or neither?

    python scripts/bench_backward_calls.py [OUT.json]   (on a GPU machine)

LongNet's r = 1 pair at n = 128K (64 segments of 2048 rows x 16 heads, d = 128, bf16), causal
and not: one call on the strided views of (b, n, h, d) tensors (the executor's layout), four
calls of 4 heads each (its head chunks at 128K), and one call on contiguous (B, H, M, D)
copies (the pre-gathered layout). Times are medians of 10 calls (CUDA events).
"""

from __future__ import annotations

import json
import sys

import torch

from ringsim.gpu.harness.timing import event_median_ms
from ringsim.gpu.kernels import Kernel, attend, block_backward


def measure(q, k, v, dout, causal: bool, w: int = 2048) -> list[dict]:
    """The rows of one mask (module docstring)."""
    _, n, h, d = q.shape
    views = [x.view(n // w, w, h, d).transpose(1, 2) for x in (q, k, v, dout)]
    out, lse = attend(*views[:3], causal=causal, scale=d**-0.5, kernel=Kernel.CUDNN)
    strided_out = torch.empty_like(q).view(n // w, w, h, d).transpose(1, 2)
    strided_out.copy_(out)
    dense = [x.contiguous() for x in views]

    def grads(x, o, heads=slice(None)):
        qq, kk, vv, dd = (t[:, heads] for t in x)
        return block_backward(qq, kk, vv, o[:, heads], lse[:, heads].contiguous(), dd,
                              causal=causal, scale=d**-0.5, kernel=Kernel.CUDNN)  # fmt: skip

    def chunks(x, o):
        return [grads(x, o, slice(i, i + 4)) for i in range(0, h, 4)]

    ways = {
        "forward, strided, 1 call": lambda: attend(
            *views[:3], causal=causal, scale=d**-0.5, kernel=Kernel.CUDNN
        ),
        "backward, strided, 1 call of 16 heads": lambda: grads(views, strided_out),
        "backward, strided, 4 calls of 4 heads": lambda: chunks(views, strided_out),
        "backward, contiguous, 1 call of 16 heads": lambda: grads(dense, out),
        "backward, contiguous, 4 calls of 4 heads": lambda: chunks(dense, out),
    }
    rows = []
    for way, fn in ways.items():
        ms = event_median_ms(fn)
        rows.append(dict(causal=causal, way=way, ms=ms))
        print(f"causal={causal!s:5s} {way:42s} {ms:.3f} ms")
    return rows


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(1, 131072, 16, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(4)
    )
    rows = measure(q, k, v, dout, False) + measure(q, k, v, dout, True)
    if len(sys.argv) > 1:
        record = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                      cudnn=torch.backends.cudnn.version(), n=q.shape[1], rows=rows)  # fmt: skip
        with open(sys.argv[1], "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
