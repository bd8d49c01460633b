"""*Select* the rows of a pattern and *scatter* results back to their global positions.

Selection is done with global positions (``ringsim.config.selected_in_segment``), so the
same code serves a whole sequence and a rank's shard. Scatter writes each result row at
the position it came from; rows a pattern does not select keep ``(0, -inf)`` (pitfall 3).
"""

from __future__ import annotations

import numpy as np


def select_rows(x: np.ndarray, rows: np.ndarray, heads: tuple[int, ...] | list[int]) -> np.ndarray:
    """``x[:, rows][:, :, heads]`` as a new array: ``(b, n, h, d)`` -> ``(b, len(rows), H, d)``.

    ``rows`` index into x's sequence axis (global positions minus x's first position).
    """
    return x[:, rows][:, :, list(heads)]


def kv_of(heads, num_heads: int, kv: np.ndarray) -> list[int]:
    """The head of ``kv`` ``(b, n, h_kv, d)`` that each of query ``heads`` reads (of
    ``num_heads``): ``h // (num_heads / h_kv)`` (grouped-query attention, spec §1)."""
    ratio = num_heads // kv.shape[2]
    return [h // ratio for h in heads]


def scatter_rows(
    out: np.ndarray,
    lse: np.ndarray,
    rows: np.ndarray,
    block_out: np.ndarray,
    block_lse: np.ndarray,
) -> None:
    """Write a block's result into ``out[:, rows]`` ``(b, n, H, d)`` and ``lse[:, :, rows]``
    ``(b, H, n)``, in place."""
    out[:, rows] = block_out
    lse[:, :, rows] = block_lse
