"""The ring on real processes under mpiexec.

Needs ``mpiexec`` and mpi4py, which the project's set-up installs from PyPI (the ``mpi``
extra); skipped with the reason where they are absent.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from ring_support import run_ring

from ringsim.cases import fixed_cases
from ringsim.launch import mpi_available, mpiexec_command
from ringsim.trace import Trace

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(mpi_available() is not None, reason=str(mpi_available())),
]


def parity(nprocs: int, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    command = mpiexec_command(nprocs, "ringsim.checks.parity", args)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_mpi_ring_matches_definition(world_size):
    """Forward and backward (dK/dV home over MPI) against the definition and the reference."""
    result = parity(world_size, "--cases", "8", "--seed", str(world_size))
    assert result.returncode == 0, result.stdout + result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("PASS parity") and f"world_size={world_size}" in line, line
    assert "max_grad_error=" in line, line


def test_mpi_float32():
    result = parity(3, "--cases", "6", "--dtype", "float32")
    assert result.returncode == 0 and "PASS" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("world_size", [3, 4])
def test_mpi_trace_equals_simulated_trace(world_size, tmp_path):
    path = tmp_path / "trace.json"
    result = parity(world_size, "--cases", "0", "--seed", "9", "--trace-out", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    mpi_trace = Trace.from_json(json.loads(path.read_text()))
    case = fixed_cases(world_size)[0]  # the check's first case, inputs from seed 9 + 0
    *_, simulated = run_ring(case, *case.inputs(seed=9))
    assert mpi_trace == simulated


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--fault", "drop", "--fault-rank", "1", "--timeout", "3"), "CommTimeout"),
        (("--fault", "crash", "--fault-rank", "2"), "injected crash on rank 2"),
        (("--disagree-rank", "1"), "ranks disagree"),
    ],
)
def test_mpi_failures_end_fast_with_one_clear_error(args, expected):
    start = time.monotonic()
    result = parity(4, "--cases", "2", "--no-fixed", *args, timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - start < 30
    assert expected in result.stderr, result.stderr
    assert "FAIL parity world_size=4 rank" in result.stderr


def test_mpi_corrupted_message_names_rank_and_rows():
    result = parity(4, "--cases", "2", "--no-fixed", "--fault", "corrupt", "--fault-rank", "1")
    assert result.returncode != 0
    assert "FAIL parity world_size=4" in result.stdout
    assert "rows" in result.stderr and "rank" in result.stderr, result.stderr
