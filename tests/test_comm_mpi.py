"""MPICommunicator under mpiexec: needs mpiexec and mpi4py from the project's set-up
(``pip install -e '.[mpi]'``: mpi4py and the mpich wheel). The launcher tests are skipped,
with the reason, where they are absent; packing and command-line tests always run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ringsim import launch
from ringsim.comm import Recv
from ringsim.comm.mpi import pack, unpack
from ringsim.launch import mpi_available, mpiexec_command, run_job

MPI_MISSING = mpi_available()
needs_mpi = pytest.mark.skipif(MPI_MISSING is not None, reason=f"needs mpiexec: {MPI_MISSING}")
LIMIT_S = 60  # any single launch; a hang fails the test instead of stalling the suite


def launch_check(nprocs: int, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``ringsim.checks.comm``; a job still running after LIMIT_S is killed (every rank
    with it), and fails."""
    command = mpiexec_command(nprocs, "ringsim.checks.comm", args)
    began = time.monotonic()
    try:
        done = run_job(command, LIMIT_S)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"{command} still running after {LIMIT_S} s:\n{hung.stdout}\n{hung.stderr}")
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
    assert "Abort" not in done.stderr  # a verdict ends every rank together (MPI_Finalize)


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
    assert not any(np.shares_memory(buffer, a) for a in payload)  # pitfall 9
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


def test_mapped_segments_reads_named_mpich_files_only(tmp_path) -> None:
    from ringsim.checks.abort import mapped_segments

    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 rw-s 00000000 00:1a 12 /dev/shm/mpich_shm_86808393_0\n"
        "7f01-7f02 rw-s 00000000 00:1a 13 /dev/shm/mpich_shm_0badf00d_0 (deleted)\n"
        "7f02-7f03 rw-s 00000000 00:1a 12 /dev/shm/mpich_shm_86808393_0\n"
        "7f03-7f04 r-xp 00000000 08:01 99 /usr/lib/libmpi.so.12\n"
        "7f04-7f05 rw-p 00000000 00:00 0\n"
    )
    assert [str(p) for p in mapped_segments(maps)] == ["/dev/shm/mpich_shm_86808393_0"]
    assert mapped_segments(tmp_path / "absent") == []


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc (Linux)")
def test_run_job_kills_every_process_below_a_hung_launcher() -> None:
    """A rank runs in a session of its own below a proxy: the launcher's death alone
    would leave it running."""
    script = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', " \
             "'import os, time; os.setsid(); print(os.getpid(), flush=True); time.sleep(60)']" \
             ").wait()"  # fmt: skip
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        run_job([sys.executable, "-c", script], timeout=2.0)
    grandchild = int(hung.value.stdout.split()[0])
    time.sleep(0.2)
    stat = Path(f"/proc/{grandchild}/stat")
    if stat.exists():  # killed but not yet reaped by its new parent: a zombie
        assert stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_run_job_hands_over_stderr_lines_as_they_come() -> None:
    """verify's bar follows an mpiexec row through these lines (it stalled for 20 s)."""
    script = ("import sys, time\nfor i in range(3):\n    print(f'case {i + 1} of 3', "
              "file=sys.stderr, flush=True)\n    time.sleep(0.3)\nprint('PASS')")  # fmt: skip
    seen: list[tuple[str, float]] = []
    began = time.monotonic()
    done = run_job([sys.executable, "-c", script], 30,
                   on_stderr_line=lambda line: seen.append((line, time.monotonic())))  # fmt: skip
    ended = time.monotonic()
    assert done.returncode == 0 and done.stdout == "PASS\n"
    assert [line for line, _ in seen] == [f"case {i} of 3\n" for i in (1, 2, 3)]
    assert seen[0][1] - began < ended - began - 0.4  # the first line came before the end
    assert done.stderr == "".join(line for line, _ in seen)
