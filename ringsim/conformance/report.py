"""A conformance run's results: one row per case, the diagnosis, the verdict, and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from ringsim.cases import Case
from ringsim.cli.tables import text_table

from .diagnosis import Diagnosis, summarise
from .evaluate import ranges
from .options import Options


@dataclass(frozen=True)
class CaseResult:
    """One case: its errors against the definition and tolerance, or the problem that kept
    it from being compared (an exception, a wrong shape or dtype, a time-out)."""

    index: int
    case: Case
    seed: int
    repro: str
    tolerance: float
    out_error: float | None = None
    lse_error: float | None = None
    grad_errors: tuple[float, float, float] | None = None
    grad_tolerance: float | None = None
    problem: str | None = None
    rows: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    matches: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        if self.problem is not None or self.out_error is None:
            return False
        within = [self.out_error <= self.tolerance]
        if self.lse_error is not None:
            within.append(self.lse_error <= self.tolerance)
        if self.grad_errors is not None and self.grad_tolerance is not None:
            within.append(max(self.grad_errors) <= self.grad_tolerance)
        return all(within)

    @property
    def compared(self) -> bool:
        """Whether it returned something to compare (a failure a diagnosis can explain)."""
        return self.problem is None and self.out_error is not None

    def where(self) -> str:
        """The first wrong rows and heads, or the problem."""
        if self.problem is not None:
            return self.problem
        if self.ok:
            return ""
        text = f"rows {ranges(self.rows)} heads {ranges(self.heads, 6)}" if self.rows else ""
        grads, tol = self.grad_errors, self.grad_tolerance
        if grads is not None and tol is not None and max(grads) > tol:
            text = (text + "; " if text else "") + "gradients"
        return text


#: Reproduce lines printed under the table (the JSON report has every case's).
SHOWN = 5


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


@dataclass
class Report:
    """Every case's result for one function; ``ok`` only if every case passed."""

    target: str
    options: Options
    world_size: int
    results: list[CaseResult] = field(default_factory=list)
    not_run: int = 0  # cases left after one that hung

    @property
    def ok(self) -> bool:
        return bool(self.results) and self.not_run == 0 and all(r.ok for r in self.results)

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.ok]

    @property
    def diagnosis(self) -> Diagnosis:
        return summarise([r.matches for r in self.failed if r.compared])

    def table(self) -> str:
        grad = self.options.grad
        headers = ["case", "configuration", "out err", "lse err"]
        headers += ["grad err"] if grad else []
        headers += ["tolerance (out / grad)" if grad else "tolerance", "result",
                    "first wrong rows / heads"]  # fmt: skip
        rows = []
        for r in self.results:
            row = [r.index, r.case.describe(), _num(r.out_error), _num(r.lse_error)]
            row += [_num(None if r.grad_errors is None else max(r.grad_errors))] if grad else []
            tol = f"{r.tolerance:.0e}"
            if grad and r.grad_tolerance is not None and r.grad_tolerance != r.tolerance:
                tol += f" / {r.grad_tolerance:.0e}"
            row += [tol, "PASS" if r.ok else "FAIL", r.where()]
            rows.append(row)
        return text_table(headers, rows)

    def line(self) -> str:
        """The last line: ``PASS conform ...`` or ``FAIL conform ...``."""
        errors = [r.out_error for r in self.results if r.out_error is not None]
        errors += [r.lse_error for r in self.results if r.lse_error is not None]
        worst = max(errors, default=math.nan)
        not_run = f" not_run={self.not_run}" if self.not_run else ""
        if self.options.grad:
            grads = [max(r.grad_errors) for r in self.results if r.grad_errors is not None]
            not_run += f" max_grad_error={max(grads, default=math.nan):.1e}"
        return (
            f"{'PASS' if self.ok else 'FAIL'} conform {self.target} kind={self.options.kind} "
            f"world_size={self.world_size} cases={len(self.results)} "
            f"failed={len(self.failed)}{not_run} max_error={worst:.1e} "
            f"dtype={self.options.dtype} backend={self.options.backend}"
        )

    def text(self) -> str:
        """The table, a reproduce line per failing case, the diagnosis, the last line."""
        parts = [self.table()]
        failed = self.failed
        if failed:
            parts.append("reproduce a failing case:")
            parts += [f"  {r.repro}" for r in failed[:SHOWN]]
            if len(failed) > SHOWN:
                more = len(failed) - SHOWN
                parts.append(f"  ... and {more} more: the same with the case's index (the "
                             "table's first column); the JSON report has each")  # fmt: skip
            parts.append(self.diagnosis.line())
        if self.not_run:
            parts.append(f"{self.not_run} case(s) not run: a case did not return, and the "
                         "thread running it cannot be stopped")  # fmt: skip
        parts.append(self.line())
        return "\n".join(parts)

    def to_json(self) -> dict:
        """Everything in the report, as JSON-ready data."""
        diagnosis = self.diagnosis
        return {
            "target": self.target,
            "ok": self.ok,
            "options": asdict(self.options),
            "world_size": self.world_size,
            "not_run": self.not_run,
            "diagnosis": {**asdict(diagnosis), "line": diagnosis.line()},
            "cases": [self._case_json(r) for r in self.results],
            "line": self.line(),
        }

    @staticmethod
    def _case_json(r: CaseResult) -> dict:
        case = {**asdict(r.case), "describe": r.case.describe()}
        return {**asdict(r), "case": case, "ok": r.ok}

    def dumps(self) -> str:
        """:meth:`to_json` as strict JSON text (infinite or NaN errors as strings)."""
        return json.dumps(_strict(self.to_json()), indent=1)


def _strict(x: object) -> object:
    """``inf`` and ``nan`` as the strings ``"inf"``, ``"nan"``; containers recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x
