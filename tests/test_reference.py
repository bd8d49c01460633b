"""The NumPy reference of single-process dilated attention against its definition (spec §2, §4).

Property tests over random configurations (float64 and float32), the fixed parity cases,
and hand-made cases whose answer is written out in the test: plain softmax attention, rows
with no key, keys counted twice, the head -> pattern tables, selection tables, NaN inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from strategies import configs

from ringsim.cases import PARITY_CASES, Case, unit_normal
from ringsim.config import Pattern, make_config, selected_in_segment
from ringsim.reference import dense_dilated_attention, dilated_attention, pattern_mask
from ringsim.reference.parity import function_failures
from ringsim.tolerance import max_abs_error

TOL64 = 1e-10  # spec §9, float64
TOL32 = 2e-5  # spec §9, float32


def plain_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, *, is_causal: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention over the whole sequence, written out: out (b, n, h, d), lse (b, h, n)."""
    scores = np.einsum("bxhd,byhd->bhxy", q, k) / math.sqrt(q.shape[-1])
    if is_causal:
        n = q.shape[1]
        scores = np.where(np.tril(np.ones((n, n), dtype=bool)), scores, -np.inf)
    peak = scores.max(axis=-1, keepdims=True)
    lse = peak[..., 0] + np.log(np.exp(scores - peak).sum(axis=-1))
    probs = np.exp(scores - lse[..., None])
    return np.einsum("bhxy,byhd->bxhd", probs, v), lse


# --- (a) property tests ---------------------------------------------------------------------


@given(configs())
def test_random_configs_float64(case: Case) -> None:
    failures = function_failures(dilated_attention, [case], np.float64)
    assert failures == [], "\n".join(failures)


@given(configs())
def test_random_configs_float32(case: Case) -> None:
    """float32 inputs, compared with the float64 definition on the same inputs cast up."""
    failures = function_failures(dilated_attention, [case], np.float32)
    assert failures == [], "\n".join(failures)


# --- (b) the fixed parity cases ------------------------------------------------------------


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.label)
def test_parity_case(case: Case) -> None:
    failures = function_failures(dilated_attention, [case])
    assert failures == [], "\n".join(failures)


# --- (c) hand-made cases ---------------------------------------------------------------------


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("extra", [0, 5], ids=["w=n", "w>n"])
def test_one_full_pattern_is_plain_attention(
    rng: np.random.Generator, is_causal: bool, extra: int
) -> None:
    q, k, v = unit_normal(rng, (2, 13, 3, 4))
    out, lse = dilated_attention(q, k, v, [13 + extra], [1], is_causal=is_causal, return_lse=True)
    expected_out, expected_lse = plain_attention(q, k, v, is_causal=is_causal)
    assert max_abs_error(out, expected_out) <= TOL64
    assert max_abs_error(lse, expected_lse) <= TOL64


@pytest.mark.parametrize("is_causal", [False, True])
def test_rows_with_no_key(rng: np.random.Generator, is_causal: bool) -> None:
    """w = 4, r = 6 > w, n = 10: segments [0,4) [4,8) [8,10); head h has offset h mod 6, so
    heads 4 and 5 select nothing (offset >= w) and head 3 nothing in the short last segment."""
    q, k, v = unit_normal(rng, (2, 10, 6, 3))
    out, lse = dilated_attention(q, k, v, [4], [6], is_causal=is_causal, return_lse=True)
    selected = {0: {0, 4, 8}, 1: {1, 5, 9}, 2: {2, 6}, 3: {3, 7}, 4: set(), 5: set()}
    for head, rows in selected.items():
        for x in range(10):
            if x in rows:
                assert np.isfinite(lse[:, head, x]).all(), (head, x)
            else:
                assert (lse[:, head, x] == -np.inf).all(), (head, x)
                assert (out[:, x, head] == 0.0).all(), (head, x)
    # head 0, row 0 is alone in its segment's pattern: its only key is itself.
    scale = 1 / math.sqrt(3)
    assert max_abs_error(out[:, 0, 0], v[:, 0, 0]) <= TOL64
    assert max_abs_error(lse[:, 0, 0], scale * (q[:, 0, 0] * k[:, 0, 0]).sum(-1)) <= TOL64


@pytest.mark.parametrize("is_causal", [False, True])
def test_key_chosen_twice_counts_twice(rng: np.random.Generator, is_causal: bool) -> None:
    """Two identical patterns (w, 1), (w, 1): lse = plain lse + log 2, out = plain out."""
    q, k, v = unit_normal(rng, (1, 11, 2, 5))
    out, lse = dilated_attention(q, k, v, [11, 11], [1, 1], is_causal=is_causal, return_lse=True)
    expected_out, expected_lse = plain_attention(q, k, v, is_causal=is_causal)
    assert max_abs_error(out, expected_out) <= TOL64
    assert max_abs_error(lse, expected_lse + math.log(2)) <= TOL64


def _triples(patterns: tuple[Pattern, ...]) -> list[tuple[int, int, int]]:
    return [(p.segment_length, p.dilation_rate, p.offset) for p in patterns]


def test_head_patterns_longnet() -> None:
    config = make_config([8, 16], [2, 3], mode="longnet")
    table = [_triples(p) for p in config.head_patterns(5)]
    assert table == [
        [(8, 2, 0), (16, 3, 0)],
        [(8, 2, 1), (16, 3, 1)],
        [(8, 2, 0), (16, 3, 2)],
        [(8, 2, 1), (16, 3, 0)],
        [(8, 2, 0), (16, 3, 1)],
    ]


def test_head_patterns_grouped() -> None:
    """5 heads over 2 pairs: groups of 3 and 2; offsets use the global head index."""
    config = make_config([8, 16], [2, 3], mode="grouped")
    assert [list(g) for g in config.head_groups(5)] == [[0, 1, 2], [3, 4]]
    table = [_triples(p) for p in config.head_patterns(5)]
    assert table == [[(8, 2, 0)], [(8, 2, 1)], [(8, 2, 0)], [(16, 3, 0)], [(16, 3, 1)]]


@pytest.mark.parametrize(
    ("num_heads", "num_pairs", "groups"),
    [
        (3, 3, [[0], [1], [2]]),
        (5, 3, [[0, 1], [2, 3], [4]]),
        (7, 3, [[0, 1, 2], [3, 4], [5, 6]]),
        (4, 1, [[0, 1, 2, 3]]),
        (6, 4, [[0, 1], [2, 3], [4], [5]]),
    ],
)
def test_head_groups_grouped(num_heads: int, num_pairs: int, groups: list[list[int]]) -> None:
    config = make_config([4] * num_pairs, [1] * num_pairs, mode="grouped")
    assert [list(g) for g in config.head_groups(num_heads)] == groups


def test_pattern_groups_share_offsets() -> None:
    """Heads with one pattern form one group, ordered by pair, then offset."""
    config = make_config([8, 16], [2, 3], mode="longnet")
    table = [(g.pair, g.pattern.offset, g.heads) for g in config.pattern_groups(5)]
    assert table == [
        (0, 0, (0, 2, 4)),
        (0, 1, (1, 3)),
        (1, 0, (0, 3)),
        (1, 1, (1, 4)),
        (1, 2, (2,)),
    ]


@pytest.mark.parametrize(
    ("lengths", "rates", "seq_len", "world_size", "aligned"),
    [
        ((8,), (2,), 16, 1, True),
        ((8,), (2,), 16, 2, True),  # w' = c
        ((16,), (2,), 16, 4, True),  # w' = 4c
        ((32,), (2,), 16, 2, True),  # w > n: w' = n
        ((12,), (1,), 24, 4, True),  # w' = 2c
        ((8, 16), (1, 2), 16, 2, True),
        ((8,), (3,), 16, 1, False),  # r does not divide w'
        ((6,), (1,), 16, 1, False),  # w' does not divide n
        ((8,), (1,), 24, 4, False),  # w' > c = 6, not a multiple of it
        ((4,), (1,), 24, 4, False),  # w' <= c = 6, does not divide it
        ((8,), (4,), 16, 8, False),  # r does not divide c = 2
        ((8,), (1,), 16, 3, False),  # world_size does not divide n
        ((8, 16), (1, 3), 16, 2, False),  # one pair breaks it
    ],
)
def test_is_aligned(lengths, rates, seq_len: int, world_size: int, aligned: bool) -> None:
    assert make_config(lengths, rates).is_aligned(seq_len, world_size) is aligned


@pytest.mark.parametrize(
    ("pattern", "seg_start", "lo", "hi", "expected"),
    [
        (Pattern(8, 3, 1), 8, 8, 16, [9, 12, 15]),  # offset from the segment start
        (Pattern(8, 3, 1), 8, 11, 16, [12, 15]),  # a sub-range: still counted from 8
        (Pattern(8, 3, 1), 8, 12, 14, [12]),
        (Pattern(8, 3, 1), 8, 13, 15, []),
        (Pattern(8, 3, 2), 16, 16, 20, [18]),
        (Pattern(5, 2, 0), 10, 10, 13, [10, 12]),  # ragged last segment [10, 13)
        (Pattern(5, 2, 1), 10, 10, 11, []),
        (Pattern(4, 6, 5), 0, 0, 4, []),  # offset past the segment
        (Pattern(8, 1, 0), 0, 3, 6, [3, 4, 5]),
        (Pattern(12, 5, 4), 24, 30, 36, [33]),  # 28 is below lo, 38 past hi
    ],
)
def test_selected_in_segment(pattern: Pattern, seg_start: int, lo: int, hi: int, expected) -> None:
    rows = selected_in_segment(pattern, seg_start, lo, hi)
    assert rows.dtype == np.int64
    assert rows.tolist() == expected


@pytest.mark.parametrize("is_causal", [False, True])
def test_selection_matches_mask(is_causal: bool) -> None:
    """Selected positions are exactly the mask's non-empty rows, segment by segment."""
    pattern, n = Pattern(7, 3, 2), 23
    mask = pattern_mask(pattern, n, is_causal=is_causal)
    rows = np.concatenate(
        [selected_in_segment(pattern, s, s, min(s + 7, n)) for s in range(0, n, 7)]
    )
    assert rows.tolist() == np.flatnonzero(mask.any(axis=1)).tolist()


@pytest.mark.parametrize("is_causal", [False, True])
def test_nan_in_query_stays_in_its_row(rng: np.random.Generator, is_causal: bool) -> None:
    q, k, v = unit_normal(rng, (2, 12, 3, 4))
    args = ([4, 12], [1, 2])
    clean_out, clean_lse = dilated_attention(q, k, v, *args, is_causal=is_causal, return_lse=True)
    q[1, 5, 2, 0] = np.nan
    out, lse = dilated_attention(q, k, v, *args, is_causal=is_causal, return_lse=True)
    assert np.isnan(out[1, 5, 2]).all() and np.isnan(lse[1, 2, 5])
    out[1, 5, 2], lse[1, 2, 5] = clean_out[1, 5, 2], clean_lse[1, 2, 5]
    assert np.array_equal(out, clean_out) and np.array_equal(lse, clean_lse)


@pytest.mark.parametrize("is_causal", [False, True])
def test_nan_in_key_reaches_only_rows_that_attend_it(
    rng: np.random.Generator, is_causal: bool
) -> None:
    """A NaN key at (position 6, head 1) poisons exactly the queries some pattern of head 1
    lets attend to position 6; every other row is unchanged."""
    segment_lengths, rates, n = [4, 12], [1, 3], 12
    q, k, v = unit_normal(rng, (1, n, 2, 4))
    clean_out, clean_lse = dilated_attention(
        q, k, v, segment_lengths, rates, is_causal=is_causal, return_lse=True
    )
    k[0, 6, 1, 3] = np.nan
    out, lse = dilated_attention(
        q, k, v, segment_lengths, rates, is_causal=is_causal, return_lse=True
    )
    config = make_config(segment_lengths, rates, is_causal=is_causal)
    attends = np.zeros(n, dtype=bool)
    for pattern in config.head_patterns(2)[1]:
        attends |= pattern_mask(pattern, n, is_causal=is_causal)[:, 6]
    assert attends.sum() >= 2  # the case is not vacuous
    poisoned = np.isnan(out[0, :, 1]).all(axis=-1)
    assert poisoned.tolist() == attends.tolist()
    assert np.isnan(lse[0, 1]).tolist() == attends.tolist()
    out[0, attends, 1], lse[0, 1, attends] = clean_out[0, attends, 1], clean_lse[0, 1, attends]
    assert np.array_equal(out, clean_out) and np.array_equal(lse, clean_lse)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_dtype_follows_input(rng: np.random.Generator, dtype) -> None:
    q, k, v = unit_normal(rng, (1, 9, 2, 4), dtype)
    out, lse = dilated_attention(q, k, v, [4, 9], [1, 2], is_causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == dtype
    assert out.shape == (1, 9, 2, 4) and lse.shape == (1, 2, 9)
    assert dilated_attention(q, k, v, [4, 9], [1, 2]).dtype == dtype  # out only by default
    expected_out, expected_lse = dense_dilated_attention(q, k, v, [4, 9], [1, 2], is_causal=True)
    tol = TOL32 if dtype == np.float32 else TOL64
    assert max_abs_error(out, expected_out) <= tol and max_abs_error(lse, expected_lse) <= tol


def test_softmax_scale_is_used(rng: np.random.Generator) -> None:
    """An explicit scale replaces 1/sqrt(d): scale s on q equals scale s*c on q/c."""
    q, k, v = unit_normal(rng, (1, 10, 2, 4))
    a = dilated_attention(q, k, v, [5], [2], softmax_scale=0.7, return_lse=True)
    b = dilated_attention(q / 4, k, v, [5], [2], softmax_scale=2.8, return_lse=True)
    default = dilated_attention(q, k, v, [5], [2], return_lse=True)
    assert max_abs_error(a[0], b[0]) <= TOL64 and max_abs_error(a[1], b[1]) <= TOL64
    assert max_abs_error(a[1], default[1]) > 1e-3


@pytest.mark.parametrize("grow", ["scale", "inputs"])
def test_the_definition_stays_normalised_at_huge_scores(grow):
    """Scores near 1e17: ``exp(l - logsumexp(l))`` loses the log 2 of a tie and weighted
    two equal patterns 1 each, doubling the output; the shifted, divided softmax does not."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 8, 1, 4)) for _ in range(3))
    kwargs = {"softmax_scale": 1e17} if grow == "scale" else {}
    if grow == "inputs":
        q, k = q * 1e8, k * 1e8
    dense, _ = dense_dilated_attention(q, k, v, (8, 8), (1, 1), **kwargs)
    np.testing.assert_allclose(dense, dilated_attention(q, k, v, (8, 8), (1, 1), **kwargs),
                               atol=1e-12)  # fmt: skip
    assert np.abs(dense).max() <= np.abs(v).max() + 1e-12  # a convex mix of values
