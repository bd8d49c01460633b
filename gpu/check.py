"""Parity of the torch backend on a GPU in bf16, fp16 and fp32 against float64 (SPEC 9).

    python -m ringsim.gpu.check [--quick] [--smoke] [--no-flex] [--out DIR]

Sections, each row one check on fresh seeded unit-normal inputs (never zeros):

1. reference: the float64 references themselves. The torch dense-mask formula in float64
   (:func:`~ringsim.gpu.check_support.naive_dilated`) against the NumPy oracle; and, on every
   configuration within dense reach, the float64 math path and the float64 segment-wise
   formula against it: they stand in for the definition beyond dense reach.
2. adapter: every kernel adapter's ``attend()`` (flash, cudnn, efficient, flex, math, ...)
   on random ``(B, H, M, D)`` blocks, causal and not, against the float64 math path; out and
   lse (a FlexAttention lse off by a factor ln 2 is reported as such).
3. dilated / ring: :func:`ringsim.gpu.dilated_attention` with every kernel that can run, and
   the simulated ring (P = 2, 4, 8) on one device, on aligned and ragged configurations.
4. gradients: dq, dk, dv of the same paths on some of those configurations
   (:mod:`ringsim.gpu.check_grad`, SPEC 9's 3x rule).

Reference: the dense-mask definition in float64 up to ``dense_max`` (8192) rows, beyond it
the float64 math path (``kernel="math"`` on float64 inputs), on the inputs already rounded to
the dtype under test. Bounds (SPEC 9): fp32 2e-5 max abs; bf16/fp16 2x the error of the plain
formula evaluated in that dtype on the same inputs, plus 1e-6, for out and for lse. Beyond
dense reach that baseline is the same formula evaluated segment by segment in that dtype
(identical arithmetic minus the exact zeros of masked keys). TF32 is switched off.

Exit status: 0 if every row passes, 1 if any fails, 2 without CUDA (use ``--smoke`` on CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ringsim.cases import Case, fixed_cases, random_case
from ringsim.reference import dense_dilated_attention
from ringsim.tolerance import dtype_name, tolerance

from .check_grad import grad_rows
from .check_support import (
    ROW_HEADER,
    MaskCache,
    Row,
    bounds,
    causal_mask,
    draw,
    environment,
    format_table,
    is_low_precision,
    max_abs_err,
    naive_dilated,
    plain_attention,
    setup_device,
    summary,
)
from .dilated import dilated_attention
from .kernels import Kernel, attend, capability, choose_kernel, math_attention


@dataclass(frozen=True)
class Check:
    """A configuration and what runs on it besides every single-device kernel."""

    name: str
    case: Case
    flex_dtypes: tuple[str, ...] = ()  # FlexAttention compiles per shape and dtype: few
    rings: tuple[int, ...] = ()  # simulated ring world sizes
    ring_kernels: bool = False  # ring with every kernel in the first dtype, not only auto
    grads: bool = False  # also check dq, dk, dv (:mod:`ringsim.gpu.check_grad`)


@dataclass(frozen=True)
class Plan:
    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]
    adapter_shapes: tuple[tuple[int, int, int, int], ...]
    checks: tuple[Check, ...]
    oracle_cases: tuple[Case, ...]
    dense_max: int
    flex_dtypes: tuple[str, ...] = ()  # adapter checks of FlexAttention (a compile each)


def _case(n, segs, rates, causal=False, mode="longnet", b=1, h=8, d=64, scale=None) -> Case:
    return Case(b, n, h, d, segs, rates, causal, mode, softmax_scale=scale)


def make_plan(name: str) -> Plan:
    """``smoke`` (CPU, tiny), ``quick`` (up to 8K) or ``full`` (up to 64K)."""
    rng = np.random.default_rng(5)
    oracle = fixed_cases(1) + fixed_cases(4) + [random_case(rng, 1, 40) for _ in range(8)]
    low, fp32 = ("bfloat16",), ("float32",)
    if name == "smoke":
        checks = (
            Check("A", _case(96, (24, 48, 96), (1, 2, 4), h=4, d=16), (), (2, 4, 8), True, True),
            Check(
                "B",
                _case(90, (20, 50, 130), (1, 3, 5), True, "grouped", h=4, d=16),
                (),
                (3,),
                grads=True,
            ),
            Check("C", _case(200, (40, 100), (2, 3), True, h=4, d=16), (), (4,)),
        )
        dtypes = (torch.bfloat16, torch.float16, torch.float32)
        return Plan(name, "cpu", dtypes, ((2, 3, 33, 16),), checks, tuple(oracle[:6]), 128)
    every = ("bfloat16", "float16", "float32")
    checks = (
        Check(
            "A", _case(4096, (1024, 2048, 4096), (1, 2, 4), b=2), low + fp32, (2, 4, 8), grads=True
        ),
        Check("B", _case(4096, (1024, 2048, 4096), (1, 2, 4), True), (), (2, 4, 8), True, True),
        Check(
            "C",
            _case(3000, (700, 1800, 5000), (1, 3, 5), True, "grouped"),
            low,
            (2, 4, 8),
            grads=True,
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


def emit(
    rows: list[Row], where: tuple, run: Callable, ref, bound, ref_name: str, note="", measure=None
):
    """Run one check ``run() -> (out, lse)``, measure it against ``ref``, print and keep the
    row; returns ``(row, (out, lse) or None)``. ``where = (path, kernel, dtype, P, n, config)``;
    ``measure(got, ref) -> (err, err)`` replaces the (out, lse) errors (gradient rows).

    An exception is not a fallback: it becomes a failing row (error inf, its message in the
    note, the traceback printed) and the check goes on to the other rows.
    """
    try:
        got = run()
    except Exception as error:
        traceback.print_exc()
        got, note = None, f"{type(error).__name__}: {error}".splitlines()[0][:200]
    if got is None:
        err = (math.inf,) * 2
    else:
        err = measure(got, ref) if measure else tuple(map(max_abs_err, got, ref))
    row = Row(*where, *err, *bound, ref_name, note)
    rows.append(row)
    print("  " + "  ".join(row.cells()) + (f"  {row.note}" if row.note else ""), flush=True)
    return row, got


def reference_rows(plan: Plan, rows: list[Row]) -> None:
    """The torch float64 dense formula against the NumPy oracle on small cases (worst row)."""
    worst = None
    for case in plan.oracle_cases:
        x = case.inputs()
        ref = dense_dilated_attention(
            *x, case.segment_lengths, case.dilation_rates, **case.kwargs()
        )
        tx = [torch.from_numpy(a).to(plan.device) for a in x]
        got = naive_dilated(*tx, case.segment_lengths, case.dilation_rates, **case.kwargs())
        err = max(max_abs_err(g, torch.from_numpy(r)) for g, r in zip(got, ref))
        if worst is None or err >= worst[0]:
            worst = (err, case, got, tuple(torch.from_numpy(r) for r in ref))
    _, case, got, ref = worst
    where = ("reference", "torch-dense", "float64", 1, case.seq_len, "oracle")
    note = f"worst of {len(plan.oracle_cases)} cases: {case.describe()}"
    emit(rows, where, lambda: got, ref, (tolerance("float64"),) * 2, "NumPy dense", note)


def adapter_rows(plan: Plan, able: dict, rows: list[Row]) -> None:
    """Each adapter's ``attend()`` on random blocks against the float64 math path."""
    seed = 20_000
    for kernel, dtype in ((kn, dt) for kn in Kernel for dt in plan.dtypes):
        flex = kernel is Kernel.FLEX
        if able[(kernel, dtype)] or (flex and dtype_name(dtype) not in plan.flex_dtypes):
            continue
        shapes = plan.adapter_shapes[:1] if flex else plan.adapter_shapes
        for shape, causal in ((s, c) for s in shapes for c in (False, True)):
            seed += 1
            q, k, v = draw(shape, dtype, seed, plan.device)
            scale = 1.25 / math.sqrt(shape[-1])
            ref = math_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale)
            base = (0.0, 0.0)
            if is_low_precision(dtype):
                mask = causal_mask(shape[2], q.device) if causal else None
                naive = plain_attention(q, k, v, mask, scale)
                base = (max_abs_err(naive[0], ref[0]), max_abs_err(naive[1], ref[1]))
            config = "x".join(map(str, shape)) + (" causal" if causal else " full")
            where = ("adapter", kernel.value, dtype_name(dtype), 1, shape[2], config)
            run = functools.partial(attend, q, k, v, causal=causal, scale=scale, kernel=kernel)
            row, got = emit(rows, where, run, ref, bounds(dtype, *base), "math f64")
            if got is not None and row.err_lse > row.bound_lse:
                row.note = lse_base_note(got[1], ref[1], row.bound_lse)


def lse_base_note(lse: torch.Tensor, ref: torch.Tensor, bound: float) -> str:
    """Say loudly when a failing lse is the reference scaled by ln 2 or 1/ln 2."""
    for factor, what in ((math.log(2), "lse * ln2"), (1 / math.log(2), "lse / ln2")):
        if max_abs_err(lse.double() * factor, ref) <= max(bound, 1e-3 * float(ref.abs().max())):
            msg = f"LSE BASE MISMATCH: {what} matches the natural-log reference"
            print(f"!!! {msg}", flush=True)
            return msg
    return ""


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
    parser = argparse.ArgumentParser("python -m ringsim.gpu.check", description=title)
    parser.add_argument("--quick", action="store_true", help="up to 8K, fewer compiles (~3 min)")
    parser.add_argument("--smoke", action="store_true", help="tiny, on the CPU: tests the script")
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="JSON folder")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles)")
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = make_plan(name)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("ringsim.gpu.check: no CUDA device; run with --smoke on a CPU", file=sys.stderr)
        return 2
    settings = setup_device() if plan.device == "cuda" else {}
    env = environment(torch.device(plan.device))
    where = f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}"
    print(f"ringsim.gpu.check ({name}) on {where} {settings}", flush=True)
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
    ):
        t0 = time.perf_counter()
        print(f"== {section}", flush=True)
        run()
        times[section] = round(time.perf_counter() - t0, 1)
        print(f"== {section}: {times[section]} s", flush=True)
    failed = [r for r in rows if not r.passed]
    print("\n" + format_table(ROW_HEADER, [r.cells() for r in rows]))
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
