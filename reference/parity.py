"""Comparing a result with the dense-mask definition, rank by rank.

A parity report gives the max errors of out and lse against the definition and, when they
exceed the SPEC 9 tolerance, which rank's rows are wrong (global positions), so a corrupted
message or a wrong block is traced to the rank and rows it touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ringsim.cases import Case
from ringsim.tolerance import max_abs_error, tolerance

from .dense import dense_dilated_attention


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
    out, lse, ref_out, ref_lse, *, world_size: int, tol: float, case: str = ""
) -> ParityReport:
    """Compare global ``out (b, n, h, d)`` / ``lse (b, h, n)`` with the definition's."""
    row_err = np.zeros(out.shape[1])
    for n in range(out.shape[1]):
        row_err[n] = max(
            max_abs_error(out[:, n], ref_out[:, n]), max_abs_error(lse[..., n], ref_lse[..., n])
        )
    bad = np.flatnonzero(row_err > tol)
    c = out.shape[1] // world_size
    bad_rows: dict[int, tuple[int, ...]] = {}
    for row in bad:
        bad_rows.setdefault(int(row) // c, ())
        bad_rows[int(row) // c] += (int(row),)
    return ParityReport(
        case, max_abs_error(out, ref_out), max_abs_error(lse, ref_lse), tol, bad_rows
    )


def check_case(case: Case, out, lse, q, k, v) -> ParityReport:
    """Compare a run of ``case`` on inputs q, k, v with the definition."""
    ref_out, ref_lse = dense_dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs()
    )
    return compare(
        out,
        lse,
        ref_out,
        ref_lse,
        world_size=case.world_size,
        tol=tolerance(q.dtype),
        case=case.describe(),
    )
