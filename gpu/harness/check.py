"""Parity of the torch backend on a GPU in bf16, fp16 and fp32 against float64 (spec §9).

    python -m ringsim.gpu.harness.check [--quick] [--smoke] [--no-flex] [--out DIR]

Sections, each row one check on fresh seeded unit-normal inputs (never zeros):

1. reference: the float64 references themselves. The torch dense-mask formula in float64
   (:func:`~ringsim.gpu.harness.check_support.naive_dilated`) against the NumPy oracle; and,
   on every configuration within dense reach, the float64 math path and the float64 segment-wise
   formula against it: they stand in for the definition beyond dense reach.
2. adapter: every kernel adapter's ``attend()`` (flash, cudnn, efficient, flex, math, ...)
   on random ``(B, H, M, D)`` blocks, causal and not, against the float64 math path; out and
   lse (a FlexAttention lse off by a factor ln 2 is reported as such).
3. dilated / ring: :func:`ringsim.gpu.dilated_attention` with every kernel that can run, and
   the simulated ring (P = 2, 4, 8) on one device, on aligned and ragged configurations.
4. gradients: dq, dk, dv of the same paths on some of those configurations
   (:mod:`ringsim.gpu.harness.check_grad`, spec §9's 3x rule).
5. masks: key padding (one device with every kernel that takes a mask, and the simulated
   ring) and grouped-query attention, forward and gradients
   (:mod:`ringsim.gpu.harness.check_masks`).

Reference: the dense-mask definition in float64 up to ``dense_max`` (8192) rows, beyond it
the float64 math path (``kernel="math"`` on float64 inputs), on the inputs already rounded to
the dtype under test. Bounds (spec §9): fp32 2e-5 max abs; bf16/fp16 2x the error of the plain
formula evaluated in that dtype on the same inputs, plus 1e-6, for out and for lse. Beyond
dense reach that baseline is the same formula evaluated segment by segment in that dtype
(identical arithmetic minus the exact zeros of masked keys). TF32 is switched off.

Exit status: 0 if every row passes, 1 if any fails, 2 without CUDA (use ``--smoke`` on CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ringsim.cases import Case, fixed_cases, random_case
from ringsim.cli.tables import text_table
from ringsim.tolerance import dtype_name, tolerance

from ..executor import dilated_attention
from ..kernels import Kernel, capability, choose_kernel
from .check_grad import grad_rows
from .check_masks import mask_rows
from .check_rows import adapter_rows, emit, reference_rows
from .check_support import (
    ROW_HEADER,
    Check,
    MaskCache,
    Plan,
    Row,
    bounds,
    draw,
    environment,
    is_low_precision,
    max_abs_err,
    naive_dilated,
    setup_device,
    summary,
)
from .output import OUT_HELP, output_folder


def _case(n, segs, rates, causal=False, mode="longnet", b=1, h=8, d=64, scale=None) -> Case:
    return Case(b, n, h, d, segs, rates, causal, mode, softmax_scale=scale)


def make_plan(name: str) -> Plan:
    """``smoke`` (CPU, tiny), ``quick`` (up to 8K) or ``full`` (up to 64K)."""
    rng = np.random.default_rng(5)
    oracle = fixed_cases(1) + fixed_cases(4) + [random_case(rng, 1, 40) for _ in range(8)]
    low, fp32 = ("bfloat16",), ("float32",)
    if name == "smoke":
        checks = (
            Check(
                "A",
                _case(96, (24, 48, 96), (1, 2, 4), b=2, h=4, d=16),
                (),
                (2, 4, 8),
                True,
                True,
                masks=True,
            ),
            Check(
                "B",
                _case(90, (20, 50, 130), (1, 3, 5), True, "grouped", h=4, d=16),
                (),
                (3,),
                grads=True,
                masks=True,
            ),
            Check("C", _case(200, (40, 100), (2, 3), True, h=4, d=16), (), (4,)),
        )
        dtypes = (torch.bfloat16, torch.float16, torch.float32)
        return Plan(name, "cpu", dtypes, ((2, 3, 33, 16),), checks, tuple(oracle[:6]), 128)
    every = ("bfloat16", "float16", "float32")
    checks = (
        Check(
            "A",
            _case(4096, (1024, 2048, 4096), (1, 2, 4), b=2),
            low + fp32,
            (2, 4, 8),
            grads=True,
            masks=True,
        ),
        Check("B", _case(4096, (1024, 2048, 4096), (1, 2, 4), True), (), (2, 4, 8), True, True),
        Check(
            "C",
            _case(3000, (700, 1800, 5000), (1, 3, 5), True, "grouped"),
            low,
            (2, 4, 8),
            grads=True,
            masks=True,
        ),
        Check("D", _case(8190, (2000, 3000), (3, 2), scale=0.2), (), (2, 3)),
        Check("E", _case(1000, (6, 500), (8, 2), True), (), (2, 4, 8), grads=True),  # no-key rows
    )
    flex = every
    if name == "quick":
        no_flex = [replace(c, flex_dtypes=()) for c in checks[1:]]  # FlexAttention compiles
        checks, flex = (replace(checks[0], flex_dtypes=low), *no_flex), low
    else:
        checks += (
            Check("F", _case(16384, (2048, 4096, 8192, 16384), (1, 2, 4, 8)), (), (8,)),
            Check("G", _case(32768, (2048, 4096, 8192), (1, 2, 4), True), (), (4,), grads=True),
            Check("H", _case(20000, (3000, 7000, 12000), (2, 3, 5), True, "grouped")),
            Check("I", _case(65536, (2048, 4096, 8192), (1, 2, 4))),
        )
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    shapes = ((3, 4, 777, 64), (1, 2, 4096, 128))
    return Plan(name, "cuda", dtypes, shapes, checks, tuple(oracle), 8192, flex)


def runnable(plan: Plan, d: int) -> dict[tuple[Kernel, torch.dtype], str | None]:
    """Why each (kernel, dtype) cannot run on the plan's device (None: it can)."""
    probe = {dt: torch.empty(1, 1, 1, d, dtype=dt, device=plan.device) for dt in plan.dtypes}
    return {(kn, dt): capability(kn, probe[dt]) for kn in Kernel for dt in plan.dtypes}


def reference(plan: Plan, check: Check, x: tuple, first: bool, masks: MaskCache, rows) -> tuple:
    """The float64 ``(out, lse)`` of ``x`` rounded to the dtype under test: the dense
    definition within reach (and, once per check, rows that hold the float64 math path and the
    segment-wise formula to it), the float64 math path beyond."""
    case, x64 = check.case, [a.double() for a in x]
    args = (case.segment_lengths, case.dilation_rates)
    math64 = functools.partial(dilated_attention, *x64, *args, **case.kwargs(), return_lse=True)
    if case.seq_len > plan.dense_max:
        return math64(kernel="math"), "math f64"
    ref = naive_dilated(*x64, *args, **case.kwargs(), masks=masks)
    if first:
        tol = (tolerance("float64"),) * 2
        where = ("reference", "math", "float64", 1, case.seq_len, check.name)
        emit(rows, where, lambda: math64(kernel="math"), ref, tol, "dense f64")
        seg64 = naive_dilated(*x64, *args, **case.kwargs(), dense=False)
        emit(rows, ("reference", "segment-wise", *where[2:]), lambda: seg64, ref, tol, "dense f64")
    return ref, "dense f64"


def dilated_rows(plan: Plan, able: dict, rows: list[Row], ring) -> None:
    """Every check: single-device kernels, then the simulated ring, per dtype."""
    for index, check in enumerate(plan.checks):
        case, masks = check.case, MaskCache()
        args, kw = (case.segment_lengths, case.dilation_rates), case.kwargs()
        dense = case.seq_len <= plan.dense_max
        print(f"[{check.name}] {case.describe()} ({'dense' if dense else 'math'} f64)", flush=True)
        for t, dtype in enumerate(plan.dtypes):
            x = draw(case.shape, dtype, 10_000 + 100 * index + t, plan.device)
            ref, ref_name = reference(plan, check, x, t == 0, masks, rows)
            base = (0.0, 0.0)
            if is_low_precision(dtype):
                naive = naive_dilated(*x, *args, **kw, dense=dense, masks=masks)
                base = (max_abs_err(naive[0], ref[0]), max_abs_err(naive[1], ref[1]))
                del naive
            bound, name = bounds(dtype, *base), dtype_name(dtype)
            for kernel in Kernel:
                if able[(kernel, dtype)] or (
                    kernel is Kernel.FLEX and name not in check.flex_dtypes
                ):
                    continue
                run = functools.partial(dilated_attention, *x, *args, **kw, kernel=kernel)
                where = ("dilated", kernel.value, name, 1, case.seq_len, check.name)
                emit(rows, where, functools.partial(run, return_lse=True), ref, bound, ref_name)
            kernels = [None]
            if check.ring_kernels and t == 0:
                kernels += [kn for kn in Kernel if kn is not Kernel.FLEX and not able[(kn, dtype)]]
            for p, kernel in ((p, kn) for p in check.rings for kn in kernels if ring):
                label = kernel.value if kernel else f"auto:{choose_kernel(x[0]).value}"
                run = functools.partial(ring, *x, *args, world_size=p, **kw, kernel=kernel)
                where = ("ring", label, name, p, case.seq_len, check.name)
                emit(rows, where, functools.partial(run, return_lse=True), ref, bound, ref_name)
            del ref, x
        masks.clear()


def ring_function(smoke: bool):
    """``ringsim.gpu.simulated_ring_dilated_attention``, looked up when the check runs; its
    absence skips the ring rows with a message in --smoke and is an error otherwise."""
    import ringsim.gpu as backend

    fn = getattr(backend, "simulated_ring_dilated_attention", None)
    if fn is None and not smoke:
        raise ImportError("ringsim.gpu.simulated_ring_dilated_attention is missing")
    if fn is None:
        print("ring rows skipped: simulated_ring_dilated_attention is missing", flush=True)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    title = __doc__.partition("\n")[0]
    parser = argparse.ArgumentParser("python -m ringsim.gpu.harness.check", description=title)
    parser.add_argument("--quick", action="store_true", help="up to 8K, fewer compiles (~3 min)")
    parser.add_argument("--smoke", action="store_true", help="tiny, on the CPU: tests the script")
    parser.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles)")
    args = parser.parse_args(argv)
    args.out = output_folder(args.out, "check")
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = make_plan(name)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print(
            "ringsim.gpu.harness.check: no CUDA device; run with --smoke on a CPU", file=sys.stderr
        )
        return 2
    settings = setup_device() if plan.device == "cuda" else {}
    env = environment(torch.device(plan.device))
    where = f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}"
    print(f"ringsim.gpu.harness.check ({name}) on {where} {settings}", flush=True)
    start, rows, times = time.perf_counter(), [], {}
    able = runnable(plan, 64 if plan.device == "cuda" else 16)
    for dt in plan.dtypes if args.no_flex else ():
        able[(Kernel.FLEX, dt)] = able[(Kernel.FLEX, dt)] or "skipped by --no-flex"
    skipped = {f"{kn.value}/{dtype_name(dt)}": why for (kn, dt), why in able.items() if why}
    for what, why in skipped.items():
        print(f"  not run: {what}: {why}", flush=True)
    for section, run in (
        ("reference", lambda: reference_rows(plan, rows)),
        ("adapter", lambda: adapter_rows(plan, able, rows)),
        ("dilated/ring", lambda: dilated_rows(plan, able, rows, ring_function(args.smoke))),
        ("gradients", lambda: grad_rows(plan, able, rows, ring_function(args.smoke), emit)),
        ("masks", lambda: mask_rows(plan, rows, ring_function(args.smoke), emit)),
    ):
        t0 = time.perf_counter()
        print(f"== {section}", flush=True)
        run()
        times[section] = round(time.perf_counter() - t0, 1)
        print(f"== {section}: {times[section]} s", flush=True)
    failed = [r for r in rows if not r.passed]
    print("\n" + text_table(ROW_HEADER, [r.cells() for r in rows]))
    print("\nconfigs: " + "; ".join(f"{c.name}: {c.case.describe()}" for c in plan.checks))
    rows_json = [r.record() for r in rows]
    report = dict(env, plan=name, settings=settings, seconds=times, not_run=skipped, rows=rows_json)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("check.json" if name == "full" else f"check_{name}.json")
    path.write_text(json.dumps(report, indent=1, default=str))
    print(summary(rows, failed, time.perf_counter() - start, path), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
