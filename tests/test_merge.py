"""The naive and the stable LSE merge (spec §5, pitfall 6-8).

Layouts: out ``(b, n, h, d)``, lse ``(b, h, n)``.
"""

from __future__ import annotations

from functools import reduce

import numpy as np
import pytest

from ringsim.reference import merge_naive, merge_stable
from ringsim.reference.merge import logsigmoid, per_row, sigmoid
from ringsim.tolerance import max_abs_error

B, N, H, D = 2, 7, 3, 4


def random_part(rng: np.random.Generator, low: float, high: float, dtype=np.float64):
    """A partial result: out ``(B, N, H, D)`` unit normal, lse ``(B, H, N)`` uniform."""
    out = rng.standard_normal((B, N, H, D)).astype(dtype)
    lse = rng.uniform(low, high, (B, H, N)).astype(dtype)
    return out, lse


def exact_merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """``L = logsumexp_i lse_i``, ``out = sum_i exp(lse_i - L) out_i`` (0 where L = -inf)."""
    lses = np.stack([lse for _, lse in parts])
    total = np.logaddexp.reduce(lses, axis=0)
    out = np.zeros_like(parts[0][0], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        for part_out, lse in parts:
            weight = np.where(lse == -np.inf, 0.0, np.exp(lse - total))
            out += per_row(weight) * part_out
    return out, total


def test_naive_and_stable_agree_in_range(rng: np.random.Generator) -> None:
    a, b = random_part(rng, -20, 20), random_part(rng, -20, 20)
    naive, stable = merge_naive(*a, *b), merge_stable(*a, *b)
    assert np.isfinite(naive[0]).all() and np.isfinite(naive[1]).all()
    assert max_abs_error(stable[0], naive[0]) <= 1e-12
    assert max_abs_error(stable[1], naive[1]) <= 1e-12
    expected = exact_merge([a, b])
    assert max_abs_error(stable[0], expected[0]) <= 1e-12
    assert max_abs_error(stable[1], expected[1]) <= 1e-12


@pytest.mark.parametrize("new_side_larger", [False, True])
def test_large_gap_stable_survives_naive_overflows(
    rng: np.random.Generator, new_side_larger: bool
) -> None:
    """lse 1e4 against lse 0: exp(1e4) overflows float64, the stable form never exponentiates
    a positive number and returns the larger side."""
    big = (rng.standard_normal((B, N, H, D)), 1e4 + rng.uniform(0, 1, (B, H, N)))
    small = (rng.standard_normal((B, N, H, D)), rng.uniform(-1, 1, (B, H, N)))
    a, b = (small, big) if new_side_larger else (big, small)
    out, lse = merge_stable(*a, *b)
    assert max_abs_error(out, big[0]) <= 1e-12
    assert max_abs_error(lse, big[1]) <= 1e-12
    naive_out, naive_lse = merge_naive(*a, *b)
    assert not np.isfinite(naive_out).any() and not np.isfinite(naive_lse).any()


def test_large_close_lse_matches_logaddexp(rng: np.random.Generator) -> None:
    """Both lse near 1e4 and close to each other: both sides count, exactly as logaddexp."""
    a = random_part(rng, 1e4, 1e4 + 3)
    b = random_part(rng, 1e4, 1e4 + 3)
    out, lse = merge_stable(*a, *b)
    expected_out, expected_lse = exact_merge([a, b])
    # lse near 1e4 carries ~2e-12 of rounding; the spec §9 float64 bound covers it.
    assert max_abs_error(lse, expected_lse) <= 1e-10
    assert max_abs_error(out, expected_out) <= 1e-10
    assert not np.isfinite(merge_naive(*a, *b)[1]).any()


def test_both_sides_empty(rng: np.random.Generator) -> None:
    zeros, empty = np.zeros((B, N, H, D)), np.full((B, H, N), -np.inf)
    out, lse = merge_stable(zeros, empty, zeros.copy(), empty.copy())
    assert not np.isnan(out).any() and (out == 0).all()
    assert (lse == -np.inf).all()


def test_one_side_empty_gives_the_other_exactly(rng: np.random.Generator) -> None:
    part = random_part(rng, -5, 5)
    empty = (np.zeros((B, N, H, D)), np.full((B, H, N), -np.inf))
    for merged in (merge_stable(*empty, *part), merge_stable(*part, *empty)):
        assert np.array_equal(merged[0], part[0]) and np.array_equal(merged[1], part[1])


def test_mixed_empty_rows(rng: np.random.Generator) -> None:
    """Rows empty on one side, the other, both, or neither, in one call."""
    a, b = random_part(rng, -3, 3), random_part(rng, -3, 3)
    empty_a = rng.random((B, H, N)) < 0.4
    empty_b = rng.random((B, H, N)) < 0.4
    for (out, lse), empty in ((a, empty_a), (b, empty_b)):
        lse[empty] = -np.inf
        out[per_row(empty)[..., 0].nonzero()] = 0.0
    assert (empty_a & empty_b).any() and (empty_a & ~empty_b).any() and (~empty_a).any()
    out, lse = merge_stable(*a, *b)
    expected_out, expected_lse = exact_merge([a, b])
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert max_abs_error(out, expected_out) <= 1e-12
    assert max_abs_error(lse, expected_lse) <= 1e-12


def test_many_blocks_equal_logsumexp_in_any_order(rng: np.random.Generator) -> None:
    parts = [random_part(rng, -30, 30) for _ in range(6)]
    parts[2][1][0, 1, :] = -np.inf  # some rows empty in some blocks
    parts[2][0][0, :, 1] = 0.0
    expected_out, expected_lse = exact_merge(parts)
    left = reduce(lambda acc, part: merge_stable(*acc, *part), parts)
    right = reduce(lambda acc, part: merge_stable(*part, *acc), parts[::-1])
    halves = merge_stable(
        *reduce(lambda acc, p: merge_stable(*acc, *p), parts[:3]),
        *reduce(lambda acc, p: merge_stable(*acc, *p), parts[3:]),
    )
    for out, lse in (left, right, halves):
        assert max_abs_error(out, expected_out) <= 1e-12
        assert max_abs_error(lse, expected_lse) <= 1e-12


def test_float32_stays_float32(rng: np.random.Generator) -> None:
    a, b = random_part(rng, -20, 20, np.float32), random_part(rng, -20, 20, np.float32)
    out, lse = merge_stable(*a, *b)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    expected_out, expected_lse = exact_merge([a, b])
    assert max_abs_error(out, expected_out) <= 2e-6
    assert max_abs_error(lse, expected_lse) <= 1e-5


def test_nan_propagates(rng: np.random.Generator) -> None:
    a, b = random_part(rng, -3, 3), random_part(rng, -3, 3)
    b[1][1, 2, 3] = np.nan
    out, lse = merge_stable(*a, *b)
    assert np.isnan(lse[1, 2, 3]) and np.isnan(out[1, 3, 2]).all()
    assert np.isnan(lse).sum() == 1 and np.isnan(out).sum() == D


def test_sigmoid_and_logsigmoid_limits(rng: np.random.Generator) -> None:
    x = np.concatenate([rng.uniform(-800, 800, 50), [-np.inf, np.inf, 0.0]])
    with np.errstate(over="ignore"):
        expected = 1.0 / (1.0 + np.exp(-x))
    assert max_abs_error(sigmoid(x), expected) <= 1e-15
    assert max_abs_error(logsigmoid(x), -np.logaddexp(0.0, -x)) <= 1e-12
    assert logsigmoid(np.array(-1e4)) == -1e4  # no overflow, no -inf
