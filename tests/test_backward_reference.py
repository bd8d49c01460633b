"""The NumPy backward of single-process dilated attention against two independent oracles.

1. Central finite differences of ``dilated_attention`` along random directions, on fixed
   cases (causal and not, r > 1, ragged, w > n, both modes, several pairs, rows with no key).
2. Torch autograd of the dense-mask formula (spec §4) in float64, with the mixing weights
   *not* detached, on hypothesis configurations, with a dlse term.

Then: the fused form equals the chain form, float32 stays close to float64, bad shapes are
refused, and the detached-weights mutant (pitfall 14) fails both oracles.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from grad_oracle import torch_gradients
from hypothesis import given, settings
from strategies import case as make_case
from strategies import configs

from ringsim.cases import Case
from ringsim.conformance.mutants import BACKWARD_MUTANTS
from ringsim.reference import dilated_attention
from ringsim.reference.backward import (
    dilated_attention_backward,
    dilated_attention_backward_chain,
    mix_backward,
)
from ringsim.tolerance import max_abs_error, tolerance

Backward = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
FORMS: dict[str, Backward] = {
    "fused": dilated_attention_backward,
    "chain": dilated_attention_backward_chain,
}

#: Fixed cases for the finite differences, each named for what it covers.
FD_CASES: tuple[Case, ...] = (
    make_case((8,), (1,), 12, num_heads=2, seed=201, label="one pattern, r=1"),
    make_case((6, 12), (1, 2), 20, num_heads=3, is_causal=True, seed=202, label="causal, ragged"),
    make_case((10,), (3,), 16, num_heads=3, is_causal=True, seed=203, label="r∤w, empty rows"),
    make_case(
        (4, 6),
        (6, 3),
        14,
        num_heads=6,
        is_causal=True,
        mode="grouped",
        seed=204,
        label="r > w, grouped, causal",
    ),
    make_case((64, 8), (2, 1), 24, num_heads=2, is_causal=True, seed=205, label="w > n, causal"),
    make_case(
        (5, 9, 13, 50),
        (2, 3, 4, 7),
        30,
        num_heads=4,
        batch=2,
        head_dim=3,
        softmax_scale=0.8,
        seed=206,
        label="4 pairs, batch 2, scale",
    ),
    make_case((4, 4), (1, 1), 10, num_heads=2, seed=207, label="a key chosen twice"),
)


def probe(case: Case, dtype=np.float64) -> tuple[np.ndarray, ...]:
    """q, k, v of the case and random dout ``(b, n, h, d)``, dlse ``(b, h, n)`` to pull back."""
    q, k, v = case.inputs(dtype=dtype)
    rng = np.random.default_rng(case.seed + 1)
    dout = rng.standard_normal(case.shape).astype(dtype)
    dlse = rng.standard_normal((case.batch, case.num_heads, case.seq_len)).astype(dtype)
    return q, k, v, dout, dlse


def gradients(backward: Backward, case: Case, q, k, v, dout, dlse) -> tuple[np.ndarray, ...]:
    """Run the forward, then ``backward`` with the forward's out and lse."""
    args = (case.segment_lengths, case.dilation_rates)
    out, lse = dilated_attention(q, k, v, *args, **case.kwargs(), return_lse=True)
    return backward(q, k, v, out, lse, dout, *args, **case.kwargs(), dlse=dlse)


def objective(case: Case, q, k, v, dout, dlse) -> float:
    """``J = <dout, out> + <dlse, lse>`` over the rows with a key, whose gradient is the
    backward of (dout, dlse): a row with no key has the constant lse -inf."""
    out, lse = dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs(), return_lse=True
    )
    return float((dout * out).sum() + np.where(np.isfinite(lse), dlse * lse, 0.0).sum())


def fd_failures(backward: Backward, cases, directions: int = 2, eps: float = 1e-5) -> list[str]:
    """Compare ``<grad, u>`` with ``(J(x + eps u) - J(x - eps u)) / (2 eps)`` for random u."""
    failures = []
    for case in cases:
        q, k, v, dout, dlse = probe(case)
        grads = gradients(backward, case, q, k, v, dout, dlse)
        rng = np.random.default_rng(case.seed + 2)
        for i, name in enumerate("qkv"):
            for _ in range(directions):
                u = rng.standard_normal(case.shape)
                ends = []
                for sign in (1, -1):
                    inputs = [q, k, v]
                    inputs[i] = inputs[i] + sign * eps * u
                    ends.append(objective(case, *inputs, dout, dlse))
                numeric = (ends[0] - ends[1]) / (2 * eps)
                analytic = float((grads[i] * u).sum())
                if not abs(numeric - analytic) <= 1e-6 * (1 + abs(analytic)):
                    failures.append(
                        f"{case.describe()}: d{name} {analytic:.9g} vs fd {numeric:.9g}"
                    )
    return failures


def autograd_failures(backward: Backward, cases) -> list[str]:
    """Cases whose ``backward`` differs from torch autograd by more than spec §9's float64 bound."""
    failures, tol = [], tolerance(np.float64)
    for case in cases:
        q, k, v, dout, dlse = probe(case)
        want_out, want_lse, *want = torch_gradients(case, q, k, v, dout, dlse)
        out, lse = dilated_attention(
            q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs(), return_lse=True
        )
        assert max_abs_error(out, want_out) <= tol and max_abs_error(lse, want_lse) <= tol
        got = gradients(backward, case, q, k, v, dout, dlse)  # dlse on empty rows is ignored
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            error = max_abs_error(g, w)
            if not error <= tol:
                failures.append(f"{case.describe()}: {name} max abs error {error:.3e} > {tol:.0e}")
    return failures


# --- the two oracles ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", sorted(FORMS))
def test_finite_differences(form: str) -> None:
    failures = fd_failures(FORMS[form], FD_CASES)
    assert failures == [], "\n".join(failures)


def test_fd_cases_cover_the_brief() -> None:
    cases = FD_CASES
    pairs = [(w, r, c) for c in cases for w, r in zip(c.segment_lengths, c.dilation_rates)]
    assert {c.is_causal for c in cases} == {False, True}
    assert {c.mode for c in cases} == {"longnet", "grouped"}
    assert any(c.seq_len % min(w, c.seq_len) for w, _, c in pairs)  # ragged last segment
    assert any(w > c.seq_len for w, _, c in pairs)
    assert any(r > 1 and c.is_causal for _, r, c in pairs)
    assert any(len(c.segment_lengths) >= 3 for c in cases)
    empty_rows = 0
    for case in cases:
        q, k, v = case.inputs()
        _, lse = dilated_attention(
            q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs(), return_lse=True
        )
        empty_rows += int(np.isneginf(lse).sum())
    assert empty_rows > 0


@pytest.mark.parametrize("form", sorted(FORMS))
def test_autograd_fixed_cases(form: str) -> None:
    failures = autograd_failures(FORMS[form], FD_CASES)
    assert failures == [], "\n".join(failures)


@settings(max_examples=40, deadline=None)
@given(configs(max_seq_len=40))
def test_autograd_random_configs(case: Case) -> None:
    failures = autograd_failures(dilated_attention_backward, [case])
    assert failures == [], "\n".join(failures)


@settings(max_examples=40, deadline=None)
@given(configs(max_seq_len=40))
def test_fused_equals_chain(case: Case) -> None:
    q, k, v, dout, dlse = probe(case)
    fused = gradients(dilated_attention_backward, case, q, k, v, dout, dlse)
    chain = gradients(dilated_attention_backward_chain, case, q, k, v, dout, dlse)
    for name, a, b in zip(("dq", "dk", "dv"), fused, chain):
        assert max_abs_error(a, b) <= 1e-12, f"{case.describe()}: {name}"


# --- dtypes, empty rows, mixing, bad input -----------------------------------------------------


@pytest.mark.parametrize("form", sorted(FORMS))
def test_float32_close_to_float64(form: str) -> None:
    for case in FD_CASES:
        wide = probe(case)
        narrow = tuple(x.astype(np.float32) for x in wide)
        grads32 = gradients(FORMS[form], case, *narrow)
        grads64 = gradients(FORMS[form], case, *(x.astype(np.float64) for x in narrow))
        for name, a, b in zip(("dq", "dk", "dv"), grads32, grads64):
            assert a.dtype == np.float32, name
            error = max_abs_error(a, b)
            assert error <= tolerance(np.float32), f"{case.describe()}: {name} {error:.2e}"


def test_rows_with_no_key_get_zero_and_no_nan() -> None:
    """r = 3 with one pattern: two rows in three have no key (lse = -inf); their q gets no
    gradient, and a dlse there, however large, changes nothing."""
    case = make_case((9,), (3,), 18, num_heads=1, seed=208)
    q, k, v, dout, dlse = probe(case)
    _, lse = dilated_attention(q, k, v, (9,), (3,), return_lse=True)
    empty = np.isneginf(lse)[0, 0]
    assert empty.sum() == 12
    grads = gradients(dilated_attention_backward, case, q, k, v, dout, dlse)
    assert all(np.isfinite(g).all() for g in grads)
    assert (grads[0][:, empty] == 0).all() and (grads[1][:, empty] == 0).all()
    for form in FORMS.values():
        for on_empty in (0.0, 1e6):
            again = gradients(form, case, q, k, v, dout, np.where(empty, on_empty, dlse))
            assert all(max_abs_error(a, b) <= 1e-12 for a, b in zip(again, grads))


def test_mix_backward_weights_and_empty_rows() -> None:
    """Two patterns on 3 rows: both live, one empty, both empty (L = -inf)."""
    rng = np.random.default_rng(5)
    outs = [rng.standard_normal((1, 3, 1, 2)) for _ in range(2)]
    lses = [np.array([[[0.3, 1.0, -np.inf]]]), np.array([[[-0.4, -np.inf, -np.inf]]])]
    lse = np.logaddexp(*lses)
    with np.errstate(invalid="ignore"):
        weights = [np.where(np.isneginf(x), 0.0, np.exp(x - lse)) for x in lses]
    out = sum(w[0, 0][None, :, None, None] * o for w, o in zip(weights, outs))
    dout, dlse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    grads = mix_backward(outs, lses, out, lse, dout, dlse)
    for (d_out, d_lse), w, o in zip(grads, weights, outs):
        assert np.allclose(d_out, w[0, 0][None, :, None, None] * dout, rtol=0, atol=1e-15)
        share = ((dout * (o - out)).sum(-1)[0, :, 0] + dlse[0, 0]) * w[0, 0]
        assert np.allclose(d_lse[0, 0], share, rtol=0, atol=1e-15)
    assert grads[1][1][0, 0, 1] == 0 and all(g[1][0, 0, 2] == 0 for g in grads)
    assert all(np.isfinite(x).all() for pair in grads for x in pair)


@pytest.mark.parametrize(
    ("name", "shape_of"),
    [
        ("out", lambda b, n, h, d: (b, n, h, d + 1)),
        ("lse", lambda b, n, h, d: (b, n, h)),
        ("dout", lambda b, n, h, d: (b, n + 1, h, d)),
        ("dlse", lambda b, n, h, d: (b, h, n, 1)),
    ],
)
@pytest.mark.parametrize("form", sorted(FORMS))
def test_bad_shape_names_the_argument(form: str, name: str, shape_of) -> None:
    b, n, h, d = 1, 8, 2, 4
    q, k, v, dout, dlse = probe(make_case((4,), (2,), n, num_heads=h, head_dim=d, seed=209))
    out, lse = dilated_attention(q, k, v, (4,), (2,), return_lse=True)
    args = dict(out=out, lse=lse, dout=dout, dlse=dlse)
    args[name] = np.zeros(shape_of(b, n, h, d))
    with pytest.raises(ValueError, match=rf"^{name}: shape"):
        FORMS[form](q, k, v, args["out"], args["lse"], args["dout"], (4,), (2,), dlse=args["dlse"])


def test_bad_config_raises_like_the_forward() -> None:
    q, k, v, dout, _ = probe(make_case((4,), (2,), 8, seed=210))
    out, lse = dilated_attention(q, k, v, (4,), (2,), return_lse=True)
    with pytest.raises(ValueError, match="dilation_rates"):
        dilated_attention_backward(q, k, v, out, lse, dout, (4,), (0,))
    with pytest.raises(TypeError, match="q: dtype"):
        dilated_attention_backward(
            *(x.astype(np.float16) for x in (q, k, v)), out, lse, dout, (4,), (2,)
        )


# --- pitfall 14: detached mixing weights ------------------------------------------------------

#: Several pairs per head, so the mixing weights matter.
MUTANT_CASES = tuple(c for c in FD_CASES if len(c.segment_lengths) > 1)


def test_chain_form_passes_unmutated() -> None:
    assert fd_failures(dilated_attention_backward_chain, MUTANT_CASES, directions=1) == []
    assert autograd_failures(dilated_attention_backward_chain, MUTANT_CASES) == []


@pytest.mark.parametrize("name", sorted(BACKWARD_MUTANTS))
def test_backward_mutant_is_killed(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    BACKWARD_MUTANTS[name].apply(monkeypatch)
    description = BACKWARD_MUTANTS[name].description
    assert fd_failures(dilated_attention_backward_chain, MUTANT_CASES, directions=1), description
    assert autograd_failures(dilated_attention_backward_chain, MUTANT_CASES), description
