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
from ringsim.reference.simulate import ring_dilated_attention, ring_dilated_attention_backward
from ringsim.tolerance import max_abs_error
from ringsim.trace import closed_form_bytes


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


# --- the ring: the mask travels with the keys ----------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_the_ring_matches_the_definition_forward_and_backward(world_size, layout):
    rng = np.random.default_rng(world_size)
    ring_cases = fixed_cases(world_size, layout) + [
        random_case(rng, world_size, layout=layout) for _ in range(3)
    ]
    ring_cases += grouped_query(ring_cases[:3], world_size)
    for i, case in enumerate(ring_cases):
        q, k, v = case.inputs(seed=i)
        pad = padding(case, i)
        args = (case.segment_lengths, case.dilation_rates)
        kwargs = {**case.kwargs(), "key_padding_mask": pad, "layout": layout}
        out, lse = ring_dilated_attention(q, k, v, *args, world_size=world_size, **kwargs,
                                          return_lse=True)  # fmt: skip
        want_out, want_lse = dense_dilated_attention(q, k, v, *args, **case.kwargs(),
                                                     key_padding_mask=pad)  # fmt: skip
        assert max_abs_error(out, want_out) <= 1e-10, case.describe()
        assert max_abs_error(lse, want_lse) <= 1e-10, case.describe()
        dout = case.upstream(seed=i)
        grads = ring_dilated_attention_backward(q, k, v, out, lse, dout, *args,
                                                world_size=world_size, **kwargs)  # fmt: skip
        want = dilated_attention_backward(q, k, v, want_out, want_lse, dout, *args,
                                          **case.kwargs(), key_padding_mask=pad)  # fmt: skip
        for got, expect in zip(grads, want):
            assert max_abs_error(got, expect) <= 1e-10, case.describe()


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_ring_bytes_with_the_mask_match_the_closed_form(layout, is_causal):
    """Each selected row carries one padding value per pattern group, in q's dtype."""
    w, r, n, p, h = ((8, 16, 32), (1, 2, 4), 32, 4, 4) if layout == "contiguous" else (
        (24, 48), (1, 2), 48, 4, 4)  # fmt: skip
    case = Case(2, n, h, 3, w, r, is_causal, world_size=p, layout=layout)
    q, k, v = case.inputs()
    _, trace = ring_dilated_attention(q, k, v, w, r, world_size=p, is_causal=is_causal,
                                      layout=layout, key_padding_mask=padding(case, 0),
                                      return_trace=True)  # fmt: skip
    config = make_config(w, r, is_causal=is_causal)
    for rank in range(p):
        want = closed_form_bytes(config, h, 2, 3, n, p, rank, layout=layout, key_padding=True)
        assert trace.sent_bytes(rank, grads=False) == want
        assert want > closed_form_bytes(config, h, 2, 3, n, p, rank, layout=layout) or not want


def test_ranks_that_disagree_on_the_mask_fail_together():
    """One rank with a mask, the others without: every rank fails with one message."""
    from ringsim.comm import SimulatedCluster
    from ringsim.reference import ring_dilated_attention_shard

    q = np.random.default_rng(0).standard_normal((1, 4, 2, 3))

    def rank_fn(comm):
        mask = np.zeros((1, 4), dtype=bool) if comm.rank == 1 else None
        return ring_dilated_attention_shard(q, q, q, (8,), (1,), comm=comm, key_padding_mask=mask)

    with pytest.raises(Exception, match="key_padding=True"):
        SimulatedCluster(2, timeout=5.0).run(rank_fn)


@pytest.mark.parametrize(
    ("bias", "message"),
    [(np.zeros((7, 7)), r"attn_bias: shape must be"), (np.full((8, 8), np.nan), "NaN or \\+inf")],
)
def test_a_bad_pair_bias_is_named(bias, message):
    q = np.zeros((1, 8, 2, 3))
    with pytest.raises(ValueError, match=message):
        dense_dilated_attention(q, q, q, (4,), (1,), attn_bias=bias)


def test_a_pair_bias_of_key_columns_is_key_padding():
    """-inf on the columns of padded keys is the key padding mask (two ways to the same
    definition)."""
    case = cases(1)[-1]
    q, k, v = case.inputs()
    pad = padding(case, 0)
    args = (case.segment_lengths, case.dilation_rates)
    columns = np.where(pad[:, None, None, :], -np.inf, 0.0)
    columns = np.broadcast_to(columns, (case.batch, case.num_heads, case.seq_len, case.seq_len))
    by_bias = dense_dilated_attention(q, k, v, *args, **case.kwargs(), attn_bias=columns)
    by_pad = dense_dilated_attention(q, k, v, *args, **case.kwargs(), key_padding_mask=pad)
    assert max(max_abs_error(a, b) for a, b in zip(by_bias, by_pad)) == 0.0
