"""The mutant catalogue: each entry puts one defect of the pitfalls page back into the reference.

A mutant patches the name where the reference *uses* it (``ringsim.reference.dilated.
merge_stable``, not ``ringsim.reference.merge.merge_stable``), so the dense-mask definition,
which shares none of these functions, stays correct. Two users:

- the test suite, which shows that its parity checks fail for every mutant (``apply`` takes
  pytest's ``monkeypatch``);
- the conformance suite (:mod:`ringsim.conformance`), which runs the reference under each
  mutant (:func:`applied`) to say which known defect a user's wrong output matches.

Not catalogued here, because they cannot apply to a single process: pitfall 1 (shard-local
positions) and 9-12, 15 (the ring: :mod:`ringsim.conformance.ring_mutants`). Equivalent here,
so left out: a causal mask on compacted indices for both queries and keys (the compaction is
monotone inside one block) and a -1e10 sentinel inside block attention (every selected query
sees at least itself). Peer conventions that differ from the definition (torchscale's head
blocks, per-group offsets) are in :mod:`ringsim.conformance.conventions`.

:data:`BACKWARD_MUTANTS` break only gradients (pitfall 14), so a forward check cannot kill
them; the gradient oracles do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ringsim.config import Pattern, PatternGroup, segment_bounds, selected_in_segment
from ringsim.reference.backward import mix_backward
from ringsim.reference.block import block_attention
from ringsim.reference.dilated import empty_result
from ringsim.reference.merge import merge_naive, per_row
from ringsim.reference.select import select_rows

from .patching import Mutant, SetAttr

DILATED = "ringsim.reference.dilated"


# --- pitfall 2: segments ignored ----------------------------------------------------------


def selected_from_zero(pattern: Pattern, seg_start: int, lo: int, hi: int) -> np.ndarray:
    """pitfall 2: dilation over the whole sequence, ``arange(offset, n, r)`` cut to the
    segment: the offset counts from position 0 instead of the segment start."""
    positions = np.arange(pattern.offset, hi, pattern.dilation_rate, dtype=np.int64)
    return positions[positions >= lo]


def one_segment(segment_length: int, seq_len: int) -> list[tuple[int, int]]:
    """pitfall 2: segments ignored altogether: one pattern spans the whole sequence."""
    return [(0, seq_len)]


# --- pitfall 3: no scatter-back -------------------------------------------------------------


def scatter_compacted(
    out: np.ndarray, lse: np.ndarray, rows: np.ndarray, block_out: np.ndarray, block_lse: np.ndarray
) -> None:
    """pitfall 3: no scatter-back: the block's rows are written contiguously from the first
    selected position (the compacted layout), not at the positions they came from."""
    span = np.arange(rows[0], rows[0] + len(rows))
    out[:, span] = block_out
    lse[:, :, span] = block_lse


def pattern_attention_cycled(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    group: PatternGroup,
    *,
    is_causal: bool,
    scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """pitfall 3, as in the seed: the selected rows are padded to the segment length by
    cycling (``[0, 2, 4, 6, 0, 2, 4, 6]``), so keys repeat, and the padded block's rows are
    written straight into the segment, so outputs land at the wrong positions."""
    b, n, _, d = q.shape
    out, lse = empty_result(b, n, len(group.heads), d, q.dtype)
    for seg_start, seg_stop in segment_bounds(group.pattern.segment_length, n):
        rows = selected_in_segment(group.pattern, seg_start, seg_start, seg_stop)
        if rows.size == 0:
            continue
        padded = np.resize(rows, seg_stop - seg_start)  # cycles the selected rows
        block_out, block_lse = block_attention(
            select_rows(q, padded, group.heads),
            select_rows(k, padded, group.heads),
            select_rows(v, padded, group.heads),
            padded,
            padded,
            is_causal=is_causal,
            scale=scale,
        )
        out[:, seg_start:seg_stop] = block_out
        lse[:, :, seg_start:seg_stop] = block_lse
    return out, lse


# --- pitfall 4: inverted mask convention ----------------------------------------------------


def masked_scores_inverted(scores: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """pitfall 4: the mask is built as True = attend but applied as True = mask out."""
    if allowed is None:
        return scores
    return np.where(allowed, -np.inf, scores)


# --- pitfall 5: causal mask in the wrong coordinates --------------------------------------


def block_attention_compacted_keys(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_positions: np.ndarray,
    k_positions: np.ndarray,
    *,
    is_causal: bool,
    scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """pitfall 5: indices into the compacted (dilated) keys compared with the global
    positions of the queries."""
    compacted = np.arange(len(k_positions))
    return block_attention(q, k, v, q_positions, compacted, is_causal=is_causal, scale=scale)


# --- pitfall 6: empty rows --------------------------------------------------------------------


def empty_result_sentinel(b: int, n: int, h: int, d: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """pitfall 6: a -1e10 sentinel instead of -inf marks rows with no key."""
    return np.zeros((b, n, h, d), dtype=dtype), np.full((b, h, n), -1e10, dtype=dtype)


def empty_result_zero_lse(b: int, n: int, h: int, d: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """pitfall 6: an empty row reported with lse 0 (as some kernels do) instead of -inf."""
    return np.zeros((b, n, h, d), dtype=dtype), np.zeros((b, h, n), dtype=dtype)


def merge_max_subtraction(
    out: np.ndarray, lse: np.ndarray, block_out: np.ndarray, block_lse: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """pitfall 6: the max-subtraction merge without explicit -inf handling: on a row empty
    on both sides the max is -inf and ``-inf - -inf`` is NaN, which then never goes away."""
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.maximum(lse, block_lse)
        weight, block_weight = np.exp(lse - m), np.exp(block_lse - m)
        total = weight + block_weight
        new_out = (per_row(weight) * out + per_row(block_weight) * block_out) / per_row(total)
        return new_out.astype(out.dtype), (m + np.log(total)).astype(lse.dtype)


# --- pitfall 7: unnormalised merge ------------------------------------------------------------


def merge_unnormalised(
    out: np.ndarray, lse: np.ndarray, block_out: np.ndarray, block_lse: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """pitfall 7: adds the ``out * exp(lse - m)`` terms without dividing by their sum (the
    lse is right, and empty rows are handled, so only the weighting is wrong)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.maximum(lse, block_lse)
        m = np.where(m == -np.inf, 0.0, m)
        weight, block_weight = np.exp(lse - m), np.exp(block_lse - m)
        new_out = per_row(weight) * out + per_row(block_weight) * block_out  # no "/ sum"
        return new_out.astype(out.dtype), (m + np.log(weight + block_weight)).astype(lse.dtype)


# --- pitfall 13: ragged segments --------------------------------------------------------------


def full_segments_only(segment_length: int, seq_len: int) -> list[tuple[int, int]]:
    """pitfall 13: ``n // w`` segments: the ragged last segment is dropped."""
    w_eff = min(segment_length, seq_len)
    return [(start, start + w_eff) for start in range(0, seq_len - w_eff + 1, w_eff)]


# --- pitfall 14: detached mixing weights ----------------------------------------------------


def mix_backward_detached(
    outs: list[np.ndarray],
    lses: list[np.ndarray],
    out: np.ndarray,
    lse: np.ndarray,
    dout: np.ndarray,
    dlse: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """pitfall 14, as torchscale: the pattern weights computed under no_grad, so no
    gradient reaches a pattern's lse through its weight (every ``dlse_i`` is 0)."""
    grads = mix_backward(outs, lses, out, lse, dout, dlse)
    return [(d_out, np.zeros_like(d_lse)) for d_out, d_lse in grads]


def _patch(target: str, replacement: object) -> Callable[[SetAttr], None]:
    def apply(patcher: SetAttr) -> None:
        patcher.setattr(target, replacement)  # raises if the target name is gone

    return apply


MUTANTS: dict[str, Mutant] = {
    "offset_from_position_zero": Mutant(
        2,
        "offsets counted from position 0, not the segment start",
        _patch(f"{DILATED}.selected_in_segment", selected_from_zero),
    ),
    "segments_ignored": Mutant(
        2,
        "one segment over the whole sequence: arange(offset, n, r)",
        _patch(f"{DILATED}.segment_bounds", one_segment),
    ),
    "no_scatter_back": Mutant(
        3,
        "block rows written contiguously from the first selected row",
        _patch(f"{DILATED}.scatter_rows", scatter_compacted),
    ),
    "cycled_padding": Mutant(
        3,
        "selected rows padded by cycling, padded block written into the segment",
        _patch(f"{DILATED}.pattern_attention", pattern_attention_cycled),
    ),
    "inverted_mask": Mutant(
        4,
        "a True = attend mask applied as True = mask out",
        _patch("ringsim.reference.block.masked_scores", masked_scores_inverted),
    ),
    "causal_compacted_keys": Mutant(
        5,
        "a causal mask that compares compacted key indices with global query positions",
        _patch(f"{DILATED}.block_attention", block_attention_compacted_keys),
    ),
    "sentinel_not_inf": Mutant(
        6,
        "-1e10 instead of -inf for rows with no key",
        _patch(f"{DILATED}.empty_result", empty_result_sentinel),
    ),
    "empty_lse_zero": Mutant(
        6,
        "rows with no key reported with lse 0 instead of -inf",
        _patch(f"{DILATED}.empty_result", empty_result_zero_lse),
    ),
    "merge_nan_on_empty": Mutant(
        6,
        "max-subtraction merge without -inf handling: NaN on rows with no key",
        _patch(f"{DILATED}.merge_stable", merge_max_subtraction),
    ),
    "unnormalised_merge": Mutant(
        7,
        "exp-weighted outputs added without dividing by their sum",
        _patch(f"{DILATED}.merge_stable", merge_unnormalised),
    ),
    "naive_merge": Mutant(
        8,
        "log(exp(lse) + exp(block_lse)) in place of the stable merge",
        _patch(f"{DILATED}.merge_stable", merge_naive),
    ),
    "ragged_tail_dropped": Mutant(
        13,
        "n // w segments: the ragged last segment gets no keys",
        _patch(f"{DILATED}.segment_bounds", full_segments_only),
    ),
}

#: Mutants of the backward only; the forward is untouched (see the module docstring).
BACKWARD_MUTANTS: dict[str, Mutant] = {
    "detached_mixing_weights": Mutant(
        14,
        "pattern weights detached: no gradient through w_i = exp(lse_i - L)",
        _patch("ringsim.reference.backward.mix_backward", mix_backward_detached),
    ),
}
