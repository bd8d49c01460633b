"""Row batches for a fast single-device path: which rows one kernel call attends.

For one pair ``(w, r)`` and its heads, every full segment selects, for head h, the rows
``start + (h mod r) + r*j``. Heads whose offsets select the same number of rows per segment
can share one kernel call over all full segments at once (segments become the batch), and
the ragged last segment, if any, gets one more call. An aligned configuration (r divides
w', w' divides n) needs exactly one call per pair. Pure functions of global positions,
NumPy only, so they are tested as tables and shared by every torch path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ringsim.config import PatternGroup
from ringsim.layout import local_rows
from ringsim.tasks import TaskBatch


@dataclass(frozen=True, eq=False)
class RowBatch:
    """One kernel call: ``rows[i, s, j]`` is the j-th selected global position of segment s
    for head ``heads[i]``; shape ``(len(heads), segments, rows per segment)``."""

    heads: tuple[int, ...]
    rows: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.rows.shape)  # type: ignore[return-value]


def _selected_count(offset: int, rate: int, length: int) -> int:
    return len(range(offset, length, rate))


def row_batches(
    groups: tuple[PatternGroup, ...], seq_len: int, lo: int = 0, hi: int | None = None
) -> list[RowBatch]:
    """The kernel calls for one pair's pattern groups over the segments inside ``[lo, hi)``.

    ``[lo, hi)`` (default the whole sequence) must start and end on segment boundaries of
    the pair, or end at ``seq_len`` (a ragged last segment). Returns batches of full
    segments, then those of the ragged tail.
    """
    hi = seq_len if hi is None else hi
    if not groups or hi <= lo:
        return []
    pattern = groups[0].pattern
    w = pattern.effective_length(seq_len)
    full = (hi - lo) // w
    spans = [(lo, full, w)]  # (first segment start, number of segments, segment length)
    if lo + full * w < hi:
        spans.append((lo + full * w, 1, hi - lo - full * w))
    batches = []
    for first, count, length in spans:
        by_count: dict[int, list[tuple[int, int]]] = {}
        for g in groups:
            m = _selected_count(g.pattern.offset, g.pattern.dilation_rate, length)
            if m:
                by_count.setdefault(m, []).extend((h, g.pattern.offset) for h in g.heads)
        starts = first + length * np.arange(count, dtype=np.int64)
        for m, heads in sorted(by_count.items()):
            offsets = np.array([o for _, o in heads], dtype=np.int64)
            steps = pattern.dilation_rate * np.arange(m, dtype=np.int64)
            rows = offsets[:, None, None] + starts[None, :, None] + steps[None, None, :]
            batches.append(RowBatch(tuple(h for h, _ in heads), rows))
    return batches


@functools.lru_cache(maxsize=256)
def task_row_batches(
    batch: TaskBatch, groups: tuple[PatternGroup, ...], chunks: tuple[range, ...]
) -> tuple[RowBatch, ...]:
    """The kernel calls of a plan's batch of diagonal tasks (:class:`ringsim.plan.TaskBatch`,
    its pair's ``groups``; the rank holds ``chunks``): heads of groups with equal row counts
    share one call, each task (a segment, or the part of it in one chunk of the rank) one
    entry of its batch. Rows are indices into the rank's shard; keys are the same rows.
    Cached by batch identity."""
    by_count: dict[int, list[tuple[int, int]]] = {}  # rows -> (head, group index)
    for gi, (g, m) in enumerate(zip(groups, batch.q_counts)):
        if m:
            by_count.setdefault(m, []).extend((h, gi) for h in g.heads)
    rate = groups[0].pattern.dilation_rate
    out = []
    for m, heads in sorted(by_count.items()):
        starts = np.array(
            [[local_rows(chunks, t.q_rows[gi]).start for t in batch.tasks] for _, gi in heads],
            dtype=np.int64,
        )  # (H, S)
        rows = starts[:, :, None] + rate * np.arange(m, dtype=np.int64)  # (H, S, m)
        out.append(RowBatch(tuple(h for h, _ in heads), rows))
    return tuple(out)
