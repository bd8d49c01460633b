"""The check's rows that need no dilated configuration, and how every row is run and kept.

:func:`emit` runs one check and turns an exception into a failing row (never a fallback);
:func:`reference_rows` and :func:`adapter_rows` are sections 1 and 2 of
:mod:`ringsim.gpu.harness.check`.
"""

from __future__ import annotations

import functools
import math
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ringsim.reference import dense_dilated_attention
from ringsim.tolerance import dtype_name, tolerance

from ..kernels import Kernel, attend, math_attention
from .check_support import (
    Row,
    bounds,
    causal_mask,
    draw,
    is_low_precision,
    max_abs_err,
    naive_dilated,
    plain_attention,
)

if TYPE_CHECKING:
    from .check_support import Plan


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
