"""Timing for the benchmarks: CUDA events, a warm-up call, peak memory, OOM as a result; and
a call captured as the caller's CUDA graph (:func:`captured`), for the probes and CUDA tests.

Shared by :mod:`ringsim.gpu.harness.bench` and :mod:`ringsim.gpu.harness.bench_backward`. Times
are medians over CUDA events after a warm-up call; the number of repetitions follows a budget in
seconds per row (own loop rather than ``triton.testing.do_bench``, to bound the total time
at 1M tokens). On the CPU (``--smoke``) the host clock times the calls.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Protocol

import torch

from .check_support import max_abs_err


class Timed(Protocol):
    """A table row that :func:`measure` fills in (:class:`ringsim.gpu.harness.bench.Result`)."""

    status: str
    ms: float | None
    reps: int
    peak_gib: float | None
    diff: float | None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call(fn: Callable, device: torch.device):
    """Run ``fn`` once (warm-up, compile); returns its result and the peak memory (GiB) the
    call allocated beyond what was allocated before it (None on the CPU)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    return result, (torch.cuda.max_memory_allocated(device) - before) / 2**30


def median_ms(fn: Callable, device: torch.device, budget_s: float) -> tuple[float, int]:
    """Median time of ``fn()`` in ms over ``budget_s / (one call)`` repetitions (3 to 50; 1
    with a zero budget), timed with CUDA events (host clock on the CPU); ``fn`` must be warm."""
    start = time.perf_counter()
    fn()
    sync(device)
    least = 3 if budget_s > 0 else 1
    reps = max(least, min(50, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), reps
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        events.append((begin, end))
    sync(device)
    return statistics.median(b.elapsed_time(e) for b, e in events), reps


def event_median_ms(fn: Callable, repeats: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` on the current CUDA device, each
    timed alone with CUDA events after ``warmup`` calls (the scripts' timer of single calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(result: Timed, fn: Callable, device, budget_s: float, ours=None, keep=False):
    """Run ``fn`` once (compared with ``ours`` when both give an output), then time it,
    filling in ``result``. Returns the output if
    ``keep``."""
    out, result.peak_gib = first_call(fn, device)
    if out is not None and ours is not None:
        result.diff = max_abs_err(out, ours)
    if not keep:
        out = None
    result.ms, result.reps = median_ms(fn, device, budget_s)
    return out


def optional(result: Timed, build: Callable, device, budget_s: float, ours) -> None:
    """A comparison row: running out of device memory is recorded as OOM, not raised."""
    try:
        measure(result, build(), device, budget_s, ours)
    except torch.cuda.OutOfMemoryError:
        result.status = "OOM"
    finally:
        free(device)


def captured(run: Callable, warmups: int = 2, stream=None, warm_stream=None):
    """``run()`` warmed up ``warmups`` times on ``warm_stream`` (default: the capture stream)
    and captured as a CUDA graph of the caller's on ``stream`` (default: a new side stream),
    as CUDA graphs need: returns the graph and what the captured call returned."""
    stream = stream or torch.cuda.Stream()
    warm_stream = warm_stream or stream
    for side in {stream, warm_stream}:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm_stream):
        for _ in range(warmups):
            run()
    torch.cuda.current_stream().wait_stream(warm_stream)
    stream.wait_stream(warm_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        result = run()
    return graph, result
