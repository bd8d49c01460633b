"""Judging one case, for either kind: errors against the definition on the function's own
inputs, the tolerance, the known variants a wrong result matches, and the line that runs the
case again."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ringsim.cases import Case

from .calls import Outcome
from .diagnosis import forward_matches, gradient_matches
from .evaluate import Definition, errors, tolerances
from .options import Options
from .report import CaseResult

#: Called after each case with (cases done, cases in all).
OnCase = Callable[[int, int], None]


def judge(options: Options, index: int, case: Case, seed: int, repro: str, inputs, dout,
          outcome: Outcome | None, problem: str | None, pad=None) -> CaseResult:  # fmt: skip
    """One case's result: errors against the definition on the function's own (rounded)
    ``inputs``, and, if wrong, the known variants it matches."""
    q, k, v = inputs
    definition = Definition.of(case, q, k, v, dout, pad)
    tol = tolerances(options, case, q, k, v, definition, dout)
    base = CaseResult(index, case, seed, repro, tol.out, grad_tolerance=tol.grad if
                      options.grad else None)  # fmt: skip
    if outcome is None:
        return replace(base, problem=str(problem))
    found = errors(outcome, definition, tol.out)
    result = replace(base, out_error=found.out, lse_error=found.lse, grad_errors=found.grads,
                     rows=found.rows, heads=found.heads)  # fmt: skip
    if result.ok:
        return result
    if found.rows:
        matches = forward_matches(options.kind, case, q, k, v, outcome, definition, tol.out, pad)
    else:
        matches = gradient_matches(case, q, k, v, dout, outcome, tol.grad, pad)
    return replace(result, matches=matches)


def target_name(fn: Callable) -> str | None:
    """``module:qualname`` when ``fn`` can be imported by that name, else None."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname or not qualname:
        return None
    found = sys.modules.get(module)
    for part in qualname.split("."):  # the name must lead back to this very function
        found = getattr(found, part, None)
    return f"{module}:{qualname}" if found is fn else None


def reproduce(target: str | None, options: Options, index: int, world_size: int,
              launcher: str = "mpi") -> str:  # fmt: skip
    """A line that runs this one case again: a command line when the function has an
    importable name, else the Python call (``launcher``: a ring's, ``"mpi"`` or
    ``"torchrun"``)."""
    if target is None:
        kwargs = [f"{k}={v!r}" for k, v in _non_default(options).items()]
        return f"ringsim.conformance.check(fn, {', '.join([*kwargs, f'case={index}'])})"
    args = " ".join([target, *options.argv(), "--case", str(index)])
    if options.kind == "single":
        return f"ringsim conform {args}"
    if launcher == "torchrun":
        return f"torchrun --nproc-per-node {world_size} -m ringsim.conform {args}"
    return f"mpiexec -n {world_size} python -m mpi4py -m ringsim.conform {args}"


def _non_default(options: Options) -> dict[str, Any]:
    defaults = Options()
    return {k: v for k, v in options.__dict__.items()
            if k != "case" and v != getattr(defaults, k)}  # fmt: skip
