"""Build ``mpiexec`` command lines for the check modules (``ringsim.checks``).

The project's MPI comes from PyPI (the ``mpich`` wheel puts ``mpiexec`` in the virtual
environment's ``bin``), so the ``mpiexec`` next to the running interpreter wins over PATH.
Open MPI (the GPU machine's) refuses to oversubscribe cores by default and to run as root
without a flag; MPICH needs neither.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path


def find_mpiexec() -> str | None:
    """The ``mpiexec`` beside ``sys.executable`` if there is one, else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"  # not resolved: the venv's bin
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpiexec")


@functools.lru_cache(maxsize=8)
def _version_text(mpiexec: str) -> str:
    """``mpiexec --version`` output (stdout and stderr), asked once per executable."""
    done = subprocess.run(
        [mpiexec, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{mpiexec} --version exited with {done.returncode}: {done.stderr.strip()}"
        )
    return done.stdout + done.stderr


def is_open_mpi(mpiexec: str) -> bool:
    """Whether ``mpiexec`` belongs to Open MPI (its ``--version`` says so)."""
    return "Open MPI" in _version_text(mpiexec)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def mpiexec_command(nprocs: int, module: str, args: Sequence[str] = ()) -> list[str]:
    """``[mpiexec, -n, nprocs, python, -m, mpi4py, -m, module, *args]``.

    ``-m mpi4py`` makes an uncaught exception on any rank abort every rank. Under Open MPI
    ``--oversubscribe`` is added (more ranks than cores is normal here), and
    ``--allow-run-as-root`` when running as root. Raises ``RuntimeError`` if no
    ``mpiexec`` is found.
    """
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise RuntimeError(
            "no mpiexec beside the Python interpreter or on PATH; install the project's "
            "MPI extra: pip install 'ringsim[mpi]' (mpi4py and the mpich wheel)"
        )
    flags: list[str] = []
    if is_open_mpi(mpiexec):
        flags.append("--oversubscribe")
        if _is_root():
            flags.insert(0, "--allow-run-as-root")
    return [mpiexec, *flags, "-n", str(nprocs), sys.executable, "-m", "mpi4py", "-m", module, *args]


def mpi_available() -> str | None:
    """``None`` if MPI checks can be launched, else why not (a pytest skip reason)."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'ringsim[mpi]')"
    mpiexec = find_mpiexec()
    if mpiexec is None:
        return "no mpiexec beside the Python interpreter or on PATH (pip install 'ringsim[mpi]')"
    try:
        _version_text(mpiexec)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        return f"{mpiexec} does not run: {error}"
    return None


def descendants(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Every living process below ``pid`` (children, their children, ...), from ``/proc``.

    An ``mpiexec`` job's ranks each run in a session of their own, below a proxy: killing
    the launcher's process group does not reach them. Without ``/proc``, none.
    """
    children: dict[int, list[int]] = {}
    for entry in proc.glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return sorted(found)


def kill_processes(pids: Sequence[int]) -> None:
    """SIGKILL each of ``pids``; one that already ended is skipped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_job(
    command: Sequence[str],
    timeout: float,
    on_stderr_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (an ``mpiexec`` line) and capture its text output.

    ``on_stderr_line`` is called with each line the job writes to stderr, as it comes (a
    progress bar follows the job that way). Past ``timeout`` seconds the launcher and every
    process below it are killed, then ``subprocess.TimeoutExpired`` is raised: a hung job
    leaves no rank behind.
    """
    out: list[str] = []
    err: list[str] = []

    def read_stderr(stream) -> None:
        for line in stream:
            err.append(line)
            if on_stderr_line is not None:
                on_stderr_line(line)

    with subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as job:
        readers = [
            threading.Thread(target=read_stderr, args=(job.stderr,), daemon=True),
            threading.Thread(target=lambda: out.append(job.stdout.read()), daemon=True),  # type: ignore[union-attr]
        ]
        for reader in readers:
            reader.start()
        try:
            job.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            kill_processes([*descendants(job.pid), job.pid])
            job.wait()
            hung = True
        for reader in readers:  # the pipes close with the job: the readers end
            reader.join(timeout=10)
    if hung:
        raise subprocess.TimeoutExpired(list(command), timeout, "".join(out), "".join(err))
    return subprocess.CompletedProcess(list(command), job.returncode, "".join(out), "".join(err))
