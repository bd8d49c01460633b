"""Attention dropout on the torch backend (Note [Dropout] in :mod:`ringsim.gpu.kernels.dropout`).

On one device and on the simulated ring, with the math kernel in float64: a run is
reproducible under ``torch.manual_seed``; p = 0 is no dropout; the lse is the one before
dropout (the patterns mix with the pre-dropout weights); the mean output over many seeds
is the output without dropout, within its standard error, and so are the mean gradients;
under a fixed seed (a fixed mask) the gradients pass ``torch.autograd.gradcheck``. The
modules drop in training only. Bad probabilities and kernels without dropout are named.
"""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")

from ringsim.cases import Case  # noqa: E402
from ringsim.gpu import (  # noqa: E402
    RingDilatedAttention,
    RingMultiheadDilatedAttention,
    choose_kernel,
    dilated_attention,
    simulated_ring_dilated_attention,
)

CASE = Case(2, 12, 4, 8, (4, 12), (1, 2), True)


def inputs(case: Case = CASE, seed: int = 0, requires_grad: bool = False):
    return [torch.from_numpy(x).requires_grad_(requires_grad) for x in case.inputs(seed=seed)]


def paths(case: Case = CASE):
    """One device and the simulated ring at P = 2 and 3 (zigzag), math kernel: each
    ``fn(q, k, v, **kwargs)``."""
    args, fixed = (case.segment_lengths, case.dilation_rates), {**case.kwargs(), "kernel": "math"}
    ring = functools.partial(simulated_ring_dilated_attention, timeout=30.0)

    def bind(fn, **more):
        return lambda q, k, v, **kwargs: fn(q, k, v, *args, **fixed, **more, **kwargs)

    return {
        "one device": bind(dilated_attention),
        "ring P=2": bind(ring, world_size=2),
        "ring P=3 zigzag": bind(ring, world_size=3, layout="zigzag"),
    }


@pytest.mark.parametrize("name", list(paths()))
def test_reproducible_pre_dropout_lse_and_p_zero(name):
    fn = paths()[name]
    q, k, v = inputs()
    plain, plain_lse = fn(q, k, v, return_lse=True)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(fn(q, k, v, dropout_p=0.3, return_lse=True))
    assert torch.equal(runs[0][0], runs[1][0])  # the same seed, the same masks
    assert (runs[0][0] - runs[2][0]).abs().max() > 1e-3  # another seed, other masks
    assert (runs[0][0] - plain).abs().max() > 1e-3  # dropout did something
    for _, lse in runs:  # the lse is the one before dropout
        assert torch.equal(lse, plain_lse)
    assert torch.equal(fn(q, k, v, dropout_p=0.0), plain)


@pytest.mark.parametrize("name", ["one device", "ring P=2"])
def test_the_mean_over_seeds_is_the_output_without_dropout(name):
    """E[out] = out without dropout (out is linear in the mask), and so is E[grad] for a
    loss linear in out: the mean over 300 seeds within 5 standard errors, every element."""
    fn = paths()[name]
    q, k, v = inputs(requires_grad=True)
    dout = torch.from_numpy(CASE.upstream(seed=1))
    plain = fn(q, k, v)
    plain_grads = torch.autograd.grad(plain, (q, k, v), dout)
    outs, grads = [], []
    for seed in range(300):
        torch.manual_seed(seed)
        out = fn(q, k, v, dropout_p=0.25)
        outs.append(out.detach())
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(out, (q, k, v), dout)]))
    for samples, want in ((outs, plain), (grads, torch.cat([g.flatten() for g in plain_grads]))):
        stack = torch.stack(samples)
        error = (stack.mean(0) - want.detach()).abs()
        standard = stack.std(0) / len(samples) ** 0.5
        assert (error <= 5 * standard + 1e-12).all(), float((error / (standard + 1e-30)).max())


@pytest.mark.parametrize("name", list(paths()))
@pytest.mark.parametrize("extra", ["plain", "padding", "gqa"])
def test_gradients_under_a_fixed_mask_pass_gradcheck(name, extra):
    case = Case(1, 12, 4, 2, (4, 12), (1, 2), True, num_kv_heads=2 if extra == "gqa" else None)
    fn = paths(case)[name]
    mask = torch.from_numpy(case.key_padding(2)) if extra == "padding" else None

    def fixed(q, k, v):
        torch.manual_seed(7)  # the same masks at every evaluation
        return fn(q, k, v, dropout_p=0.3, key_padding_mask=mask)

    # fast mode: random directions instead of every column of the Jacobian
    assert torch.autograd.gradcheck(fixed, inputs(case, requires_grad=True), fast_mode=True)


def test_modules_drop_in_training_only():
    q, k, v = inputs()
    module = RingDilatedAttention((4, 12), (1, 2), dropout=0.3, kernel="math")
    plain = dilated_attention(q, k, v, (4, 12), (1, 2), is_causal=True)
    assert torch.equal(module.eval()(q, k, v, is_causal=True), plain)
    torch.manual_seed(0)
    dropped = module.train()(q, k, v, is_causal=True)
    torch.manual_seed(0)
    assert torch.equal(dropped, dilated_attention(q, k, v, (4, 12), (1, 2), is_causal=True,
                                                  dropout_p=0.3, kernel="math"))  # fmt: skip
    assert (dropped - plain).abs().max() > 1e-3


def test_multihead_weights_in_training_are_the_dropped_ones_applied():
    """need_weights=True in training: the weights returned are dropped (zeros, the rest
    scaled) and the output is out_proj of those weights times v."""
    module = RingMultiheadDilatedAttention(16, 4, (6, 12), (1, 2), dropout=0.5,
                                           batch_first=True).double().train()  # fmt: skip
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    torch.manual_seed(0)
    out, weights = module(x, x, x, average_attn_weights=False)
    assert (weights == 0).any() and (weights > 1).any()
    values = torch.nn.functional.linear(x, *[w[32:] for w in (module.in_proj_weight,
                                                              module.in_proj_bias)])  # fmt: skip
    by_hand = (weights @ values.view(2, 12, 4, 4).transpose(1, 2)).transpose(1, 2)
    assert (module.out_proj(by_hand.reshape(2, 12, 16)) - out).abs().max() <= 1e-12
    torch.manual_seed(0)
    fast, _ = module(x, x, x, need_weights=False)  # the kernels' own dropout
    assert fast.shape == out.shape and (fast - module.eval()(x, x, x)[0]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("p", "error", "message"),
    [(-0.1, ValueError, r"dropout_p: must be in \[0, 1\)"), (1.0, ValueError, "must be in"),
     ("0.1", TypeError, "dropout_p: expected a float"), (True, TypeError, "expected a float")],
)  # fmt: skip
def test_a_bad_probability_is_named(p, error, message):
    q = torch.zeros(1, 8, 2, 8)
    for fn in (dilated_attention, functools.partial(simulated_ring_dilated_attention,
                                                    world_size=2)):  # fmt: skip
        with pytest.raises(error, match=message):
            fn(q, q, q, (4,), (1,), dropout_p=p)


@pytest.mark.parametrize("kernel", ["cudnn", "flash_cpu", "flex"])
def test_kernels_without_dropout_are_refused_with_the_reason(kernel):
    q = torch.zeros(1, 8, 2, 16)
    with pytest.raises(ValueError, match=f"{kernel} cannot run here: {kernel} takes no dropout"):
        choose_kernel(q, kernel, dropout=True)
    with pytest.raises(ValueError, match="takes no dropout"):
        dilated_attention(q, q, q, (4,), (1,), kernel=kernel, dropout_p=0.1)
    assert choose_kernel(q, None, dropout=True).value == "math"


# --- the fused kernels' own dropout, on a CUDA device ---------------------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FUSED = [("flash", torch.bfloat16), ("efficient", torch.float32), ("efficient", torch.bfloat16)]
LONG = Case(2, 512, 4, 64, (128, 256, 512), (1, 2, 4), True)


def cuda_paths(kernel: str):
    """One device and the simulated ring (P = 2) with ``kernel``."""
    args = (LONG.segment_lengths, LONG.dilation_rates)
    kw = {**LONG.kwargs(), "kernel": kernel}
    return {
        "one device": lambda q, k, v, **more: dilated_attention(q, k, v, *args, **kw, **more),
        "ring P=2": lambda q, k, v, **more: simulated_ring_dilated_attention(
            q, k, v, *args, **kw, world_size=2, **more
        ),
    }


@CUDA
@pytest.mark.parametrize(("kernel", "dtype"), FUSED)
@pytest.mark.parametrize("where", ["one device", "ring P=2"])
def test_fused_dropout_mean_lse_and_reproducible(kernel, dtype, where):
    """The kernels' own dropout: the pre-dropout lse, reproducible under a seed (one
    device), and the mean output and gradients over 100 seeds equal those without dropout
    within 6 standard errors plus the dtype's rounding (a million elements: at 5, a few
    exceed by chance, the t-distribution of 99 samples having heavy tails)."""
    fn = cuda_paths(kernel)[where]
    q, k, v = (t.cuda().to(dtype).requires_grad_() for t in inputs(LONG))
    dout = torch.from_numpy(LONG.upstream(seed=1)).cuda().to(dtype)
    plain, plain_lse = fn(q, k, v, return_lse=True)
    want = torch.cat([plain.flatten(), *(g.flatten() for g in torch.autograd.grad(
        plain, (q, k, v), dout))]).float()  # fmt: skip
    samples = []
    for seed in range(100):
        torch.manual_seed(seed)
        out, lse = fn(q, k, v, dropout_p=0.2, return_lse=True)
        # the pre-dropout lse (another path's calls: equal to float32 rounding)
        torch.testing.assert_close(lse, plain_lse, atol=1e-4, rtol=0)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        samples.append(torch.cat([out.flatten(), *(g.flatten() for g in grads)]).float())
    if where == "one device":
        torch.manual_seed(99)
        again = fn(q, k, v, dropout_p=0.2)
        assert torch.equal(again.flatten().float(), samples[-1][: again.numel()])
    stack = torch.stack(samples)
    error = (stack.mean(0) - want).abs()
    rounding = 2e-2 if dtype == torch.bfloat16 else 1e-4
    bound = 6 * stack.std(0) / len(samples) ** 0.5 + rounding * (1 + want.abs())
    assert (error <= bound).all(), float((error / bound).max())


@CUDA
@pytest.mark.parametrize("where", ["one device", "ring P=2"])
def test_fused_dropout_gradients_under_a_fixed_mask(where):
    """fp32, the efficient kernel: the gradient along random directions equals the central
    difference of <dout, out> under the same seed (the same masks)."""
    fn = cuda_paths("efficient")[where]
    x = [t.cuda().float().requires_grad_() for t in inputs(LONG)]
    dout = torch.from_numpy(LONG.upstream(seed=1)).cuda().float()

    def loss(*t):
        torch.manual_seed(5)
        return (fn(*t, dropout_p=0.3) * dout).sum()

    grads = torch.autograd.grad(loss(*x), x)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):
        u = [torch.randn(t.shape, generator=gen, device="cuda") for t in x]
        eps = 1e-2
        with torch.no_grad():
            plus = loss(*(t + eps * d for t, d in zip(x, u)))
            minus = loss(*(t - eps * d for t, d in zip(x, u)))
        numeric = float(plus - minus) / (2 * eps)
        analytic = float(sum((g * d).sum() for g, d in zip(grads, u)))
        assert abs(numeric - analytic) <= 2e-2 * max(1.0, abs(analytic)), (numeric, analytic)
