"""key_padding_mask in the NumPy reference (spec §1): a padded position is never a key.

The dense definition against a row-by-row formula written here; single-process dilated
attention against the definition; the gradients against torch autograd of the definition
with the same mask, in the fused and the chain form; rows left with no key; bad masks.
"""

from __future__ import annotations

import numpy as np
import pytest
from grad_oracle import dense_gradients

from ringsim.cases import Case, fixed_cases, grouped_query, random_case
from ringsim.config import make_config
from ringsim.reference import (
    dense_dilated_attention,
    dilated_attention,
    dilated_attention_backward,
    dilated_attention_backward_chain,
    pattern_mask,
)
from ringsim.tolerance import max_abs_error


def cases(count: int = 12, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    return fixed_cases(1) + [random_case(rng, 1, max_shard=20) for _ in range(count)]


def padding(case: Case, seed: int, rate: float = 0.3) -> np.ndarray:
    """A random ``(batch, seq_len)`` mask, True = padding; the first row of each batch
    element padded everywhere, so some rows keep no key."""
    mask = np.random.default_rng(seed).random((case.batch, case.seq_len)) < rate
    mask[0] = True
    return mask


def by_rows(case: Case, q, k, v, pad) -> np.ndarray:
    """spec §1-§4 one query row at a time: each pattern's softmax over the keys its mask
    allows and the padding leaves, mixed by the patterns' log-sum-exps."""
    config = make_config(case.segment_lengths, case.dilation_rates, **case.kwargs())
    b, n, h, d = q.shape
    ratio = h // k.shape[2]
    out = np.zeros_like(q)
    masks = {}
    for batch in range(b):
        for head, patterns in enumerate(config.head_patterns(h)):
            for x in range(n):
                parts = []
                for p in patterns:
                    if p not in masks:
                        masks[p] = pattern_mask(p, n, is_causal=case.is_causal)
                    keys = masks[p][x] & ~pad[batch]
                    if keys.any():
                        s = config.scale(d) * k[batch, keys, head // ratio] @ q[batch, x, head]
                        lse = s.max() + np.log(np.exp(s - s.max()).sum())
                        parts.append((lse, np.exp(s - lse) @ v[batch, keys, head // ratio]))
                if parts:
                    total = np.logaddexp.reduce([lse for lse, _ in parts])
                    out[batch, x, head] = sum(np.exp(lse - total) * o for lse, o in parts)
    return out


@pytest.mark.parametrize("gqa", [False, True])
def test_the_definition_equals_the_row_by_row_formula(gqa):
    chosen = cases(4)
    chosen = grouped_query(chosen, 1) if gqa else chosen
    for i, case in enumerate(chosen):
        q, k, v = case.inputs(seed=i)
        pad = padding(case, i)
        out, lse = dense_dilated_attention(q, k, v, case.segment_lengths, case.dilation_rates,
                                           **case.kwargs(), key_padding_mask=pad)  # fmt: skip
        assert max_abs_error(out, by_rows(case, q, k, v, pad)) <= 1e-12, case.describe()
        assert np.isneginf(lse[0]).all() and (out[0] == 0).all()  # nothing left to attend


def test_single_process_matches_the_definition_and_gradients_match_autograd():
    for i, case in enumerate(cases() + grouped_query(cases(4, seed=3), 2)):
        q, k, v = case.inputs(seed=i)
        pad = padding(case, i)
        args = (case.segment_lengths, case.dilation_rates)
        kwargs = {**case.kwargs(), "key_padding_mask": pad}
        out, lse = dilated_attention(q, k, v, *args, **kwargs, return_lse=True)
        want_out, want_lse = dense_dilated_attention(q, k, v, *args, **kwargs)
        assert max_abs_error(out, want_out) <= 1e-10 and max_abs_error(lse, want_lse) <= 1e-10
        dout = case.upstream(seed=i)
        want = dense_gradients(case, q, k, v, dout, key_padding=pad)
        for form in (dilated_attention_backward, dilated_attention_backward_chain):
            grads = form(q, k, v, out, lse, dout, *args, **kwargs)
            for got, expect in zip(grads, want):
                assert max_abs_error(got, expect) <= 1e-10, (form.__name__, case.describe())
            assert (grads[1][pad] == 0).all() and (grads[2][pad] == 0).all()


def test_no_padding_is_the_same_as_no_mask():
    case = cases(1)[-1]
    q, k, v = case.inputs()
    args = (case.segment_lengths, case.dilation_rates)
    none = np.zeros((case.batch, case.seq_len), dtype=bool)
    with_mask = dilated_attention(q, k, v, *args, **case.kwargs(), key_padding_mask=none)
    assert np.array_equal(with_mask, dilated_attention(q, k, v, *args, **case.kwargs()))


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        (np.zeros((1, 8)), TypeError, "key_padding_mask: expected a NumPy bool array"),
        (np.zeros((2, 8), dtype=bool), ValueError, r"key_padding_mask: shape must be"),
        (np.zeros((1, 4), dtype=bool), ValueError, r"key_padding_mask: shape must be"),
    ],
)
def test_a_bad_mask_is_named(mask, error, message):
    q = np.zeros((1, 8, 2, 3))
    with pytest.raises(error, match=message):
        dilated_attention(q, q, q, (4,), (1,), key_padding_mask=mask)
    with pytest.raises(error, match=message):
        dense_dilated_attention(q, q, q, (4,), (1,), key_padding_mask=mask)
