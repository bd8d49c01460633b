"""Comparing a result with the dense-mask definition, rank by rank.

A parity report gives the max errors of out and lse against the definition and, when they
exceed the spec §9 tolerance, which rank's rows are wrong (global positions), so a corrupted
message or a wrong block is traced to the rank and rows it touched. A gradient report gives
the max errors of dq, dk and dv against the float64 reference backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ringsim.cases import Case
from ringsim.layout import chunk_length, chunk_owner
from ringsim.tolerance import max_abs_error, tolerance

from .backward import dilated_attention_backward
from .dense import dense_dilated_attention
from .dilated import dilated_attention


@dataclass(frozen=True)
class ParityReport:
    """The outcome of one comparison; ``bad_rows[rank]`` are wrong global positions."""

    case: str
    out_error: float
    lse_error: float
    tolerance: float
    bad_rows: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.out_error <= self.tolerance and self.lse_error <= self.tolerance

    def line(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        text = (
            f"{verdict} {self.case}: out {self.out_error:.1e} lse {self.lse_error:.1e} "
            f"(tolerance {self.tolerance:.0e})"
        )
        for rank, rows in sorted(self.bad_rows.items()):
            text += f"; rank {rank} rows {_ranges(rows)}"
        return text


def _ranges(rows: tuple[int, ...]) -> str:
    """``(3, 4, 5, 9)`` -> ``'3-5,9'``."""
    parts, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            parts.append(f"{start}-{r}" if r != start else f"{r}")
            start = None
    return ",".join(parts)


def compare(
    out,
    lse,
    ref_out,
    ref_lse,
    *,
    world_size: int,
    tol: float,
    case: str = "",
    layout: str = "contiguous",
) -> ParityReport:
    """Compare global ``out (b, n, h, d)`` / ``lse (b, h, n)`` with the definition's; wrong
    rows are reported by the rank that holds them in ``layout``."""
    row_err = np.zeros(out.shape[1])
    for n in range(out.shape[1]):
        row_err[n] = max(
            max_abs_error(out[:, n], ref_out[:, n]), max_abs_error(lse[..., n], ref_lse[..., n])
        )
    bad = np.flatnonzero(row_err > tol)
    s = chunk_length(layout, out.shape[1], world_size)
    bad_rows: dict[int, tuple[int, ...]] = {}
    for row in bad:
        rank = chunk_owner(layout, int(row) // s, world_size)
        bad_rows[rank] = (*bad_rows.get(rank, ()), int(row))
    bad_rows = dict(sorted(bad_rows.items()))
    return ParityReport(
        case, max_abs_error(out, ref_out), max_abs_error(lse, ref_lse), tol, bad_rows
    )


def check_case(case: Case, out, lse, q, k, v, on_head=None, key_padding_mask=None) -> ParityReport:
    """Compare a run of ``case`` on inputs q, k, v (and the key padding it ran with) with
    the definition (``on_head``: as :func:`~ringsim.reference.dense_dilated_attention`
    takes it, for a progress bar)."""
    ref_out, ref_lse = dense_dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs(), on_head=on_head,
        key_padding_mask=key_padding_mask,
    )  # fmt: skip
    return compare(
        out,
        lse,
        ref_out,
        ref_lse,
        world_size=case.world_size,
        tol=tolerance(q.dtype),
        case=case.describe(),
        layout=case.layout,
    )


def function_failures(dilated_fn, cases, dtype=np.float64) -> list[str]:
    """Check a dilated-attention function against the definition on every case; [] is a pass.

    ``dilated_fn(q, k, v, segment_lengths, dilation_rates, is_causal=, mode=, softmax_scale=,
    return_lse=True)`` (the signature of :func:`~ringsim.reference.dilated_attention`) runs on
    each case's own unit-normal inputs in ``dtype`` and must return out ``(b, n, h, d)`` and
    lse ``(b, h, n)`` in that dtype, within spec §9's tolerance of the definition evaluated on
    the same (rounded) inputs. One line per problem: an exception it raised, a wrong shape
    or dtype, or the failed :class:`ParityReport`.
    """
    dtype = np.dtype(dtype)  # tolerance() wants a dtype (or its name), not the scalar type
    failures: list[str] = []
    for case in cases:
        q, k, v = case.inputs(dtype=dtype)
        try:
            out, lse = dilated_fn(
                q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs(),
                return_lse=True,
            )  # fmt: skip
        except Exception as err:  # a crash is a failure too; report it with the case
            failures.append(f"{case.describe()}: raised {type(err).__name__}: {err}")
            continue
        b, n, h, _ = q.shape
        problems = [
            f"{case.describe()}: {name} {what} {got} != {want}"
            for name, x, shape in (("out", out, q.shape), ("lse", lse, (b, h, n)))
            for what, got, want in (
                ("shape", np.shape(x), shape),
                ("dtype", np.asarray(x).dtype, dtype),
            )
            if got != want
        ]
        if problems:
            failures += problems
            continue
        report = check_case(replace(case, world_size=1), out, lse, q, k, v)
        if not report.ok:
            failures.append(report.line())
    return failures


@dataclass(frozen=True)
class GradReport:
    """Max errors of dq, dk, dv against the float64 reference backward."""

    case: str
    errors: tuple[float, float, float]
    tolerance: float

    @property
    def ok(self) -> bool:
        return max(self.errors) <= self.tolerance

    def line(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        dq, dk, dv = self.errors
        return (
            f"{verdict} {self.case}: dq {dq:.1e} dk {dk:.1e} dv {dv:.1e} "
            f"(tolerance {self.tolerance:.0e})"
        )


def reference_gradients(case: Case, q, k, v, dout, key_padding_mask=None) -> tuple[np.ndarray, ...]:
    """dq, dk, dv of ``case`` in float64 (:func:`dilated_attention_backward`, itself tested
    against torch autograd of the dense-mask formula and against finite differences)."""
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    kwargs = {**case.kwargs(), "key_padding_mask": key_padding_mask}
    args = (case.segment_lengths, case.dilation_rates)
    out, lse = dilated_attention(q, k, v, *args, **kwargs, return_lse=True)
    return dilated_attention_backward(q, k, v, out, lse, dout, *args, **kwargs)


def check_gradients(case: Case, grads, q, k, v, dout, tol: float | None = None,
                    key_padding_mask=None) -> GradReport:  # fmt: skip
    """Compare ``grads = (dq, dk, dv)`` of ``case`` with the float64 reference backward;
    ``tol`` defaults to spec §9's bound for q's dtype."""
    want = reference_gradients(case, q, k, v, dout, key_padding_mask)
    errors = tuple(max_abs_error(g, w) for g, w in zip(grads, want))
    tol = tolerance(np.asarray(q).dtype) if tol is None else tol
    return GradReport(case.describe(), errors, tol)  # type: ignore[arg-type]
