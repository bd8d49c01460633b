"""Forward time of :func:`ringsim.gpu.dilated_attention` on one GPU, against what it replaces.

    python -m ringsim.gpu.harness.bench [--smoke] [--lengths 32768,65536] [--out DIR] [--budget S]
        [--no-flex] [--no-naive] [--no-dense] [--no-padded] [--dense-max N] [--kernel K]

Problem: b=1, h=16, d=128, bf16, segment_lengths (2048, 4096, 8192, 16384, 32768),
dilation_rates (1, 2, 4, 8, 16), longnet, causal and not, n = 32K .. 1M. Rows per (n, causal):

- ours: ``dilated_attention`` with the kernel :func:`~ringsim.gpu.kernels.choose_kernel`
  picks (recorded), its peak memory (``max_memory_allocated`` after a reset, less what was
  allocated before the call; the inputs' size is printed once per length);
- pre-gathered: the same kernel calls on blocks gathered beforehand: ours / pre-gathered
  throughput is the share of time spent in the kernel (target >= 0.8);
- dense: the same kernel on full ``n x n`` attention, up to ``--dense-max`` (262144);
- dense cudnn: the anchor, cuDNN's fused attention on the whole sequence (where cuDNN runs),
  at every n: up to ``--dense-max`` on every head; past it on fewer heads, so that its work
  equals the work at ``--dense-max`` (``h' = h (dense_max / n)^2``, at least 1; a dense call
  at 1M tokens takes 15 s): its throughput per head is flat once the grid fills the GPU
  (``n / 128`` row tiles per head), and the row's status says how many heads ran.
  ``vs_dense`` on ours is ours' useful TFLOP/s over this row's;
- ours padded: ours with a ``key_padding_mask`` that pads nothing (the same output, compared):
  the cost of the masked path (gathered rows and a kernel that takes a mask, Note [Key
  masks] in :mod:`ringsim.gpu.executor.base`); ``ratio`` is its time over ours';
- naive and flex: see :mod:`ringsim.gpu.harness.bench_baselines`; their output is compared with
  ours (max abs difference) so that every row computes the same function;
- ours graph: ours with ``cuda_graph=True``, the forward replayed as one CUDA graph
  (:mod:`ringsim.gpu.executor.graphs`), which removes the launch overhead; last, since a capture
  that runs out of memory may keep some of it.

TFLOP/s count useful FLOPs: ``4 d`` per selected (query, key) pair, causal pairs exactly
(:func:`~ringsim.gpu.harness.bench_baselines.useful_flops`); the dense row counts its own ``n^2``.
Times are medians over CUDA events after a warm-up call (which also compiles FlexAttention);
the number of repetitions follows ``--budget`` seconds per row, at least 3 (own loop rather
than ``triton.testing.do_bench``, to bound the total time at 1M tokens). Only the
comparison rows (dense, naive, flex) may end as OOM; ours never is skipped.
Writes ``bench.json`` and ``bench.md`` (``bench_smoke.*`` with ``--smoke``) under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ringsim.cli.tables import markdown_table, text_table
from ringsim.config import make_config

from ..executor import dilated_attention
from ..executor.graphs import clear_graphs
from ..kernels import Kernel, capability, choose_kernel
from . import bench_baselines as baselines
from .check_support import environment
from .output import OUT_HELP, output_folder
from .timing import free, measure, optional

LENGTHS = (32768, 65536, 131072, 262144, 524288, 1048576)
SEGMENTS, RATES = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16)
SMOKE = dict(lengths=(256,), segments=(32, 64, 128, 256), rates=(1, 2, 4, 8), h=4, d=16)


@dataclass
class Result:
    """One row of the table; ``ms`` is None for a row that did not run (``status`` says why)."""

    n: int
    causal: bool
    row: str
    kernel: str
    status: str = "ok"
    ms: float | None = None
    reps: int = 0
    flops: int = 0
    peak_gib: float | None = None
    diff: float | None = None  # max |out - ours|
    ratio: float | None = None  # time of this row / time of ours; on ours: pre / ours
    vs_dense: float | None = None  # on ours: its TFLOP/s / dense cudnn's

    @property
    def tflops(self) -> float | None:
        return None if self.ms is None else self.flops / self.ms / 1e9

    def cells(self) -> list[str]:
        def fmt(x, spec):
            return "-" if x is None else format(x, spec)

        return [
            str(self.n),
            "causal" if self.causal else "full",
            self.row,
            self.kernel,
            fmt(self.ms, ".2f"),
            fmt(self.tflops, ".1f"),
            fmt(self.ratio, ".2f"),
            fmt(self.vs_dense, ".2f"),
            fmt(self.peak_gib, ".2f"),
            fmt(self.diff, ".1e"),
            self.status,
        ]


HEADER = ["n", "mask", "row", "kernel", "ms", "TFLOP/s", "ratio", "vs dense", "peak GiB", "max Δ",
          "status"]  # fmt: skip


def comparisons(args, kernel: Kernel, flex_why: str | None) -> list[tuple[str, str, object, str]]:
    """``(row, kernel, builder(q, k, v, config), why skipped or "")`` of the comparison rows."""
    compiled = flex_why is None
    flex_skip = "--no-flex" if args.no_flex else "" if compiled or args.smoke else flex_why
    return [
        ("dense", kernel.value, lambda q, k, v, c: baselines.dense(q, k, v, c, kernel),
         "--no-dense" if args.no_dense else "the dense cudnn row" if kernel is Kernel.CUDNN
         else ""),
        ("naive", kernel.value, lambda q, k, v, c: baselines.naive(q, k, v, c, kernel),
         "--no-naive" if args.no_naive else ""),
        ("flex" if compiled else "flex-eager", "flex",
         lambda q, k, v, c: baselines.flex(q, k, v, c, compiled), flex_skip),
    ]  # fmt: skip


def bench_length(n: int, args, problem: dict, device: torch.device, emit) -> None:
    """Every row for one length, causal and not, on one set of random inputs."""
    b, h, d, segs, rates = 1, problem["h"], problem["d"], problem["segments"], problem["rates"]
    gen = torch.Generator(device=device).manual_seed(n)
    shape, dtype = (b, n, h, d), problem["dtype"]
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
    kernel = choose_kernel(q, args.kernel)
    print(
        f"n={n}: inputs q, k, v {3 * q.nbytes / 2**30:.2f} GiB, kernel {kernel.value}", flush=True
    )
    rows = comparisons(args, kernel, capability(Kernel.FLEX, q))
    for causal in (False, True):
        config = make_config(segs, rates, is_causal=causal)
        flops = baselines.useful_flops(config, b, n, h, d)

        def ours_fn(causal=causal, cuda_graph=False):
            return dilated_attention(
                q, k, v, segs, rates, is_causal=causal, kernel=kernel, cuda_graph=cuda_graph
            )

        ours = Result(n, causal, "ours", kernel.value, flops=flops)
        ours_out = measure(ours, ours_fn, device, args.budget, keep=True)
        pre = Result(n, causal, "pre-gathered", kernel.value, flops=flops)
        measure(pre, baselines.pregathered(q, k, v, config, kernel), device, args.budget)
        free(device)
        ours.ratio = pre.ms / ours.ms
        ours.status = f"ours/pre {ours.ratio:.2f} (target >= 0.8)"
        anchor = dense_cudnn(q, k, v, config, args, device)
        if anchor.tflops is not None:
            ours.vs_dense = ours.tflops / anchor.tflops
        emit(ours)
        emit(pre)
        emit(anchor)
        padded = Result(n, causal, "ours padded", "", flops=flops)
        if args.no_padded:
            padded.status = "skipped: --no-padded"
        else:
            none = torch.zeros(b, n, dtype=torch.bool, device=device)
            padded.kernel = choose_kernel(q, None, masked=True).value
            padded_fn = functools.partial(dilated_attention, q, k, v, segs, rates,
                                          is_causal=causal, key_padding_mask=none)  # fmt: skip
            optional(padded, lambda f=padded_fn: f, device, args.budget, ours_out)
            padded.ratio = None if padded.ms is None else padded.ms / ours.ms
        emit(padded)
        free(device)
        for name, kname, builder, why in rows:
            result = Result(n, causal, name, kname)
            if name == "dense" and not why and n > args.dense_max:
                why = f"n > --dense-max {args.dense_max}"
            if why:
                result.status = f"skipped: {why}"
            else:
                result.flops = (
                    baselines.dense_flops(b, n, h, d, causal) if name == "dense" else flops
                )
                compare = None if name == "dense" else ours_out
                optional(
                    result, lambda c=config, f=builder: f(q, k, v, c), device, args.budget, compare
                )
                result.ratio = None if result.ms is None else result.ms / ours.ms
            emit(result)
        # last: a capture that runs out of memory may keep some until the process ends
        graphed = Result(n, causal, "ours graph", kernel.value, flops=flops)
        if device.type == "cuda":  # the same forward replayed as one CUDA graph
            graph_fn = functools.partial(ours_fn, cuda_graph=True)
            optional(graphed, lambda f=graph_fn: f, device, args.budget, ours_out)
            clear_graphs()
            if graphed.ms is not None:
                graphed.ratio = pre.ms / graphed.ms
                graphed.status = f"graph/pre {graphed.ratio:.2f}"
        else:
            graphed.status = "skipped: CUDA graphs need a GPU"
        emit(graphed)
        del ours_out
        free(device)


def dense_cudnn(q, k, v, config, args, device) -> Result:
    """The ``dense cudnn`` row (module docstring): cuDNN on the whole sequence, every head up
    to ``--dense-max``, fewer past it."""
    b, n, h, d = q.shape
    result = Result(n, config.is_causal, "dense cudnn", Kernel.CUDNN.value)
    why = capability(Kernel.CUDNN, q)
    if why is not None:
        result.status = f"skipped: {why}"
        return result
    heads = baselines.dense_heads(n, h, args.dense_max)
    result.flops = baselines.dense_flops(b, n, heads, d, config.is_causal)
    sub = (x[:, :, :heads] for x in (q, k, v))
    optional(result, lambda: baselines.dense(*sub, config, Kernel.CUDNN), device, args.budget, None)
    if result.ms is not None and heads < h:
        result.status = f"ok: {heads} of {h} heads (n > --dense-max {args.dense_max})"
    return result


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    title = __doc__.partition("\n")[0]
    parser = argparse.ArgumentParser("python -m ringsim.gpu.harness.bench", description=title)
    parser.add_argument("--smoke", action="store_true", help="tiny, on the CPU: tests the script")
    parser.add_argument("--lengths", help="comma-separated n (default 32768,...,1048576)")
    parser.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention row")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive row")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row")
    parser.add_argument("--no-padded", action="store_true", help="skip the ours padded row")
    parser.add_argument("--dense-max", type=int, default=262144, help="longest dense row")
    parser.add_argument("--budget", type=float, help="seconds of timing per row (0.5; smoke 0)")
    parser.add_argument("--kernel", choices=[k.value for k in Kernel], help="default: auto")
    args = parser.parse_args(argv)
    args.out = output_folder(args.out, "bench")
    return args


def problem_of(args) -> dict:
    """The benchmark problem (the module docstring's, tiny with ``--smoke``, ``--lengths``
    applied); also fills in ``args.budget`` (0.5 s per row, 0 with ``--smoke``)."""
    if args.budget is None:
        args.budget = 0.0 if args.smoke else 0.5
    problem = dict(h=16, d=128, segments=SEGMENTS, rates=RATES, lengths=LENGTHS)
    problem.update(SMOKE if args.smoke else {})
    if args.lengths:
        problem["lengths"] = tuple(int(x) for x in args.lengths.split(","))
    problem["dtype"] = torch.float32 if args.smoke else torch.bfloat16
    return problem


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "ringsim.gpu.harness.bench: no CUDA device; run with --smoke on a CPU", file=sys.stderr
        )
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    problem = problem_of(args)
    env = environment(device)
    print(f"ringsim.gpu.harness.bench on {env['device']}, torch {env['torch']}, CUDA {env['cuda']}")
    print(f"problem: b=1 {problem} longnet", flush=True)
    results: list[Result] = []

    def emit(result: Result) -> Result:
        results.append(result)
        print("  " + "  ".join(result.cells()), flush=True)
        return result

    start, paths = time.perf_counter(), []
    for n in problem["lengths"]:
        bench_length(n, args, problem, device, emit)
        free(device)
        paths = write(args, env, problem, results, time.perf_counter() - start)  # after each n
    print(f"\n{text_table(HEADER, [r.cells() for r in results])}\n\n" + "\n".join(NOTES))
    print(f"\nwrote {' and '.join(map(str, paths))} in {time.perf_counter() - start:.0f} s")
    return 0


def write(args, env: dict, problem: dict, results: list[Result], seconds: float) -> list[Path]:
    """``bench.json`` and ``bench.md`` (``bench_smoke.*``) under ``args.out``."""
    suffix = "_smoke" if args.smoke else ""
    args.out.mkdir(parents=True, exist_ok=True)
    problem = dict(problem, dtype=str(problem["dtype"]).removeprefix("torch."))
    rows = [dict(asdict(r), tflops=r.tflops) for r in results]
    report = dict(env, problem=problem, seconds=round(seconds, 1), rows=rows, notes=NOTES)
    paths = [args.out / f"bench{suffix}.json", args.out / f"bench{suffix}.md"]
    paths[0].write_text(json.dumps(report, indent=1))
    md = [f"# ringsim.gpu.harness.bench{suffix}", "", f"{env['device']}, torch {env['torch']}, "
          f"CUDA {env['cuda']}, {env['date']}; b=1 {problem}, longnet.", "",
          markdown_table(HEADER, [r.cells() for r in results]), "", *NOTES]  # fmt: skip
    paths[1].write_text("\n".join(md) + "\n")
    return paths


NOTES = [
    "- TFLOP/s: useful FLOPs (4 d per selected query-key pair, causal exact) over the median "
    "time; the dense row counts its own n^2 pairs.",
    "- ratio: on ours and ours graph, pre-gathered time / their time (kernel share, target "
    ">= 0.8); on other rows, their time / ours time (above 1: ours is faster).",
    "- vs dense: on ours, its useful TFLOP/s over the dense cudnn row's (same n and mask); "
    "targets >= 0.9 full, >= 0.85 causal at 128K..1M. Past --dense-max the dense cudnn row runs "
    "fewer heads (its throughput per head is flat once the GPU is full; its status says how many).",
    "- peak GiB: max_memory_allocated during one call (after a reset) minus what was allocated "
    "before it: the inputs, ours' output kept for comparison and data prepared outside the "
    "timed region (pre-gathered blocks, transposes, block masks) are not counted.",
    "- max Δ: max abs difference of the row's output from ours (same function, bf16).",
    "- naive: torchscale-style slicing, one kernel call per offset, softmax-of-lse mixing; "
    "flex: one FlexAttention call per pair with a dilated block mask (see bench_baselines).",
]


if __name__ == "__main__":
    sys.exit(main())
