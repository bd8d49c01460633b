"""spec §7's rule for non-finite inputs in the NumPy reference and the dense definition:
exactly the rows that attend to a non-finite input are NaN. A masked key contributes nothing
(not 0 x NaN), so a NaN value at a key a row does not attend never reaches that row."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ringsim.cases import Case, random_case
from ringsim.reference import dense_dilated_attention, dilated_attention, ring_dilated_attention


def attending_rows(case: Case, key: int, head: int) -> np.ndarray:
    """``(b, n)`` bool: the rows of ``head`` whose softmax gives key ``key`` a weight, read
    from the definition on a value that is 1 at that key and 0 elsewhere."""
    q, k, _ = case.inputs(seed=1)
    v = np.zeros(case.shape)
    v[:, key, head, :] = 1.0
    out, _ = dense_dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs()
    )
    return out[:, :, head, 0] != 0


def paths(case: Case):
    """The paths held to the exact rule: NumPy, and torch with its math kernel (a fused
    kernel may also NaN other rows of the same block, spec §7)."""
    args = (case.segment_lengths, case.dilation_rates)
    kw = case.kwargs()
    found = {
        "dense definition": lambda q, k, v: dense_dilated_attention(q, k, v, *args, **kw)[0],
        "reference": lambda q, k, v: dilated_attention(q, k, v, *args, **kw),
        "simulated ring": lambda q, k, v: ring_dilated_attention(
            q, k, v, *args, world_size=case.world_size, **kw
        ),
    }
    if importlib.util.find_spec("torch") is not None:
        import torch

        from ringsim import gpu

        def torch_path(fn, **extra):
            def run(q, k, v):
                tensors = (torch.from_numpy(x) for x in (q, k, v))
                return fn(*tensors, *args, **kw, kernel="math", **extra).numpy()

            return run

        found["torch math"] = torch_path(gpu.dilated_attention)
        found["torch simulated ring, math"] = torch_path(
            gpu.simulated_ring_dilated_attention, world_size=case.world_size
        )
    return found


def test_the_issue_example_one_row_only():
    """v[0, 3, 0, 0] = NaN, one pattern (4,), (1,), causal, n = 4: key 3 is seen by query 3."""
    case = Case(1, 4, 2, 3, (4,), (1,), True, "longnet", world_size=2)
    q, k, v = case.inputs(seed=1)
    v[0, 3, 0, 0] = np.nan
    for name, fn in paths(case).items():
        nan_rows = np.isnan(fn(q, k, v)).any(axis=-1)  # (b, n, h)
        expected = np.zeros_like(nan_rows)
        expected[0, 3, 0] = True
        assert (nan_rows == expected).all(), name


@pytest.mark.parametrize("which", ["v", "k"])
@pytest.mark.parametrize("seed", range(6))
def test_exactly_the_rows_that_attend_a_non_finite_key(which: str, seed: int):
    rng = np.random.default_rng(seed)
    case = random_case(rng, int(rng.integers(1, 5)))
    key, head = int(rng.integers(case.seq_len)), int(rng.integers(case.num_heads))
    q, k, v = case.inputs(seed=1)
    # inf in a value, or NaN (an inf in k may score -inf: that key then gets no weight)
    bad_value = np.inf if seed % 2 and which == "v" else np.nan
    (v if which == "v" else k)[:, key, head, int(rng.integers(case.head_dim))] = bad_value
    expected = attending_rows(case, key, head)
    for name, fn in paths(case).items():
        out = fn(q, k, v)
        bad = ~np.isfinite(out).all(axis=-1)  # (b, n, h)
        assert (bad[:, :, head] == expected).all(), f"{name}: {case.describe()}"
        others = np.delete(bad, head, axis=2)
        assert not others.any(), f"{name}: another head got non-finite rows"


@pytest.mark.parametrize("name", ["dense definition", "reference", "simulated ring"])
def test_a_scale_that_overflows_the_scores_is_a_clear_error(name):
    """softmax_scale = 1e308 makes scale * q.k infinite in float64 where the definition's
    softmax is not: a ValueError naming softmax_scale, not rows of NaN."""
    case = Case(1, 8, 2, 4, (4, 8), (1, 2), False, "longnet", world_size=2)
    q, k, v = case.inputs(seed=3)
    args = (case.segment_lengths, case.dilation_rates)
    call = {
        "dense definition": lambda: dense_dilated_attention(q, k, v, *args, softmax_scale=1e308),
        "reference": lambda: dilated_attention(q, k, v, *args, softmax_scale=1e308),
        "simulated ring": lambda: ring_dilated_attention(
            q, k, v, *args, world_size=2, softmax_scale=1e308
        ),
    }[name]
    with pytest.raises(Exception, match=r"softmax_scale: 1e\+308 times the largest \|q.k\|"):
        call()
    big = dilated_attention(q, k, v, *args, softmax_scale=1e300)  # no overflow: the answer
    assert np.isfinite(big).all()


def test_backward_names_an_overflowing_scale():
    from ringsim.reference import dilated_attention_backward

    case = Case(1, 8, 2, 4, (8,), (1,), True, "longnet")
    q, k, v = case.inputs(seed=4)
    out, lse = dilated_attention(q, k, v, (8,), (1,), is_causal=True, return_lse=True)
    with pytest.raises(ValueError, match="softmax_scale"):
        dilated_attention_backward(
            q, k, v, out, lse, np.ones_like(out), (8,), (1,), is_causal=True, softmax_scale=1e308
        )


def test_an_infinite_input_is_not_taken_for_an_overflow():
    """q = inf at one row: its scores are infinite, but that is spec §7's NaN row, not an
    overflow of the scale: only that row (and head) is NaN."""
    case = Case(1, 8, 2, 4, (8,), (1,), False, "longnet")
    q, k, v = case.inputs(seed=5)
    q[0, 2, 1, 0] = np.inf
    out = dilated_attention(q, k, v, (8,), (1,))
    nan_rows = np.isnan(out).any(axis=-1)[0]
    assert nan_rows[2, 1] and nan_rows.sum() == 1
