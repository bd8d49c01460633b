"""Check your own dilated (ring) attention against the definition: the conformance suite.

    from ringsim.conformance import check, assert_conforms

    report = check(my_attention, returns="out,lse", modes=("longnet", "grouped"))
    print(report.text())        # a table, reproduce lines, a diagnosis, PASS/FAIL
    assert_conforms(my_attention)  # in a test suite

The same from the shell: ``ringsim conform MODULE:FUNCTION`` (one device) or
``mpiexec -n P python -m mpi4py -m ringsim.conform MODULE:FUNCTION --kind shard`` (the ranks
of a ring; ``torchrun`` for torch.distributed). The mutant catalogue the diagnosis uses is in
:mod:`ringsim.conformance.mutants`, :mod:`~ringsim.conformance.ring_mutants` and
:mod:`~ringsim.conformance.conventions`.
"""

from __future__ import annotations

from .check import assert_conforms, check
from .options import Options
from .report import CaseResult, Report

__all__ = ["CaseResult", "Options", "Report", "assert_conforms", "check"]
