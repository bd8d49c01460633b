"""Grouped-query attention: k and v with fewer heads than q (spec §1).

Every path against the dense-mask definition (which reads K/V head ``h // (H / H_kv)``
directly): the NumPy reference single process, on the simulated ring at P = 1..8 in both
layouts and under MPI; the torch backend on one device and its ring on the simulated
cluster (real gloo processes: ``test_gpu_ring.py``); gradients against torch autograd of the
definition; the bytes the NumPy and torch rings send against the closed form, which counts
each selected row once per K/V head; and the errors of a bad number of K/V heads.
"""

from __future__ import annotations

import functools

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
)
from ringsim.reference.parity import check_case
from ringsim.reference.simulate import ring_dilated_attention_backward, run_case
from ringsim.tolerance import max_abs_error
from ringsim.trace import closed_form_bytes


def gqa_cases(world_size: int, layout: str = "contiguous", count: int = 4, seed: int = 0):
    """The hand-picked ring cases and random ones, with 1 (MQA) to 3 K/V heads."""
    rng = np.random.default_rng(seed + world_size)
    cases = fixed_cases(world_size, layout) + [
        random_case(rng, world_size, layout=layout) for _ in range(count)
    ]
    return grouped_query(cases, seed + world_size)


def expanded(x: np.ndarray, heads: int) -> np.ndarray:
    """K or V repeated to ``heads`` heads, each K/V head for its block of query heads."""
    return np.repeat(x, heads // x.shape[2], axis=2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_every_path_matches_the_definition(world_size, layout):
    for i, case in enumerate(gqa_cases(world_size, layout)):
        q, k, v = case.inputs(seed=i)
        assert k.shape[2] == case.num_kv_heads < q.shape[2] or case.num_kv_heads == q.shape[2]
        single = check_case(case, *dilated_attention(
            q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs(), return_lse=True
        ), q, k, v)  # fmt: skip
        assert single.ok, single.line()
        out, lse, _ = run_case(case, q, k, v, timeout=20.0)
        ring = check_case(case, out, lse, q, k, v)
        assert ring.ok, ring.line()
        if torch is not None:
            out, lse, _ = torch_ring(case, q, k, v)
            ring = check_case(case, out, lse, q, k, v)
            assert ring.ok, "torch: " + ring.line()


try:
    import torch
except ImportError:  # the NumPy paths run without torch
    torch = None


def torch_ring(case: Case, q, k, v):
    """``case`` on the torch ring over the simulated cluster (math kernel, float64): global
    out, lse and the trace; the gradients of <dout, out> are in the tensors' ``grad``."""
    from ringsim.gpu import simulated_ring_dilated_attention

    tensors = [torch.from_numpy(x) for x in (q, k, v)]
    out, lse, trace = simulated_ring_dilated_attention(
        *tensors, case.segment_lengths, case.dilation_rates, world_size=case.world_size,
        **case.kwargs(), return_lse=True, return_trace=True, kernel="math", layout=case.layout,
    )  # fmt: skip
    return out.numpy(), lse.numpy(), trace


def test_the_definition_reads_the_right_kv_head():
    """With K/V repeated per query head, the definition gives what it gives with GQA: the
    mapping h -> h // ratio is the one spec §1 states (a head reading another K/V head's
    block, e.g. h % H_kv, differs)."""
    case = Case(2, 12, 6, 3, (4, 12), (2, 3), True, num_kv_heads=2)
    q, k, v = case.inputs()
    args = (case.segment_lengths, case.dilation_rates)
    gqa = dense_dilated_attention(q, k, v, *args, **case.kwargs())
    full = dense_dilated_attention(q, expanded(k, 6), expanded(v, 6), *args, **case.kwargs())
    assert max(max_abs_error(a, b) for a, b in zip(gqa, full)) == 0.0
    wrong = np.tile(k, (1, 1, 3, 1)), np.tile(v, (1, 1, 3, 1))  # head h reads h % 2
    other = dense_dilated_attention(q, *wrong, *args, **case.kwargs())
    assert max_abs_error(other[0], gqa[0]) > 0.1


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_gradients_match_autograd_of_the_definition(world_size):
    for i, case in enumerate(gqa_cases(world_size, count=2, seed=7)):
        q, k, v = case.inputs(seed=i)
        dout = case.upstream(seed=i)
        args = (case.segment_lengths, case.dilation_rates)
        out, lse = dilated_attention(q, k, v, *args, **case.kwargs(), return_lse=True)
        want = dense_gradients(case, q, k, v, dout)
        found = {
            "fused": dilated_attention_backward(q, k, v, out, lse, dout, *args, **case.kwargs()),
            "chain": dilated_attention_backward_chain(
                q, k, v, out, lse, dout, *args, **case.kwargs()
            ),
            "ring": ring_dilated_attention_backward(
                q, k, v, out, lse, dout, *args, world_size=world_size, **case.kwargs()
            ),
        }
        for name, grads in found.items():
            for got, expect, label in zip(grads, want, ("dq", "dk", "dv")):
                assert got.shape == expect.shape, (name, label)
                assert max_abs_error(got, expect) <= 1e-10, (name, label, case.describe())


ALIGNED = [  # (w, r, n, P, heads, kv heads, mode, layout)
    ((8, 16, 32), (1, 2, 4), 32, 4, 4, 2, "longnet", "contiguous"),
    ((32,), (1,), 32, 4, 8, 2, "longnet", "contiguous"),  # r = 1: a quarter of the bytes
    ((12, 24), (3, 2), 24, 2, 6, 2, "grouped", "contiguous"),
    ((24, 48), (1, 2), 48, 4, 4, 1, "longnet", "zigzag"),
    ((36,), (3,), 36, 3, 6, 2, "longnet", "zigzag"),
]


@pytest.mark.parametrize("aligned", ALIGNED, ids=lambda a: f"{a[-1]}-{a[4]}q-{a[5]}kv-{a[1]}")
@pytest.mark.parametrize("is_causal", [False, True])
def test_ring_bytes_count_each_row_once_per_kv_head(aligned, is_causal):
    w, r, n, p, h, hk, mode, layout = aligned
    case = Case(2, n, h, 3, w, r, is_causal, mode, p, layout=layout, num_kv_heads=hk)
    q, k, v = case.inputs()
    traces = {"numpy": run_case(case, q, k, v)[2]}
    if torch is not None:
        traces["torch"] = torch_ring(case, q, k, v)[2]
    config = make_config(w, r, is_causal=is_causal, mode=mode)
    for rank in range(p):
        want = closed_form_bytes(config, h, 2, 3, n, p, rank, layout=layout, num_kv_heads=hk)
        for name, trace in traces.items():
            assert trace.sent_bytes(rank) == want, (name, rank)
    trace = traces["numpy"]
    if r == (1,):  # one offset: every query head of a K/V head shares its rows
        full = closed_form_bytes(config, h, 2, 3, n, p, 0, layout=layout)
        assert trace.sent_bytes(0) * h == full * hk


@pytest.mark.parametrize(
    ("kv_heads", "v_heads", "message"),
    [
        (3, 3, "k: the number of K/V heads must divide q's"),
        (2, 4, "v: shape must equal q's|v: shape must equal k's"),
    ],
)
def test_bad_kv_heads_are_named(kv_heads, v_heads, message):
    q = np.zeros((1, 8, 4, 2))
    k, v = np.zeros((1, 8, kv_heads, 2)), np.zeros((1, 8, v_heads, 2))
    with pytest.raises(ValueError, match=message):
        dilated_attention(q, k, v, (4,), (1,))


def test_torch_takes_fewer_kv_heads_on_one_device_and_on_the_ring():
    """ringsim.gpu on one device repeats K/V per query head, its ring sends K/V heads
    (Note [Fewer K/V heads]): forward and gradients equal the reference's, dk and dv shaped
    like k and v."""
    if torch is None:
        pytest.skip("needs torch")
    from ringsim.gpu import dilated_attention as torch_dilated_attention
    from ringsim.gpu import simulated_ring_dilated_attention

    for i, case in enumerate(gqa_cases(1, count=4, seed=3) + gqa_cases(3, count=2, seed=4)):
        q, k, v = case.inputs(seed=i)
        args = (case.segment_lengths, case.dilation_rates)
        want_out, want_lse = dilated_attention(q, k, v, *args, **case.kwargs(), return_lse=True)
        dout = case.upstream(seed=i)
        want = dilated_attention_backward(q, k, v, want_out, want_lse, dout, *args,
                                          **case.kwargs())  # fmt: skip
        ring = functools.partial(simulated_ring_dilated_attention, kernel="math",
                                 world_size=case.world_size, layout=case.layout)  # fmt: skip
        paths = {"ring": ring}
        if case.world_size == 1:
            paths["one device"] = torch_dilated_attention
        for name, fn in paths.items():
            tensors = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
            out, lse = fn(*tensors, *args, **case.kwargs(), return_lse=True)
            assert max_abs_error(out.detach().numpy(), want_out) <= 1e-10, name
            assert max_abs_error(lse.detach().numpy(), want_lse) <= 1e-10, name
            out.backward(torch.tensor(dout))
            for t, expect in zip(tensors, want):
                assert t.grad.shape == expect.shape
                assert max_abs_error(t.grad.numpy(), expect) <= 1e-10, (name, case.describe())
