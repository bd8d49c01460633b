"""Where the harness writes its results: the folder given with ``--out``, else a new
temporary folder (named on the last line of the run), never the source tree by default: a
check used to leave the working tree dirty by writing into docs/results/."""

from __future__ import annotations

import tempfile
from pathlib import Path


def output_folder(given: Path | None, command: str) -> Path:
    """``given`` (created if missing), or a new folder ``ringsim-<command>-*`` under the
    system's temporary directory."""
    if given is None:
        return Path(tempfile.mkdtemp(prefix=f"ringsim-{command}-"))
    given.mkdir(parents=True, exist_ok=True)
    return given


OUT_HELP = "output folder (default: a new temporary folder, printed at the end)"
