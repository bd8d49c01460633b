"""The key padding and grouped-query section of ``python -m ringsim.gpu.harness.check``.

On the checks marked ``masks``, each dtype:

- **padding**: :func:`ringsim.gpu.dilated_attention` with a bool ``key_padding_mask`` (a
  quarter of the keys at random, and the second half of the first batch element: rows
  with no key) with every kernel that takes a mask, and the simulated ring at the check's
  world sizes;
- **gqa**: k and v with a quarter of q's heads (one K/V head for fewer than four), every
  kernel;

forward (out, lse) and gradients (dq; dk and dv), against the float64 segment-wise formula
with the same mask and heads (:func:`~ringsim.gpu.harness.check_support.naive_dilated`), which
one reference row holds to the NumPy definition on small cases first. Bounds as the other
sections (spec §9: 2x, for gradients 3x, the plain formula's error in bf16/fp16).
"""

from __future__ import annotations

import functools

import torch

from ringsim.cases import grouped_query
from ringsim.reference import dense_dilated_attention
from ringsim.tolerance import dtype_name, tolerance

from ..executor import dilated_attention
from ..kernels import Kernel, capability
from .check_grad import errors, gradients
from .check_support import bounds, draw, is_low_precision, max_abs_err, naive_dilated


def padding(shape, seed: int, device) -> torch.Tensor:
    """``(b, n)`` bool: a quarter of the keys, and the second half of batch element 0."""
    b, n = shape[:2]
    gen = torch.Generator(device=device).manual_seed(seed)
    mask = torch.rand(b, n, generator=gen, device=device) < 0.25
    mask[0, n // 2 :] = True
    return mask


def oracle_row(plan, rows, emit) -> None:
    """The float64 segment-wise formula with padding and fewer K/V heads against the NumPy
    definition, worst of the small cases."""
    cases = grouped_query(list(plan.oracle_cases), seed=3)
    worst = None
    for i, case in enumerate(cases):
        x = case.inputs(seed=i)
        pad = padding(x[0].shape, i, "cpu").numpy()
        ref = dense_dilated_attention(*x, case.segment_lengths, case.dilation_rates,
                                      **case.kwargs(), key_padding_mask=pad)  # fmt: skip
        tx = [torch.from_numpy(a).to(plan.device) for a in (*x, pad)]
        got = naive_dilated(*tx[:3], case.segment_lengths, case.dilation_rates, **case.kwargs(),
                            dense=False, key_padding_mask=tx[3])  # fmt: skip
        ref = tuple(torch.from_numpy(r) for r in ref)
        err = max(max_abs_err(g, r) for g, r in zip(got, ref))
        if worst is None or err >= worst[0]:
            worst = (err, case, got, ref)
    _, case, got, ref = worst
    where = ("reference", "segment-wise", "float64", 1, case.seq_len, "padding+gqa")
    note = f"worst of {len(cases)} cases: {case.describe()}"
    emit(rows, where, lambda: got, ref, (tolerance("float64"),) * 2, "NumPy dense", note)


def mask_rows(plan, rows, ring, emit) -> None:
    """Forward and gradient rows of padding and grouped-query attention (module docstring)."""
    oracle_row(plan, rows, emit)
    for index, check in enumerate(c for c in plan.checks if c.masks):
        case = check.case
        args, kw = (case.segment_lengths, case.dilation_rates), case.kwargs()
        naive = functools.partial(naive_dilated, segment_lengths=args[0],
                                  dilation_rates=args[1], **kw, dense=False)  # fmt: skip
        kv_heads = case.num_heads // 4 if case.num_heads % 4 == 0 else 1
        print(f"[{check.name} masks] {case.describe()}", flush=True)
        for t, dtype in enumerate(plan.dtypes):
            seed = 50_000 + 100 * index + t
            x = draw(case.shape, dtype, seed, plan.device)
            dout = draw(case.shape, torch.float64, seed + 50, plan.device)[0]
            pad = padding(case.shape, seed, plan.device)
            fewer = (x[0], x[1][:, :, :kv_heads], x[2][:, :, :kv_heads])
            for label, inputs, mask in (("padding", x, pad), ("gqa", fewer, None)):
                _rows(rows, emit, check, dtype, label, inputs, mask, naive, dout, ring)


def _rows(rows, emit, check, dtype, label, x, mask, naive, dout, ring) -> None:
    case, name = check.case, dtype_name(dtype)
    args, kw = (case.segment_lengths, case.dilation_rates), case.kwargs()
    masked = functools.partial(naive, key_padding_mask=mask)
    x64 = [a.double() for a in x]
    ref, ref_grads = masked(*x64), gradients(masked, x64, dout)
    base, grad_base = (0.0, 0.0), (0.0, 0.0)
    if is_low_precision(dtype):
        low = masked(*x)
        base = (max_abs_err(low[0], ref[0]), max_abs_err(low[1], ref[1]))
        grad_base = errors(gradients(masked, x, dout), ref_grads)
    bound, grad_bound = bounds(dtype, *base), bounds(dtype, *grad_base, kind="grad")
    runs = [
        (kernel.value, 1, functools.partial(dilated_attention, kernel=kernel))
        for kernel in Kernel
        if kernel is not Kernel.FLEX and capability(kernel, x[0], masked=mask is not None) is None
    ]
    if mask is not None and ring is not None:
        runs += [("auto", p, functools.partial(ring, world_size=p)) for p in check.rings]
    for kernel, p, fn in runs:
        path = label if p == 1 else f"{label} ring"

        def run(*t, fn=fn):
            return fn(*t, *args, **kw, key_padding_mask=mask, return_lse=True)

        where = (path, kernel, name, p, case.seq_len, check.name)
        emit(rows, where, functools.partial(run, *x), ref, bound, "segment-wise f64")
        grads = functools.partial(gradients, run, x, dout)
        where = (f"grad {path}", kernel, name, p, case.seq_len, check.name)
        emit(rows, where, grads, ref_grads, grad_bound, "autograd f64", measure=errors)
