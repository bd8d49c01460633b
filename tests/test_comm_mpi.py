"""MPICommunicator under mpiexec: needs mpiexec and mpi4py from the project's set-up
(``pip install -e '.[mpi]'``: mpi4py and the mpich wheel). The launcher tests are skipped,
with the reason, where they are absent; packing and command-line tests always run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ringsim import launch
from ringsim.comm import Recv
from ringsim.comm.mpi import pack, unpack
from ringsim.launch import mpi_available, mpiexec_command

MPI_MISSING = mpi_available()
needs_mpi = pytest.mark.skipif(MPI_MISSING is not None, reason=f"needs mpiexec: {MPI_MISSING}")
LIMIT_S = 60  # any single launch; a hang fails the test instead of stalling the suite


def launch_check(nprocs: int, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``ringsim.checks.comm``; a job still running after LIMIT_S is killed, and fails."""
    command = mpiexec_command(nprocs, "ringsim.checks.comm", args)
    began = time.monotonic()
    # Own session, so a hung job's ranks can be killed with mpiexec (they share its group).
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{command} still running after {LIMIT_S} s:\n{stdout}\n{stderr}")
    done = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    return done, time.monotonic() - began


@pytest.mark.mpi
@needs_mpi
@pytest.mark.parametrize("nprocs", [1, 2, 3, 4, 8])
def test_ring_check_passes(nprocs: int) -> None:
    done, _ = launch_check(nprocs, "--seed", str(100 + nprocs))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # rank 0 alone prints
    assert lines[0].startswith(f"PASS comm world_size={nprocs} "), done.stdout


@pytest.mark.mpi
@needs_mpi
def test_drop_ends_in_timeout_naming_the_receiver() -> None:
    """Rank 1 drops its first message to rank 2. Rank 2 waits for it; rank 0, then rank 1,
    wait in turn for the ranks stuck before them, a few milliseconds later. Whichever
    deadline passes first ends the job (on a loaded machine, not always rank 2's): the
    error names that receiver and the rank it waited for, and nothing prints PASS."""
    done, elapsed = launch_check(3, "--fault", "drop", "--fault-rank", "1", "--timeout", "2")
    assert done.returncode != 0, done.stdout
    assert elapsed < 30
    assert "PASS" not in done.stdout
    timeouts = re.findall(r"CommTimeout: rank (\d) timed out after 2 s waiting for recv from "
                          r"rank (\d) tag (\d+)", done.stderr)  # fmt: skip
    assert timeouts, done.stderr
    chain = {("2", "1"), ("0", "2"), ("1", "0")}  # each rank waits for the one before it
    assert all((receiver, sender) in chain for receiver, sender, _ in timeouts), timeouts
    assert "Traceback" not in done.stderr and "FAIL comm world_size=3 rank " in done.stderr


@pytest.mark.mpi
@needs_mpi
def test_crash_ends_the_job_with_the_message() -> None:
    done, elapsed = launch_check(3, "--fault", "crash", "--fault-rank", "2", "--timeout", "2")
    assert done.returncode != 0, done.stdout
    assert elapsed < 30
    assert "PASS" not in done.stdout
    assert "RankCrashed: injected crash on rank 2 at message 0" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr  # one line from the rank, then all stop


def test_abort_never_returns_to_the_check(monkeypatch, capsys) -> None:
    """MPICH's MPI_Abort can return: the check must still end there, not print a verdict."""
    from ringsim.checks import abort

    class Returning:
        def Abort(self, code):  # mpi4py's name
            return None

    class Ended(Exception):
        pass

    def exit_(code):
        raise Ended(code)

    monkeypatch.setattr(abort, "ABORT_GRACE_S", 0.0)
    monkeypatch.setattr(abort.os, "_exit", exit_)
    with pytest.raises(Ended):
        abort.abort_all(Returning(), "FAIL parity rank 1: CommTimeout: ...")
    assert capsys.readouterr().err == "FAIL parity rank 1: CommTimeout: ...\n"


@pytest.mark.mpi
@needs_mpi
def test_corrupt_is_reported_as_fail_naming_the_rank() -> None:
    done, _ = launch_check(4, "--fault", "corrupt", "--fault-rank", "1", "--fault-message", "2")
    assert done.returncode != 0, done.stdout + done.stderr
    assert done.stdout.startswith("FAIL comm world_size=4 "), done.stdout
    assert "rank 2 round 2 array 1 from rank 1 differs" in done.stdout
    assert "from rank 0" not in done.stdout  # only the corrupted message is flagged


@pytest.mark.mpi
@needs_mpi
def test_delay_still_passes() -> None:
    done, elapsed = launch_check(2, "--fault", "delay", "--fault-rank", "0", "--fault-delay", "0.5")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("PASS comm world_size=2 "), done.stdout
    assert elapsed >= 0.5


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.int32, np.bool_])
def test_pack_unpack_round_trip(dtype) -> None:
    rng = np.random.default_rng(7)
    shapes = ((3, 4), (0, 2), (5,), ())
    payload = tuple((rng.standard_normal(s) * 10).astype(dtype) for s in shapes)
    payload = (payload[0].T, *payload[1:])  # a non-contiguous array must pack too
    buffer = pack(payload)
    assert buffer.dtype == np.uint8 and buffer.nbytes == sum(a.nbytes for a in payload)
    assert not any(np.shares_memory(buffer, a) for a in payload)  # PITFALLS 9
    got = unpack(buffer.copy(), Recv(0, 0, tuple(a.shape for a in payload), np.dtype(dtype)))
    for g, w in zip(got, payload, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def test_mpiexec_command_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "find_mpiexec", lambda: "/opt/mpi/bin/mpiexec")
    monkeypatch.setattr(launch, "is_open_mpi", lambda path: False)
    command = mpiexec_command(3, "ringsim.checks.comm", ["--seed", "4"])
    assert command == [
        "/opt/mpi/bin/mpiexec",
        "-n",
        "3",
        sys.executable,
        "-m",
        "mpi4py",
        "-m",
        "ringsim.checks.comm",
        "--seed",
        "4",
    ]


@pytest.mark.parametrize("root", [True, False])
def test_mpiexec_command_open_mpi_flags(monkeypatch: pytest.MonkeyPatch, root: bool) -> None:
    monkeypatch.setattr(launch, "find_mpiexec", lambda: "/usr/bin/mpiexec")
    monkeypatch.setattr(launch, "is_open_mpi", lambda path: True)
    monkeypatch.setattr(launch, "_is_root", lambda: root)
    command = mpiexec_command(2, "m")
    flags = command[1 : command.index("-n")]
    assert flags == (["--allow-run-as-root", "--oversubscribe"] if root else ["--oversubscribe"])


def test_mpiexec_command_without_mpiexec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "find_mpiexec", lambda: None)
    with pytest.raises(RuntimeError, match="no mpiexec"):
        mpiexec_command(2, "m")
