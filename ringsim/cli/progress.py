"""A tiny progress bar for long CLI runs: stderr only, no dependencies.

It draws (one line, redrawn in place with ``\\r``) only when its stream is a terminal or
when forced; anywhere else (a pipe, a log file, CI without a terminal) it draws nothing and
at most prints one summary line when it closes, so logs never fill with bar frames.

Example::

    with Progress(total=40, label="verify") as bar:
        for case in cases:
            run(case)
            bar.advance()
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)  # some stand-in streams have no isatty
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """A counter from 0 to ``total`` shown as ``label [#####.....] 12/40 3.1s``.

    Args:
        total: the number of units of work (>= 0).
        label: what is running; :meth:`advance` may change it.
        stream: where to draw; ``sys.stderr`` (looked up when the bar is made) by default.
        force: ``True`` draws even without a terminal, ``False`` never draws, ``None``
            draws only on a terminal.
        summary: print ``label: done/total in 3.1s`` on close when not drawing.
        width: characters of the bar itself.
        interval: the shortest time between two redraws, in seconds.
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        *,
        stream: TextIO | None = None,
        force: bool | None = None,
        summary: bool = False,
        width: int = 24,
        interval: float = 0.1,
    ) -> None:
        if total < 0:
            raise ValueError(f"total: must be >= 0, got {total}")
        self.total = total
        self.label = label
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.drawing = _is_terminal(self.stream) if force is None else force
        self.summary = summary
        self.width = width
        self.interval = interval
        self._start = time.monotonic()
        self._last_draw = float("-inf")
        self._last_len = 0
        self._closed = False

    def __enter__(self) -> Progress:
        self._draw(now=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, units: int = 1, label: str | None = None) -> None:
        """Count ``units`` more done (capped at ``total``) and maybe redraw."""
        self.done = min(self.total, self.done + units)
        if label is not None:
            self.label = label
        self._draw(now=self.done == self.total)

    def set_label(self, label: str) -> None:
        """Show what runs now (for example before a long step that advances once)."""
        self.label = label
        self._draw(now=True)

    def close(self) -> None:
        """Finish the line (drawing) or print the summary line (not drawing), once."""
        if self._closed:
            return
        self._closed = True
        if self.drawing:
            self._draw(now=True)
            self.stream.write("\n")
        elif self.summary:
            self.stream.write(f"{self.label}: {self.done}/{self.total} in {self.elapsed():.1f}s\n")
        self.stream.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def line(self) -> str:
        """The text of the bar as it would be drawn now."""
        filled = self.width if self.total == 0 else self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.label} [{bar}] {self.done}/{self.total} {self.elapsed():.1f}s"

    def _draw(self, now: bool = False) -> None:
        if not self.drawing or self._closed:
            return
        moment = time.monotonic()
        if not now and moment - self._last_draw < self.interval:
            return
        self._last_draw = moment
        text = self.line()
        pad = " " * max(0, self._last_len - len(text))  # wipe a longer previous frame
        self._last_len = len(text)
        self.stream.write("\r" + text + pad)
        self.stream.flush()
