"""Judging one case: errors against the dense-mask definition, the tolerance of the dtype, and
where the output is wrong (rows and heads).

The tolerance rule (the definition's own, one table): float64 1e-10 and float32 2e-5 in max
abs error, for out, lse and gradients alike; bf16 and fp16 get 2x (outputs) or 3x (gradients)
the error of the plain dense-mask formula evaluated in that dtype on the same inputs, plus
1e-6, so a low-precision function is held to what its dtype can do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ringsim.cases import Case
from ringsim.reference import dense_dilated_attention
from ringsim.reference.parity import reference_gradients
from ringsim.tolerance import abs_errors, low_precision_bound, max_abs_error, tolerance

from .calls import Outcome
from .options import Options


@dataclass(frozen=True)
class Definition:
    """The definition's answer on one case's (rounded, float64) inputs."""

    out: np.ndarray
    lse: np.ndarray
    grads: tuple[np.ndarray, ...] | None = None

    @classmethod
    def of(cls, case: Case, q, k, v, dout=None, pad=None) -> Definition:
        """``pad``: the key padding mask the function was given, or None."""
        out, lse = dense_dilated_attention(
            q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs(),
            key_padding_mask=pad,
        )  # fmt: skip
        grads = None if dout is None else reference_gradients(case, q, k, v, dout, pad)
        return cls(out, lse, grads)


@dataclass(frozen=True)
class Tolerances:
    out: float
    grad: float


def tolerances(options: Options, case: Case, q, k, v, definition: Definition, dout=None):
    """The bounds for this case (module docstring); low precision measures the plain formula
    in that dtype here (torch)."""
    if options.dtype in ("float64", "float32"):
        return Tolerances(tolerance(options.dtype), tolerance(options.dtype))
    import torch

    from ringsim.gpu.harness.check_support import naive_dilated

    dtype = getattr(torch, options.dtype)
    ratio = q.shape[2] // k.shape[2]  # the plain formula reads K/V repeated per query head
    k, v = (np.repeat(x, ratio, axis=2) for x in (k, v))
    tensors = [torch.from_numpy(x).to(dtype).requires_grad_(dout is not None) for x in (q, k, v)]
    out, lse = naive_dilated(
        *tensors, case.segment_lengths, case.dilation_rates, **case.kwargs(), dtype=dtype
    )
    naive = max(
        max_abs_error(out.detach().double().numpy(), definition.out),
        max_abs_error(lse.detach().double().numpy(), definition.lse),
    )
    grad = 0.0
    if dout is not None and definition.grads is not None:
        out.backward(torch.from_numpy(dout).to(dtype))
        found = [t.grad.double().numpy() for t in tensors]
        found[1:] = [g.reshape(*g.shape[:2], -1, ratio, g.shape[3]).sum(3) for g in found[1:]]
        grad = max(max_abs_error(g, want) for g, want in zip(found, definition.grads))
    return Tolerances(low_precision_bound(naive), low_precision_bound(grad, "grad"))


@dataclass(frozen=True)
class Errors:
    """Max abs errors of one outcome; ``rows`` and ``heads`` hold wrong output."""

    out: float
    lse: float | None
    grads: tuple[float, float, float] | None
    rows: tuple[int, ...]
    heads: tuple[int, ...]


def errors(outcome: Outcome, definition: Definition, tol: float) -> Errors:
    """Compare an outcome with the definition; rows and heads whose out (or lse) error
    exceeds ``tol``."""
    out_err = abs_errors(outcome.out, definition.out)
    by_row_head = out_err.max(axis=(0, 3), initial=0.0)  # (n, h)
    lse_error = None
    if outcome.lse is not None:
        diff = abs_errors(outcome.lse, definition.lse)
        lse_error = float(diff.max(initial=0.0))
        by_row_head = np.maximum(by_row_head, diff.max(axis=0, initial=0.0).T)
    grads = None
    if outcome.grads is not None and definition.grads is not None:
        grads = tuple(max_abs_error(g, w) for g, w in zip(outcome.grads, definition.grads))
    wrong = by_row_head > tol
    return Errors(
        float(out_err.max(initial=0.0)),
        lse_error,
        grads,  # type: ignore[arg-type]
        tuple(int(r) for r in np.flatnonzero(wrong.any(axis=1))),
        tuple(int(h) for h in np.flatnonzero(wrong.any(axis=0))),
    )


def ranges(rows: tuple[int, ...], limit: int = 3) -> str:
    """``(3, 4, 5, 9, 12)`` -> ``'3-5,9,12'``; past ``limit`` ranges, ``',...'``."""
    parts: list[str] = []
    start = None
    for i, r in enumerate(rows):
        start = r if start is None else start
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            parts.append(f"{start}-{r}" if r != start else f"{r}")
            start = None
    return ",".join(parts[:limit]) + (",..." if len(parts) > limit else "")
