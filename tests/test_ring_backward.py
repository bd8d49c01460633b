"""The backward of the simulated NumPy ring against the dense-mask gradient, its trace, and
the mutant that drops the dK/dV return trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from grad_oracle import dense_gradients
from ring_support import ALIGNED, WORLD_SIZES, ring_cases, run_ring

import ringsim.reference.ring_backward as ring_backward
from ringsim.cases import Case
from ringsim.comm import CommError, Fault, FaultKind
from ringsim.config import make_config
from ringsim.reference import dilated_attention_backward, ring_dilated_attention_backward
from ringsim.tolerance import max_abs_error, tolerance


def backward(case: Case, q, k, v, out, lse, dout, dlse=None):
    return ring_dilated_attention_backward(
        q,
        k,
        v,
        out,
        lse,
        dout,
        case.segment_lengths,
        case.dilation_rates,
        world_size=case.world_size,
        **case.kwargs(),
        dlse=dlse,
        return_trace=True,
        timeout=20.0,
        layout=case.layout,
    )


def grad_failures(cases, dtype=np.float64, with_dlse: bool = False) -> list[str]:
    """Cases whose ring gradients differ from the dense-mask gradient (empty: all pass)."""
    failures = []
    for i, case in enumerate(cases):
        q, k, v = case.inputs(seed=i, dtype=dtype)
        rng = np.random.default_rng(1000 + i)
        dout = rng.standard_normal(q.shape).astype(dtype)
        try:
            out, lse, _ = run_ring(case, q, k, v)
            dlse = np.where(np.isinf(lse), 0, rng.standard_normal(lse.shape)) if with_dlse else None
            dlse = None if dlse is None else dlse.astype(dtype)
            *grads, _ = backward(case, q, k, v, out, lse, dout, dlse)
        except Exception as err:  # a mutant may break the ring outright: a detected failure
            failures.append(f"{case.describe()}: {type(err).__name__}: {err}")
            continue
        want = dense_gradients(case, q, k, v, dout, dlse)
        errors = [max_abs_error(g, w) for g, w in zip(grads, want)]
        if max(errors) > tolerance(dtype) * 10:  # gradients sum ~n terms: 10x the out bound
            failures.append(f"{case.describe()}: dq/dk/dv errors {errors}")
    return failures


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_backward_matches_definition(world_size, layout):
    failures = grad_failures(ring_cases([world_size], per_size=6, layout=layout))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_backward_float32_and_dlse(layout):
    cases = ring_cases([1, 3, 4], per_size=2, seed=8, layout=layout)
    assert not grad_failures(cases, dtype=np.float32)
    assert not grad_failures(cases, with_dlse=True)


def test_ring_backward_equals_single_process():
    case = Case(2, 30, 5, 4, (7, 13, 30), (2, 3, 4), True, "longnet", 5)
    q, k, v = case.inputs(seed=11)
    dout = np.random.default_rng(2).standard_normal(q.shape)
    out, lse, _ = run_ring(case, q, k, v)
    *grads, _ = backward(case, q, k, v, out, lse, dout)
    single = dilated_attention_backward(
        q, k, v, out, lse, dout, case.segment_lengths, case.dilation_rates, **case.kwargs()
    )
    for got, want in zip(grads, single):
        np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)


def grad_closed_form(config, num_heads, batch, head_dim, n, p, rank, itemsize=8) -> int:
    """The dK/dV bytes ``rank`` sends on an aligned configuration: non-causal, g - 1 hops on
    and one home; causal, place a < g - 1 forwards a + 1 blocks and place g - 1 sends g - 1
    home."""
    c, total = n // p, 0
    for w_eff, r, heads in zip(
        config.effective_segment_lengths(n), config.dilation_rates, config.head_groups(num_heads)
    ):
        g = w_eff // c
        if g <= 1:
            continue
        place = (rank * c % w_eff) // c
        last = place == g - 1
        messages = (g - 1 if last else place + 1) if config.is_causal else g
        total += 2 * messages * batch * len(heads) * (c // r) * head_dim * itemsize
    return total


@pytest.mark.parametrize("causal", [False, True])
def test_backward_trace_bytes_match_closed_form(causal):
    for segs, rates, n, p, heads, mode in ALIGNED:
        case = Case(2, n, heads, 3, segs, rates, causal, mode, p)
        q, k, v = case.inputs(seed=5)
        out, lse, forward_trace = run_ring(case, q, k, v)
        *_, trace = backward(case, q, k, v, out, lse, np.ones_like(q))
        config = make_config(segs, rates, is_causal=causal, mode=mode)
        for rank in range(p):
            # the K/V travel exactly as in the forward; dK/dV as the closed form says
            assert trace.sent_bytes(rank, grads=False) == forward_trace.sent_bytes(rank)
            want = grad_closed_form(config, heads, 2, 3, n, p, rank)
            assert trace.sent_bytes(rank, grads=True) == want, (case.describe(), rank)


def test_return_trip_goes_to_owner():
    case = Case(1, 24, 2, 2, (24,), (1,), True, "longnet", 4)
    q, k, v = case.inputs()
    out, lse, _ = run_ring(case, q, k, v)
    *_, trace = backward(case, q, k, v, out, lse, np.ones_like(q))
    home = [e for e in trace.events if e.detail == "dk,dv return" and e.action.value == "send"]
    assert {(e.rank, e.peer) for e in home} == {(3, 0), (3, 1), (3, 2)}


def test_dropped_return_trip_is_killed(monkeypatch):
    """Mutant: dK/dV never go home (the return transfers are dropped on every rank)."""
    real = ring_backward.rank_plan
    monkeypatch.setattr(
        ring_backward,
        "rank_plan",
        lambda *a, **kw: dataclasses.replace(real(*a, **kw), returns=()),
    )
    assert grad_failures(ring_cases([2, 4], per_size=1))


def test_backward_fault_fails_cleanly():
    case = Case(1, 16, 2, 2, (16,), (1,), False, "longnet", 4)
    q, k, v = case.inputs()
    out, lse, _ = run_ring(case, q, k, v)
    with pytest.raises(CommError):
        ring_dilated_attention_backward(
            q,
            k,
            v,
            out,
            lse,
            np.ones_like(q),
            (16,),
            (1,),
            world_size=4,
            faults=[Fault(FaultKind.CRASH, rank=2, message=1)],
            timeout=5.0,
        )


def test_backward_rejects_bad_shapes():
    case = Case(1, 16, 2, 2, (16,), (1,), False, "longnet", 4)
    q, k, v = case.inputs()
    out, lse, _ = run_ring(case, q, k, v)
    with pytest.raises(ValueError, match="dout"):
        ring_dilated_attention_backward(
            q, k, v, out, lse, np.ones((1, 16, 2, 3)), (16,), (1,), world_size=4
        )
