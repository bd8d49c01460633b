"""Ending an ``mpiexec`` check: from the rank that saw a failure, one line, then every rank
stops, and never a verdict after it; after a verdict, every rank together. Neither leaves a
shared-memory segment behind."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import NoReturn

#: Seconds between the rank's line and the abort: mpiexec forwards the line, and the abort
#: that tears every process down can win that race on a loaded machine (seen in CI: an
#: empty stderr).
ABORT_GRACE_S = 0.5

#: Where MPICH names the node's shared-memory segment; it removes the name in
#: ``MPI_Finalize``, which an aborted job never reaches.
MPICH_SEGMENT_PREFIX = "/dev/shm/mpich_shm_"


def mapped_segments(maps: Path = Path("/proc/self/maps")) -> list[Path]:
    """The MPICH shared-memory files this process maps and that still have a name.

    Read from ``/proc/self/maps`` (Linux); elsewhere, or without that file, none.
    """
    try:
        lines = maps.read_text().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""
        if path.startswith(MPICH_SEGMENT_PREFIX) and not path.endswith(" (deleted)"):
            found.append(Path(path))
    return sorted(set(found))


def unlink_segments(segments: list[Path]) -> None:
    """Remove the names of ``segments``; the mappings stay valid until every rank exits.

    A name already gone was removed by another aborting rank of the same node.
    """
    for segment in segments:
        segment.unlink(missing_ok=True)


def abort_all(world, line: str) -> NoReturn:
    """Print ``line`` on this rank's stderr, then abort every rank of ``world`` (an mpi4py
    communicator). This process ends here whatever ``MPI_Abort`` does: MPICH's can return to
    the caller, and a check that fell through printed PASS after a failure (seen in 4 of 20
    faulted runs). Before the abort, the node's MPICH shared-memory file loses its name: an
    aborted job never reaches the ``MPI_Finalize`` that removes it, and every aborted run
    left 2-4 MB in ``/dev/shm``."""
    sys.stderr.write(line + "\n")  # one write: ranks' lines do not run into each other
    sys.stderr.flush()
    unlink_segments(mapped_segments())
    time.sleep(ABORT_GRACE_S)
    try:
        world.Abort(1)
    finally:
        os._exit(1)


def finish(code: int) -> NoReturn:
    """End a check whose ranks all know the verdict, with exit status ``code``.

    ``MPI_Finalize`` first, which removes MPICH's shared-memory file: under
    ``python -m mpi4py`` a non-zero ``sys.exit`` alone turns into an ``MPI_Abort`` at exit,
    and every failed (but healthy) check left its 2-4 MB in ``/dev/shm``. Then a normal
    exit: ``os._exit`` right after ``MPI_Finalize`` made mpiexec kill ranks (signal 9) in
    6 of 16 runs at P = 4.
    """
    from mpi4py import MPI

    MPI.Finalize()
    sys.exit(code)
