"""The kernel choice on a CUDA device (Note [The kernel choice] in
:mod:`ringsim.gpu.kernels.choice`): the preference per architecture, and each known failure
mode of a fused kernel, on purpose: rows whose scores are all very negative (at the key
counts where cuDNN's Hopper backward gave NaN, pytorch/pytorch#196678 and
NVIDIA/cudnn-frontend#1072), one-key blocks, more blocks than a CUDA grid dimension takes,
misaligned tensors, deterministic algorithms, and tensors past 2^31 elements.

Needs a CUDA device; skipped, with that reason, elsewhere.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from test_kernels_backward import autograd_reference, flat  # noqa: E402

from ringsim.gpu import dilated_attention  # noqa: E402
from ringsim.gpu.executor import backward  # noqa: E402
from ringsim.gpu.harness.check_support import draw, max_abs_err, naive_dilated  # noqa: E402
from ringsim.gpu.kernels import (  # noqa: E402
    MAX_BLOCKS,
    Kernel,
    attend,
    attend_backward,
    capability,
    choose_kernel,
    math_attention,
)
from ringsim.tolerance import low_precision_bound  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FUSED = [Kernel.CUDNN, Kernel.FLASH, Kernel.EFFICIENT]


def runs(kernel: Kernel, d: int = 128) -> None:
    reason = capability(kernel, torch.empty(1, 1, 1, d, dtype=torch.bfloat16, device="cuda"))
    if reason is not None:
        pytest.skip(reason)


def test_cudnn_first_on_hopper_flash_elsewhere():
    q = torch.empty(1, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    major = torch.cuda.get_device_capability()[0]
    expected = Kernel.CUDNN if major == 9 and capability(Kernel.CUDNN, q) is None else Kernel.FLASH
    assert choose_kernel(q) is expected


def test_misaligned_tensors_are_not_given_to_cudnn():
    runs(Kernel.CUDNN)
    storage = torch.randn(1 + 4 * 64 * 128, dtype=torch.bfloat16, device="cuda")
    q = storage[1:].view(1, 4, 64, 128)  # data pointer 2 bytes past a 16-byte boundary
    assert "16-byte" in capability(Kernel.CUDNN, q)
    assert "16-byte" in capability(Kernel.CUDNN, q.contiguous(), q)  # k or v misaligned
    assert choose_kernel(q) is not Kernel.CUDNN
    odd = torch.randn(1, 4, 64, 132, dtype=torch.bfloat16, device="cuda")[..., :128]
    assert "stride" in capability(Kernel.CUDNN, odd)  # rows 264 bytes apart


def test_a_misaligned_input_is_realigned_and_matches_the_definition():
    runs(Kernel.CUDNN)
    shape, segs, rates = (1, 512, 4, 64), (128, 256), (1, 2)
    q, k, v = draw(shape, torch.bfloat16, 3, "cuda")
    moved = torch.empty(1 + q.numel(), dtype=q.dtype, device="cuda")[1:].view(shape)
    moved.copy_(q)  # the same values, 2 bytes past a 16-byte boundary
    ref = naive_dilated(q.double(), k.double(), v.double(), segs, rates)[0]
    assert max_abs_err(dilated_attention(moved, k, v, segs, rates), ref) < 2e-2


def test_deterministic_algorithms_keep_cudnn_out():
    q = torch.empty(1, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert "deterministic" in capability(Kernel.CUDNN, q)
        assert choose_kernel(q) is not Kernel.CUDNN
    finally:
        torch.use_deterministic_algorithms(saved)


def reference_check(kernel: Kernel, q, k, v, *, causal: bool, scale: float) -> None:
    """Forward and backward of ``kernel`` against float64: no NaN anywhere, and each result
    within the larger of spec §9's low-precision bound (twice / three times the naive
    same-dtype error, plus 1e-6) and a failure bound, 2e-2 of the result's largest magnitude
    (at least 1; lse: 1e-5 of it). These tests look for a kernel that breaks on a shape or a
    range (NaN, garbage, a wrong mask); precision on random inputs is the device check's."""

    def assert_close(name, got, want, approx, kind, relative):
        assert not torch.isnan(got).any(), f"{kernel.value}: NaN in {name}"
        floor = relative * max(1.0, want.abs().max().item())
        bound = max(low_precision_bound(max_abs_err(approx, want), kind), floor)
        err = max_abs_err(got, want)
        assert err <= bound, f"{kernel.value}: {name} error {err:.2e} > {bound:.2e}"

    wide = [x.double() for x in (q, k, v)]
    ref = math_attention(*wide, causal=causal, scale=scale)
    naive = math_attention(q, k, v, causal=causal, scale=scale)
    out, lse = attend(q, k, v, causal=causal, scale=scale, kernel=kernel)
    assert_close("out", out, ref[0], naive[0], "out", 2e-2)
    assert_close("lse", lse, ref[1], naive[1], "out", 1e-5)
    dout = torch.randn_like(q)
    mask = None
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device="cuda").tril()
    expected = flat(autograd_reference(*wide[:1], [wide[1]], [wide[2]], [mask], dout.double(),
                                       scale)[2])  # fmt: skip
    same = flat(autograd_reference(q, [k], [v], [mask], dout, scale)[2])
    got = attend_backward(q, k, v, out, lse, dout, causal=causal, scale=scale, kernel=kernel)
    for name, g, e, a in zip(("dq", "dk", "dv"), got, expected, same):
        assert_close(name, g, e, a, "grad", 2e-2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("m", "l_"), [(192, 192), (64, 64), (1, 128), (128, 128)])
@pytest.mark.parametrize("kernel", FUSED)
def test_rows_whose_scores_are_all_very_negative(kernel, m, l_, causal):
    """Every score near -200 (an lse below -88.7, where exp overflows float32): the key
    counts s_kv % 128 == 64 and s_q = 1 are where cuDNN's sm90 backward gave NaN."""
    runs(kernel)
    if causal and m != l_:
        pytest.skip("causal blocks are square")
    gen = torch.Generator(device="cuda").manual_seed(m + l_ + causal)
    unit = torch.randn(2, 3, 1, 128, generator=gen, device="cuda", dtype=torch.float64)
    unit = unit / unit.norm(dim=-1, keepdim=True)

    def noise(rows):
        return 0.01 * torch.randn(2, 3, rows, 128, device="cuda", generator=gen).double()

    q, k = unit * 16 + noise(m), -unit * 16 + noise(l_)
    v = 100 * noise(l_)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    scale = 1 / math.sqrt(128) * 8  # scores about -16 * 16 * 8 / 11.3 = -181
    assert math_attention(q, k, v, causal=causal, scale=scale)[1].max() < -100
    reference_check(kernel, q, k, v, causal=causal, scale=scale)


@pytest.mark.parametrize("kernel", FUSED)
def test_one_key_blocks(kernel):
    """One key per block (cuDNN: the math kernel runs them, forward and backward)."""
    runs(kernel)
    q, k, v = draw((8, 2, 1, 128), torch.bfloat16, 5, "cuda")
    reference_check(kernel, q, k, v, causal=True, scale=0.1)
    q, k, v = (torch.cat([x] * 3, dim=2) for x in (q, k, v))
    reference_check(kernel, q, k[:, :, :1], v[:, :, :1], causal=False, scale=0.1)


@pytest.mark.parametrize("kernel", FUSED)
def test_more_blocks_than_a_grid_dimension_takes(kernel):
    runs(kernel)
    q, k, v = draw((MAX_BLOCKS + 5, 1, 16, 64), torch.bfloat16, 7, "cuda")
    reference_check(kernel, q, k, v, causal=True, scale=0.125)


@pytest.mark.parametrize("kernel", [None, Kernel.CUDNN])
def test_direct_gradients_equal_the_accumulated_ones(monkeypatch, kernel):
    """One device: the parts summed by the Triton kernel (head chunks forced) against the
    float32 totals of the ring's path, both near float64."""
    runs(Kernel.CUDNN if kernel else Kernel.FLASH)
    segs, rates, n = (256, 512, 1024), (1, 2, 4), 2048
    x = [t.requires_grad_() for t in draw((1, n, 8, 128), torch.bfloat16, 9, "cuda")]
    dout = torch.randn_like(x[0])

    def grads():
        out = dilated_attention(*x, segs, rates, is_causal=True, kernel=kernel)
        return torch.autograd.grad(out, x, dout)

    monkeypatch.setattr(backward, "PARTS_BUDGET", 0)
    direct = grads()
    monkeypatch.setattr(backward, "mix_reason", lambda q: "the totals, for the comparison")
    totals = grads()
    for a, b in zip(direct, totals):
        assert max_abs_err(a, b) <= 2e-2 * b.abs().max().item()


def test_tensors_past_two_to_the_31_elements():
    """n = 2^21 tokens x 16 heads x 128 = 2^32 elements per tensor: the last segment's output
    and gradients against plain attention on that segment alone (64-bit offsets)."""
    runs(Kernel.CUDNN)
    if torch.cuda.get_device_properties(0).total_memory < 120 * 2**30:
        pytest.skip("needs 120 GiB of device memory")
    n, h, d, w = 1 << 21, 16, 128, 2048
    x = [torch.randn(1, n, h, d, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
    dout = torch.randn(1, n, h, d, dtype=torch.bfloat16, device="cuda")
    x = [t.requires_grad_() for t in x]
    out = dilated_attention(*x, (w,), (1,), is_causal=True)
    grads = torch.autograd.grad(out, x, dout)
    tail = [t.detach()[:, -w:].transpose(1, 2).contiguous() for t in x]
    want = torch.nn.functional.scaled_dot_product_attention(*tail, is_causal=True)
    err = max_abs_err(out[:, -w:].transpose(1, 2), want)
    assert err < 2e-2, f"out error {err:.2e}"
    leaves = [t.clone().requires_grad_() for t in tail]
    ref_out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
    ref = torch.autograd.grad(ref_out, leaves, dout[:, -w:].transpose(1, 2))
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        err, top = max_abs_err(g[:, -w:].transpose(1, 2), r), r.abs().max().item()
        assert err <= 2e-2 * top, f"{name} error {err:.2e}, largest {top:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("keys", [64, 200])  # a tile, and a ragged last tile
def test_a_key_mask_on_the_efficient_kernel(dtype, causal, keys):
    """Note [The kernel choice]: a key mask runs the efficient kernel. Its bias padded to 16;
    rows whose keys are all masked come back as out 0, lse -inf (the kernel returns 0), and
    their gradients are 0; the rest equals the float64 math kernel with the same bias."""
    q, k, v = draw((3, 4, keys, 64), dtype, 7, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(keys)
    mask = torch.rand(3, 1, 1, keys, device="cuda", generator=gen) < 0.3
    mask[0] = True  # every key of the first block masked
    mask[1, ..., : keys // 2] = True  # causal: the first half of the rows have no key
    bias = torch.zeros(mask.shape, dtype=dtype, device="cuda").masked_fill(mask, -math.inf)
    bias = bias.expand(3, 4, 1, keys)
    assert capability(Kernel.EFFICIENT, q, masked=True) is None
    assert "takes no key mask" in capability(Kernel.CUDNN, q, masked=True)
    out, lse = attend(q, k, v, causal=causal, scale=0.125, kernel=Kernel.EFFICIENT, bias=bias)
    want, want_lse = math_attention(*(x.double() for x in (q, k, v)), causal=causal,
                                    scale=0.125, bias=bias.double())  # fmt: skip
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert max_abs_err(out, want) <= tol and max_abs_err(lse, want_lse) <= tol
    dout = draw((3, 4, keys, 64), dtype, 8, "cuda")[0]
    grads = attend_backward(q, k, v, out, lse, dout, causal=causal, scale=0.125,
                            kernel=Kernel.EFFICIENT, bias=bias)  # fmt: skip
    expect = attend_backward(*(x.double() for x in (q, k, v, want)), want_lse, dout.double(),
                             causal=causal, scale=0.125, kernel=Kernel.MATH,
                             bias=bias.double())  # fmt: skip
    for got, ref in zip(grads, expect):
        assert torch.isfinite(got).all()
        assert max_abs_err(got, ref) <= 5 * tol
    masked_keys = mask[:, :, 0].expand(3, 4, keys)
    assert (grads[1][masked_keys] == 0).all() and (grads[2][masked_keys] == 0).all()


def test_a_padded_batch_on_cuda_matches_the_definition():
    """key_padding_mask through dilated_attention on CUDA (the efficient kernel), forward and
    backward, in bf16 against the float64 segment-wise formula."""
    q, k, v = draw((2, 1024, 8, 64), torch.bfloat16, 9, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(10)
    pad = torch.rand(2, 1024, device="cuda", generator=gen) < 0.25
    pad[0, 512:] = True
    args = ((256, 512, 1024), (1, 2, 4))
    out, lse = dilated_attention(q, k, v, *args, is_causal=True, return_lse=True,
                                 key_padding_mask=pad)  # fmt: skip
    ref = naive_dilated(*(x.double() for x in (q, k, v)), *args, is_causal=True, dense=False,
                        key_padding_mask=pad)  # fmt: skip
    low = naive_dilated(q, k, v, *args, is_causal=True, dense=False, key_padding_mask=pad)
    assert max_abs_err(out, ref[0]) <= low_precision_bound(max_abs_err(low[0], ref[0]))
    assert max_abs_err(lse, ref[1]) <= low_precision_bound(max_abs_err(low[1], ref[1]))
