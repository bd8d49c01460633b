"""``ringsim verify``: every available path and world size against the dense-mask definition.

Paths: the single-process reference, the simulated ring at each world size, and the ring
under ``mpiexec`` (``ringsim.checks.parity``, one PASS/FAIL line with ``max_error=...``).
Each world size runs ``--cases`` random cases (:func:`ringsim.cases.random_case`) and the
hand-picked :func:`ringsim.cases.fixed_cases`, drawn from ``(seed, world_size)``; the
reference runs the cases of the largest world size (the longest sequences).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ringsim.cases import Case, check_cases, fixed_cases
from ringsim.tolerance import tolerance

from .progress import Progress
from .tables import format_table

MPI_CHECK = "ringsim.checks.parity"


@dataclass
class Row:
    """One line of the table: a path at one world size, and what its cases gave."""

    path: str
    world_size: int
    cases: int = 0
    out_error: float = 0.0
    lse_error: float | None = 0.0
    tolerance: float | None = None
    result: str = "PASS"
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.result == "FAIL"

    def cells(self) -> tuple[object, ...]:
        if self.result.startswith("skipped"):
            return (self.path, self.world_size, "-", "-", "-", "-", self.result)
        lse = "-" if self.lse_error is None else f"{self.lse_error:.1e}"
        tol = "-" if self.tolerance is None else f"{self.tolerance:.0e}"
        return (
            self.path,
            self.world_size,
            self.cases,
            f"{self.out_error:.1e}",
            lse,
            tol,
            self.result,
        )


def draw_cases(
    world_size: int, count: int, seed: int, layout: str = "contiguous"
) -> list[tuple[Case, int]]:
    """The fixed cases and ``count`` random ones, each with the seed of its inputs.

    Drawn as :mod:`ringsim.checks.parity` draws them, so the simulated and the mpiexec ring
    of one world size run the same cases on the same inputs.
    """
    cases = check_cases(world_size, count, seed, layout=layout)
    return [(case, seed + i) for i, case in enumerate(cases)]


def run_reference(case: Case, q, k, v):
    from ringsim.reference import dilated_attention

    return dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs(), return_lse=True
    )


def run_simulated(case: Case, q, k, v):
    from ringsim.reference.simulate import run_case

    return run_case(case, q, k, v)[:2]


def check_path(
    row: Row, runner: Callable, cases: list[tuple[Case, int]], dtype: str, bar: Progress
) -> Row:
    """Run ``cases`` on one in-process path and fold their parity reports into ``row``."""
    from ringsim.reference.parity import check_case

    row.tolerance = tolerance(dtype)
    for case, seed in cases:
        q, k, v = case.inputs(seed, np.dtype(dtype))
        out, lse = runner(case, q, k, v)
        report = check_case(case, out, lse, q, k, v)
        row.cases += 1
        row.out_error = max(row.out_error, report.out_error)
        row.lse_error = max(row.lse_error or 0.0, report.lse_error)
        if not report.ok:
            row.failures.append(f"{report.line()} [input seed {seed}]")
        bar.advance()
    row.result = "FAIL" if row.failures else "PASS"
    return row


def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:  # a parent package is missing
        return True


def _number(fields: dict[str, str], key: str) -> float | None:
    try:
        return float(fields[key]) if key in fields else None
    except ValueError:
        return None


#: What the MPI check writes after each case with ``--progress``.
PROGRESS_LINE = re.compile(r"^case \d+ of \d+$")


def ring_path(kind: str, world_size: int, layout: str) -> str:
    """A ring row's name: ``simulated ring P=3``, ``mpiexec ring P=4 zigzag``."""
    return f"{kind} ring P={world_size}" + ("" if layout == "contiguous" else f" {layout}")


def check_mpi(
    world_size: int,
    count: int,
    seed: int,
    dtype: str,
    timeout: float,
    bar: Progress,
    layout: str = "contiguous",
) -> Row:
    """Run the MPI parity check on ``world_size`` processes and read its result line; the
    bar advances by one for each case the check reports done (``--progress``), the rest at
    the end (a failed run stops early).

    The line gives one ``max_error`` over out and lse together: it fills the out column.
    """
    from ringsim.launch import mpiexec_command

    row = Row(
        ring_path("mpiexec", world_size, layout),
        world_size,
        cases=count,
        lse_error=None,
        tolerance=tolerance(dtype),
    )
    args = ["--cases", str(count), "--seed", str(seed), "--dtype", dtype, "--progress",
            "--layout", layout]  # fmt: skip
    command = mpiexec_command(world_size, MPI_CHECK, args)
    units = len(check_cases(world_size, count, seed, layout=layout))
    advanced = 0

    def on_line(line: str) -> None:
        nonlocal advanced
        if PROGRESS_LINE.match(line) and advanced < units:
            advanced += 1
            bar.advance()

    try:
        return _read_result(row, command, timeout, on_line)
    finally:
        bar.advance(units - advanced)  # what a failed or silent run did not report


def _read_result(row: Row, command: list[str], timeout: float, on_line) -> Row:
    """Run the check's ``command`` and fold its result line into ``row``."""
    from ringsim.launch import run_job

    try:
        done = run_job(command, timeout, on_stderr_line=on_line)
    except subprocess.TimeoutExpired:
        row.result = "FAIL"
        row.failures.append(f"timed out after {timeout:g}s: {' '.join(command)}")
        return row
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    if not lines:
        said = [ln for ln in done.stderr.strip().splitlines() if not PROGRESS_LINE.match(ln)]
        tail = (said or ["(no output)"])[-1]
        row.result = "FAIL"
        row.failures.append(f"no PASS/FAIL line, exit code {done.returncode}: {tail}")
        return row
    line = lines[-1]
    fields = dict(re.findall(r"(\w+)=([^\s,;]+)", line))
    error = _number(fields, "max_error")
    row.out_error = float("nan") if error is None else error
    if fields.get("configurations", "").isdigit():
        row.cases = int(fields["configurations"])
    row.result = "PASS" if line.startswith("PASS") and done.returncode == 0 else "FAIL"
    if row.failed:
        row.failures.append(f"{line} (exit code {done.returncode})")
    return row


def mpi_skip_reason() -> str | None:
    from ringsim.launch import mpi_available

    reason = mpi_available()
    if reason is None and _module_missing(MPI_CHECK):
        reason = f"{MPI_CHECK} is not present"
    return reason


def run_verify(args: argparse.Namespace) -> int:
    sizes = tuple(dict.fromkeys(args.world_sizes))  # once each, in the order given
    layout = args.layout
    cases = {p: draw_cases(p, args.cases, args.seed, layout) for p in sizes}
    largest = max(sizes)
    reason = None if args.no_mpi else mpi_skip_reason()
    mpi_sizes = () if args.no_mpi or reason is not None else sizes
    print(
        f"ringsim verify: {args.cases} random + {len(fixed_cases(1))} fixed cases per path, "
        f"seed {args.seed}, {args.dtype}, {layout} layout, against the dense-mask definition"
    )
    mpi_units = sum(len(c) for p, c in cases.items() if p in mpi_sizes)
    total = len(cases[largest]) + sum(len(c) for c in cases.values()) + mpi_units
    rows: list[Row] = []
    with Progress(total, "verify", force=args.progress, summary=True) as bar:
        bar.set_label("reference (1 process)")
        rows.append(
            check_path(
                Row("reference (1 process)", 1), run_reference, cases[largest], args.dtype, bar
            )
        )
        for p in sizes:
            path = ring_path("simulated", p, layout)
            bar.set_label(path)
            rows.append(check_path(Row(path, p), run_simulated, cases[p], args.dtype, bar))
        for p in mpi_sizes:
            bar.set_label(ring_path("mpiexec", p, layout))
            rows.append(check_mpi(p, args.cases, args.seed, args.dtype, args.mpi_timeout, bar,
                                  layout))  # fmt: skip
        bar.set_label("verify")  # the name of the final line or summary
    if reason is not None:
        rows += [
            Row(ring_path("mpiexec", p, layout), p, result=f"skipped: {reason}") for p in sizes
        ]
    headers = (
        "path",
        "world size",
        "cases",
        "max out error",
        "max lse error",
        "tolerance",
        "result",
    )
    print("\n".join(format_table(headers, [r.cells() for r in rows], left=(0, 6))))
    if mpi_sizes:
        print("  (mpiexec rows: the check reports one max error over out and lse together)")
    failed = [r for r in rows if r.failed]
    for row in failed:
        print(f"\n{row.path}: {len(row.failures)} failing")
        print("\n".join(f"  {line}" for line in row.failures[:5]))
    ran = sum(not r.result.startswith("skipped") for r in rows)
    print(
        f"{'FAIL' if failed else 'PASS'}: {ran - len(failed)} of {ran} paths agree with the "
        f"definition" + (f" ({len(rows) - ran} skipped)" if ran < len(rows) else "")
    )
    return 1 if failed else 0
