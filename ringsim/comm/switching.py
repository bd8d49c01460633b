"""How the simulated cluster's rank threads share the interpreter.

A rank computes, then blocks on a message. CPython preempts a running thread every
``sys.getswitchinterval()`` seconds (5 ms by default) to let another take the GIL; with
dozens of ranks runnable, a rank preempted while it held the cluster's lock made every other
rank wait for a whole round of GIL handoffs, and the cost of one message grew with the
number of ranks: 2.1 ms at P = 64 and 3.5 ms at P = 128 (n = 256, one segment spanning every
rank, the NumPy ring on a 2-core machine). While a cluster runs, the switch interval is
raised to :data:`SWITCH_INTERVAL_S`, so that a rank runs until it blocks, as the ranks of a
real cluster do: 0.73 and 0.84 ms per message there. The previous interval comes back when
the last run in progress ends.
"""

from __future__ import annotations

import contextlib
import sys
import threading

#: Seconds a rank thread may run before the interpreter preempts it, while a cluster runs.
SWITCH_INTERVAL_S = 0.05

_LOCK = threading.Lock()
_runs = 0
_saved = 0.0


@contextlib.contextmanager
def ranks_run_until_they_block():
    """Raise the interpreter's switch interval for the duration (nested and concurrent runs
    share it; the interval in force before the first is restored after the last)."""
    global _runs, _saved
    with _LOCK:
        if _runs == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(max(_saved, SWITCH_INTERVAL_S))
        _runs += 1
    try:
        yield
    finally:
        with _LOCK:
            _runs -= 1
            if _runs == 0:
                sys.setswitchinterval(_saved)
