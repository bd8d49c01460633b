"""attend_backward against torch autograd of plain softmax attention in float64 (spec §9).

Needs torch (the ``torch`` extra); skipped otherwise. Runs the CPU kernels (math, flash_cpu);
tests/test_gpu_cuda.py runs :func:`check_two_blocks` on the CUDA kernels.

The setup is the ring's (Note [Backward with the final out and lse]): queries attend two key
blocks, an earlier block seen in full and the diagonal block (causal or not). The gradient of
one softmax over both blocks, by autograd, must equal the sum of the two block calls given
that softmax's out and lse: dq summed, dk/dv per block.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from ringsim.gpu.harness.check_support import max_abs_err, plain_attention  # noqa: E402
from ringsim.gpu.kernels import (  # noqa: E402
    Kernel,
    accumulator_dtype,
    attend,
    attend_backward,
)
from ringsim.tolerance import low_precision_bound, tolerance  # noqa: E402

CPU_KERNELS = [Kernel.MATH, Kernel.FLASH_CPU]
NAMES = ("dq", "dk", "dv")


def draw_rows(shape, dtype, seed: int, device, layout: str = "bhmd") -> torch.Tensor:
    """A unit-normal ``(B, H, rows, D)`` tensor drawn in float64, rounded to ``dtype``;
    ``layout="bmhd"`` returns it as a transposed view of a ``(B, rows, H, D)`` tensor."""
    gen = torch.Generator(device=device).manual_seed(seed)
    b, h, n, d = shape
    x = torch.randn(b, n, h, d, generator=gen, dtype=torch.float64, device=device).to(dtype)
    return x.transpose(1, 2) if layout == "bmhd" else x.transpose(1, 2).contiguous()


def autograd_reference(q, ks, vs, masks, dout, scale, dlse=None):
    """One softmax over the concatenated key blocks, every op in q's dtype, and by autograd
    the gradients of ``<out, dout> + <lse, dlse>``.

    Args:
        q: ``(B, H, M, D)``; ks, vs: lists of ``(B, H, L_i, D)``.
        masks: per block ``(M, L_i)`` bool (True = attend) or None (all).
    Returns:
        out ``(B, H, M, D)``, lse ``(B, H, M)`` and ``(dq, [dk_i], [dv_i])``, all in q's dtype.
    """
    leaves = [x.detach().clone().requires_grad_() for x in (q, *ks, *vs)]
    n = len(ks)
    ones = [torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device) for k in ks]
    allowed = torch.cat([o if m is None else m for o, m in zip(ones, masks)], dim=-1)
    k, v = torch.cat(leaves[1 : 1 + n], dim=-2), torch.cat(leaves[1 + n :], dim=-2)
    out, lse = plain_attention(leaves[0], k, v, allowed, scale)
    loss = (out * dout).sum()
    if dlse is not None:  # empty rows: lse = -inf, no gradient either way
        loss = loss + (torch.where(torch.isneginf(lse), 0.0, lse) * dlse).sum()
    grads = torch.autograd.grad(loss, leaves)
    return out.detach(), lse.detach(), (grads[0], list(grads[1 : 1 + n]), list(grads[1 + n :]))


def combine(first, second):
    """Two block calls' ``(dq, dk, dv)`` -> ``dq`` summed (in float64, as callers add into
    wide accumulators), dk and dv concatenated by key."""
    return (
        first[0].double() + second[0].double(),
        torch.cat([first[1], second[1]], -2),
        torch.cat([first[2], second[2]], -2),
    )


def flat(reference):
    """``(dq, [dk_i], [dv_i])`` -> ``(dq, dk, dv)`` concatenated by key."""
    dq, dks, dvs = reference
    return dq, torch.cat(dks, -2), torch.cat(dvs, -2)


def errors(actual, expected) -> dict[str, float]:
    return {name: max_abs_err(a, e) for name, a, e in zip(NAMES, actual, expected)}


def check_two_blocks(
    kernel: Kernel,
    dtype: torch.dtype,
    *,
    causal: bool,
    device,
    seed: int,
    head_dim: int = 16,
    m: int = 37,
    l_earlier: int = 29,
    layout: str = "bhmd",
    empty_rows: slice | None = None,
) -> None:
    """The two-block check for one kernel and dtype (see the module docstring).

    Bounds (spec §9): float64 1e-10, float32 2e-5 against the float64 definition; bf16/fp16
    3x the error of the same autograd evaluated in that dtype, plus 1e-6, per gradient.
    ``empty_rows``: these rows get ``lse = -inf`` and ``out = 0`` (no key anywhere) while
    dout stays random; they must get ``dq = 0`` and add nothing to dk, dv.
    """
    b, h, d = 2, 3, head_dim
    q, dout = (draw_rows((b, h, m, d), dtype, seed + i, device, layout) for i in (0, 1))
    k1, v1 = (draw_rows((b, h, l_earlier, d), dtype, seed + i, device, layout) for i in (2, 3))
    k2, v2 = (draw_rows((b, h, m, d), dtype, seed + i, device, layout) for i in (4, 5))
    diagonal = torch.ones(m, m, dtype=torch.bool, device=device).tril() if causal else None
    scale = 1.1 / math.sqrt(d)
    wide = [x.double() for x in (q, k1, v1, k2, v2, dout)]
    out, lse, _ = autograd_reference(
        wide[0], wide[1:5:2], wide[2:6:2], [None, diagonal], wide[5], scale
    )
    ref_dout, naive_dout = wide[5], dout
    if empty_rows is not None:  # no key anywhere: such a row contributes nothing
        out[..., empty_rows, :], lse[..., empty_rows] = 0.0, -math.inf
        ref_dout, naive_dout = ref_dout.clone(), dout.clone()
        ref_dout[..., empty_rows, :], naive_dout[..., empty_rows, :] = 0.0, 0.0
    args = (wide[0], wide[1:5:2], wide[2:6:2], [None, diagonal])
    expected = flat(autograd_reference(*args, ref_dout, scale)[2])

    final = out.to(dtype), lse.to(accumulator_dtype(dtype))
    common = dict(scale=scale, kernel=kernel)
    earlier = attend_backward(q, k1, v1, *final, dout, causal=False, **common)
    own = attend_backward(q, k2, v2, *final, dout, causal=causal, **common)
    got = combine(earlier, own)
    want_dtype = accumulator_dtype(dtype) if kernel == Kernel.MATH else dtype  # fused: their own
    for name, g in zip(NAMES, (*earlier, *own)):
        assert g.dtype == want_dtype, f"{name}: returned {g.dtype}"
    err = errors(got, expected)
    if dtype in (torch.float16, torch.bfloat16):
        naive_args = (q, [k1, k2], [v1, v2], [None, diagonal], naive_dout, scale)
        naive = errors(flat(autograd_reference(*naive_args)[2]), expected)
        bound = {name: low_precision_bound(naive[name], "grad") for name in NAMES}
    else:
        bound = dict.fromkeys(NAMES, tolerance(dtype))
    where = f"{kernel.value} {dtype} causal={causal} d={d} m={m} {layout}"
    assert all(err[n] <= bound[n] for n in NAMES), f"{where}: errors {err} > bounds {bound}"
    if empty_rows is not None:
        assert all(torch.isfinite(g).all() for g in got), f"{where}: NaN or inf in a gradient"
        assert torch.all(got[0][..., empty_rows, :] == 0), f"{where}: dq of an empty row != 0"


@pytest.mark.parametrize("layout", ["bhmd", "bmhd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_two_blocks_with_final_out_lse_match_autograd(kernel, dtype, causal, layout):
    check_two_blocks(kernel, dtype, causal=causal, device="cpu", seed=3 + causal, layout=layout)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_bf16_within_three_times_naive(kernel):
    check_two_blocks(kernel, torch.bfloat16, causal=True, device="cpu", seed=5)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_head_dim_one_may_have_any_last_stride(kernel):
    """A size-1 last dim may have any stride (as gathered blocks do): same result as contiguous."""
    gen = torch.Generator().manual_seed(9)
    odd = [torch.randn(1, 2, 1, 6, generator=gen, dtype=torch.float64).transpose(-1, -2)]
    odd += [torch.randn(1, 2, 6, 1, generator=gen, dtype=torch.float64) for _ in range(3)]
    q, k, v, dout = odd
    assert q.stride(-1) == 6
    out, lse = attend(q.contiguous(), k, v, causal=True, scale=0.5, kernel=kernel)
    kw = dict(causal=True, scale=0.5, kernel=kernel)
    got = attend_backward(q, k, v, out, lse, dout, **kw)
    expected = attend_backward(q.contiguous(), k, v, out, lse, dout, **kw)
    assert max(errors(got, expected).values()) <= tolerance(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_rows_without_keys_get_zero_gradients(kernel, dtype):
    check_two_blocks(kernel, dtype, causal=True, device="cpu", seed=7, empty_rows=slice(4, 11))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_block_with_its_own_out_lse_matches_autograd(kernel, dtype, causal):
    q, k, v, dout = (draw_rows((2, 3, 23, 8), dtype, 11 + i, "cpu", "bmhd") for i in range(4))
    scale = 0.4
    out, lse = attend(q, k, v, causal=causal, scale=scale, kernel=kernel)
    got = attend_backward(q, k, v, out, lse, dout, causal=causal, scale=scale, kernel=kernel)
    mask = torch.ones(23, 23, dtype=torch.bool).tril() if causal else None
    wide = [x.double() for x in (q, k, v, dout)]
    expected = flat(autograd_reference(wide[0], [wide[1]], [wide[2]], [mask], wide[3], scale)[2])
    err = errors(got, expected)
    assert max(err.values()) <= tolerance(dtype), f"{kernel.value} {dtype}: {err}"


def masks_with_empty_rows(m: int, lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Random ``(m, L_i)`` masks; rows 0-2 are empty in every block, row 3 in the first."""
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.rand(m, n, generator=gen) < 0.6 for n in lengths]
    for mask in masks:
        mask[:3] = False
    masks[0][3] = False
    return masks


@pytest.mark.parametrize("with_dlse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_math_allowed_masks_and_dlse_match_autograd(dtype, with_dlse):
    """General masks (the ring's MASKED blocks, which may not be square), rows with no key in
    one or both blocks, and a loss that also reads the final lse."""
    m, lengths, scale = 19, [13, 17], 0.35
    q, dout = (draw_rows((2, 2, m, 8), dtype, 20 + i, "cpu") for i in range(2))
    ks = [draw_rows((2, 2, n, 8), dtype, 30 + n, "cpu") for n in lengths]
    vs = [draw_rows((2, 2, n, 8), dtype, 40 + n, "cpu") for n in lengths]
    dlse = draw_rows((2, 2, m, 1), dtype, 50, "cpu")[..., 0] if with_dlse else None
    masks = masks_with_empty_rows(m, lengths, seed=60)
    wide = [x.double() for x in (q, *ks, *vs, dout)]
    wide_dlse = None if dlse is None else dlse.double()
    out, lse, ref = autograd_reference(
        wide[0], wide[1:3], wide[3:5], masks, wide[5], scale, wide_dlse
    )
    assert torch.isneginf(lse[..., :3]).all() and torch.isfinite(lse[..., 3:]).all()
    final = out.to(dtype), lse.to(accumulator_dtype(dtype))
    kw = dict(causal=True, scale=scale, kernel=Kernel.MATH, dlse=dlse)
    grads = [
        attend_backward(q, k, v, *final, dout, allowed=mask, **kw)
        for k, v, mask in zip(ks, vs, masks)
    ]
    got = combine(*grads)
    err = errors(got, flat(ref))
    assert max(err.values()) <= tolerance(dtype), f"{dtype} dlse={with_dlse}: {err}"
    assert torch.all(got[0][..., :3, :] == 0) and all(torch.isfinite(g).all() for g in got)


def test_flash_cpu_matches_math_on_strided_views():
    """flash_cpu and math agree to rounding on transposed (b, n, h, d) views."""
    q, dout = (draw_rows((1, 2, 31, 8), torch.float64, 70 + i, "cpu", "bmhd") for i in range(2))
    k, v = (draw_rows((1, 2, 31, 8), torch.float64, 72 + i, "cpu", "bmhd") for i in range(2))
    out, lse = attend(q, k, v, causal=True, scale=0.3, kernel=Kernel.MATH)
    kw = dict(causal=True, scale=0.3)
    math_grads = attend_backward(q, k, v, out, lse, dout, kernel=Kernel.MATH, **kw)
    cpu_grads = attend_backward(q, k, v, out, lse, dout, kernel=Kernel.FLASH_CPU, **kw)
    err = errors(cpu_grads, math_grads)
    assert max(err.values()) <= tolerance(torch.float64), err


def small_case():
    q, k, v, out, dout = (torch.randn(1, 2, 5, 8) for _ in range(5))
    return q, k, v, out, torch.randn(1, 2, 5), dout


def test_flex_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="flex: no backward with an external lse"):
        attend_backward(*small_case(), causal=False, scale=0.3, kernel=Kernel.FLEX)


def test_dlse_needs_math():
    q, k, v, out, lse, dout = small_case()
    with pytest.raises(NotImplementedError, match=r"dlse.*kernel='math'"):
        attend_backward(
            q, k, v, out, lse, dout, causal=False, scale=0.3, kernel=Kernel.FLASH_CPU, dlse=lse
        )


def test_allowed_needs_math():
    allowed = torch.ones(5, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="allowed"):
        attend_backward(
            *small_case(), causal=False, scale=0.3, kernel=Kernel.FLASH_CPU, allowed=allowed
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "lse": a["lse"][..., :4]}, "lse: expected shape"),
        (lambda a: {**a, "out": a["out"][:, :1]}, "out: expected shape"),
        (lambda a: {**a, "k": a["k"].double()}, "k, v: dtypes"),
        (lambda a: {**a, "kernel": "fast"}, "kernel: must be one of"),
        (lambda a: {**a, "kernel": Kernel.FLASH}, "kernel: flash cannot run here"),
        (lambda a: {**a, "allowed": torch.ones(5, 4, dtype=torch.bool)}, "allowed: expected"),
    ],
)
def test_bad_arguments_raise_value_error(change, message):
    q, k, v, out, lse, dout = small_case()
    args = dict(q=q, k=k, v=v, out=out, lse=lse, dout=dout, kernel=Kernel.MATH)
    with pytest.raises(ValueError, match=message):
        attend_backward(**change(args), causal=False, scale=0.3)
