"""The gradient section of ``python -m ringsim.gpu.harness.check``: dq, dk, dv on the GPU against
float64 (spec §9, the 3x rule for bf16/fp16).

Each row backpropagates ``<dout, out>`` (dout unit-normal, seeded) through
:func:`ringsim.gpu.dilated_attention` with one kernel, or through the simulated ring, and
compares dq, dk, dv with the float64 reference: torch autograd of the plain formula of spec
§3-4 evaluated segment by segment (:func:`~ringsim.gpu.harness.check_support.naive_dilated` with
``dense=False``), independent of the package's backward. One row per configuration first
holds the float64 math kernel's backward to that reference. The low-precision bound is 3x
the error of the same autograd formula evaluated in the dtype under test, plus 1e-6.
In the table, ``err out`` is dq's error and ``err lse`` the larger of dk's and dv's.
"""

from __future__ import annotations

import functools

import torch

from ringsim.tolerance import dtype_name, tolerance

from ..executor import dilated_attention
from ..kernels import Kernel
from .check_support import Row, bounds, draw, is_low_precision, max_abs_err, naive_dilated


def gradients(run, x, dout) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv of ``<dout, run(q, k, v)[0]>``."""
    leaves = [t.detach().clone().requires_grad_() for t in x]
    out = run(*leaves)[0]
    return torch.autograd.grad(out, leaves, dout.to(out.dtype))


def errors(got, want) -> tuple[float, float]:
    """(dq error, max of dk and dv errors)."""
    e = [max_abs_err(g, w) for g, w in zip(got, want)]
    return e[0], max(e[1], e[2])


def grad_rows(plan, able: dict, rows: list[Row], ring, emit) -> None:
    """Gradient rows for the plan's ``grad_checks`` (see
    :func:`ringsim.gpu.harness.check_rows.emit`)."""
    for index, check in enumerate(c for c in plan.checks if c.grads):
        case = check.case
        args, kw = (case.segment_lengths, case.dilation_rates), case.kwargs()
        naive = functools.partial(naive_dilated, segment_lengths=args[0], dilation_rates=args[1])
        print(f"[{check.name} grad] {case.describe()}", flush=True)
        for t, dtype in enumerate(plan.dtypes):
            x = draw(case.shape, dtype, 30_000 + 100 * index + t, plan.device)
            dout = draw(case.shape, torch.float64, 40_000 + 100 * index + t, plan.device)[0]
            x64 = [a.double() for a in x]
            ref = gradients(functools.partial(naive, **kw, dense=False), x64, dout)
            if t == 0:
                run = functools.partial(_single, args, kw, Kernel.MATH)
                where = ("grad ref", "math", "float64", 1, case.seq_len, check.name)
                tol = (tolerance("float64"),) * 2
                grads = functools.partial(gradients, run, x64, dout)
                emit(rows, where, grads, ref, tol, "autograd f64", measure=errors)
            base = (0.0, 0.0)
            if is_low_precision(dtype):
                base = errors(gradients(functools.partial(naive, **kw, dense=False), x, dout), ref)
            bound, name = bounds(dtype, *base, kind="grad"), dtype_name(dtype)
            kernels = [kn for kn in Kernel if kn is not Kernel.FLEX and not able[(kn, dtype)]]
            for kernel in kernels:
                run = functools.partial(_single, args, kw, kernel)
                where = ("grad dilated", kernel.value, name, 1, case.seq_len, check.name)
                grads = functools.partial(gradients, run, x, dout)
                emit(rows, where, grads, ref, bound, "autograd f64", measure=errors)
            for p in check.rings if ring else ():
                run = functools.partial(_ring, ring, args, kw, p)
                where = ("grad ring", "auto", name, p, case.seq_len, check.name)
                grads = functools.partial(gradients, run, x, dout)
                emit(rows, where, grads, ref, bound, "autograd f64", measure=errors)
            del ref, x, x64


def _single(args, kw, kernel, q, k, v):
    return (dilated_attention(q, k, v, *args, **kw, kernel=kernel),)


def _ring(ring, args, kw, p, q, k, v):
    return (ring(q, k, v, *args, world_size=p, **kw),)
