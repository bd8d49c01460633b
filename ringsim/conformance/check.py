"""Checking a user's dilated attention against the definition: :func:`check`, for one device
(the ring's ranks are in :mod:`ringsim.conformance.shard`), and the judgement of one case that
both share."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .calls import Backend, HungCase, attempt, case_inputs, run
from .judge import OnCase, judge, reproduce, target_name
from .options import Options, inputs_seed, select_cases
from .report import Report


def check(fn: Callable, *, target: str | None = None, on_case: OnCase | None = None,
          **options: Any) -> Report:  # fmt: skip
    """Check ``fn`` against the dense-mask definition on the conformance cases.

    Args:
        fn: ``fn(q, k, v, segment_lengths, dilation_rates, **kwargs)`` returning ``out`` or
            ``(out, lse)``; ``q, k, v`` are ``(b, n, h, d)`` (``layout="bhnd"``:
            ``(b, h, n, d)``) and lse is ``(b, h, n)``. The keyword arguments it gets follow
            from the options (:class:`~ringsim.conformance.options.Options`).
        target: the name shown in the report and the reproduce lines (default: the
            function's ``module:qualname`` where it can be imported).
        on_case: progress, called after each case.
        **options: the fields of :class:`~ringsim.conformance.options.Options`; with
            ``kind="shard"`` every rank of an ``mpiexec`` or ``torchrun`` job calls this.
    Returns:
        The :class:`~ringsim.conformance.report.Report` (every rank gets rank 0's).
    Raises:
        ValueError: an option is invalid (before ``fn`` is called).
    """
    opts = Options(**options)
    name = target or target_name(fn)
    if opts.kind == "shard":
        from .shard import check_shard

        return check_shard(fn, opts, name, on_case)
    backend = Backend(opts)
    report = Report(name or "<function>", opts, world_size=1)
    selected = select_cases(opts)
    for done, (index, case) in enumerate(selected, start=1):
        seed = inputs_seed(opts, index, case)
        x = case_inputs(backend, index, case, seed)
        work = functools.partial(run, fn, backend, case, x.user, x.user_dout, x.rounded, x.mask)
        outcome, problem = attempt(work, opts.timeout)
        repro = reproduce(name, opts, index, 1)
        report.results.append(judge(opts, index, case, seed, repro, x.rounded, x.dout, outcome,
                                    problem, x.pad))  # fmt: skip
        if on_case is not None:
            on_case(done, len(selected))
        if isinstance(problem, HungCase):
            report.not_run = len(selected) - done
            break
    return report


def assert_conforms(fn: Callable, **options: Any) -> Report:
    """:func:`check` for a test suite: raises ``AssertionError`` with the report's text
    (table, reproduce lines, diagnosis) unless every case passes; returns the report."""
    report = check(fn, **options)
    if not report.ok:
        raise AssertionError("\n" + report.text())
    return report
