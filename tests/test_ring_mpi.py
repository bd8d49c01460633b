"""The ring on real processes under mpiexec.

Needs ``mpiexec`` and mpi4py, which the project's set-up installs from PyPI (the ``mpi``
extra); skipped with the reason where they are absent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ring_support import run_ring

from ringsim.cases import fixed_cases
from ringsim.launch import (
    descendants,
    kill_processes,
    mpi_available,
    mpiexec_command,
    run_job,
)
from ringsim.trace import Trace

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(mpi_available() is not None, reason=str(mpi_available())),
]


def parity(nprocs: int, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return run_job(mpiexec_command(nprocs, "ringsim.checks.parity", args), timeout)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_mpi_ring_matches_definition(world_size):
    """Forward and backward (dK/dV home over MPI) against the definition and the reference."""
    result = parity(world_size, "--cases", "8", "--seed", str(world_size))
    assert result.returncode == 0, result.stdout + result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("PASS parity") and f"world_size={world_size}" in line, line
    assert "max_grad_error=" in line, line


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_mpi_zigzag_ring_matches_definition(world_size):
    result = parity(world_size, "--cases", "6", "--seed", "4", "--layout", "zigzag")
    assert result.returncode == 0, result.stdout + result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("PASS parity") and line.endswith("layout=zigzag"), line


@pytest.mark.parametrize(
    ("world_size", "layout"), [(2, "contiguous"), (3, "zigzag"), (4, "contiguous")]
)
def test_mpi_ring_with_grouped_query_attention_and_key_padding(world_size, layout):
    """Fewer K/V heads than query heads, then a key padding mask with them: forward and
    backward over MPI (dK/dV summed over the query heads that share a K/V head, then home;
    the padding travels with its keys)."""
    result = parity(world_size, "--cases", "5", "--seed", "6", "--gqa", "--layout", layout)
    assert result.returncode == 0, result.stdout + result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("PASS parity") and line.endswith(" gqa"), line
    padded = parity(world_size, "--cases", "4", "--seed", "7", "--gqa", "--key-padding",
                    "--layout", layout)  # fmt: skip
    assert padded.returncode == 0, padded.stdout + padded.stderr
    assert padded.stdout.strip().splitlines()[-1].endswith(" gqa key_padding")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_mpi_trace_equals_simulated_trace_in_each_layout(layout, tmp_path):
    path = tmp_path / "trace.json"
    result = parity(4, "--cases", "0", "--seed", "9", "--trace-out", str(path), "--layout", layout)
    assert result.returncode == 0, result.stdout + result.stderr
    mpi_trace = Trace.from_json(json.loads(path.read_text()))
    case = fixed_cases(4, layout)[0]  # the check's first case, inputs from seed 9 + 0
    *_, simulated = run_ring(case, *case.inputs(seed=9))
    assert mpi_trace == simulated


def test_mpi_float32():
    result = parity(3, "--cases", "6", "--dtype", "float32")
    assert result.returncode == 0 and "PASS" in result.stdout, result.stdout + result.stderr


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


def test_mpi_corrupted_message_with_checksums_names_rank_step_and_subring():
    result = parity(4, "--cases", "2", "--no-fixed", "--fault", "corrupt", "--fault-rank", "1",
                    "--checksums")  # fmt: skip
    assert result.returncode != 0 and "PASS" not in result.stdout
    assert re.search(r"CorruptMessage: rank \d received a corrupted message from rank 1",
                     result.stderr), result.stderr  # fmt: skip
    assert re.search(r"\(step \d+: the K/V block of sub-ring \d+ \(pair \d+\)", result.stderr)


def test_mpi_corrupted_message_names_rank_and_rows():
    result = parity(4, "--cases", "2", "--no-fixed", "--fault", "corrupt", "--fault-rank", "1")
    assert result.returncode != 0
    assert "FAIL parity world_size=4" in result.stdout
    assert "rows" in result.stderr and "rank" in result.stderr, result.stderr


def rank_processes(launcher: int) -> list[int]:
    """The pids of an mpiexec job's ranks (the Python processes below the launcher)."""
    ranks = []
    for pid in descendants(launcher):
        try:
            if b"ringsim.checks.parity" in Path(f"/proc/{pid}/cmdline").read_bytes():
                ranks.append(pid)
        except OSError:  # ended meanwhile
            pass
    return ranks


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("stopped", [0, 2])
def test_a_stopped_rank_ends_the_check_within_its_timeout(tmp_path, stopped):
    """A rank frozen from outside (SIGSTOP) in the middle of a run: every other rank gives
    up within --timeout wherever it waits (a message or a collective), one FAIL line, no
    PASS, and the job ends. Blocking collectives once held the live ranks forever."""
    trace = tmp_path / "trace.json"  # written by rank 0 after the first case: all ranks run
    args = ["--cases", "400", "--timeout", "3", "--trace-out", str(trace)]
    command = mpiexec_command(4, "ringsim.checks.parity", args)
    ranks: list[int] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as job:
        try:
            started = time.monotonic()
            while not trace.exists():
                assert job.poll() is None, job.communicate()
                assert time.monotonic() - started < 60, "the first case never finished"
                time.sleep(0.02)
            ranks = rank_processes(job.pid)
            assert len(ranks) == 4, ranks
            os.kill(ranks[stopped], signal.SIGSTOP)
            frozen = time.monotonic()
            stdout, stderr = job.communicate(timeout=30)
            elapsed = time.monotonic() - frozen
        finally:
            kill_processes([*ranks, job.pid])  # a hung job leaves nothing behind
    assert job.returncode != 0
    assert "PASS" not in stdout, stdout
    assert elapsed < 3 + 10, elapsed
    assert "CommTimeout" in stderr and "FAIL parity world_size=4 rank" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def mpich_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("mpich_shm_*")}


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
@pytest.mark.parametrize("fault", ["crash", "drop", "corrupt"])
def test_a_failed_check_leaves_no_shared_memory(fault):
    """MPICH removes its /dev/shm segment in MPI_Finalize, which an aborted job never
    reaches; every failed check (aborted, or ending in a FAIL verdict) left 2-4 MB there."""
    before = mpich_segments()
    result = parity(3, "--cases", "1", "--no-fixed", "--fault", fault, "--timeout", "2")
    assert result.returncode != 0 and "FAIL parity" in result.stdout + result.stderr
    assert mpich_segments() - before == set()


@pytest.mark.parametrize(
    "args",
    [("--fault", "drop", "--fault-rank", "5"), ("--timeout", "nan"), ("--timeout", "0"),
     ("--cases", "-1")],
)  # fmt: skip
def test_bad_options_exit_2_with_one_line_and_leave_nothing(args):
    """They ended in a traceback on every rank (exit 1) and a /dev/shm segment."""
    before = mpich_segments()
    result = parity(3, "--cases", "1", *args, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringsim.checks.parity: error: argument --")
    assert mpich_segments() - before == set()
