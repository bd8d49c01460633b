"""Kernel adapters, their backward and dilated_attention on a CUDA device, against float64
(spec §9).

Needs a CUDA device: every test here is skipped, with that reason, where
``torch.cuda.is_available()`` is False (and the module where torch is missing). The full
device check is ``python -m ringsim.gpu.harness.check``; this is its quick subset for pytest.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from test_kernels_backward import (  # noqa: E402
    autograd_reference,
    check_two_blocks,
    draw_rows,
    errors,
    flat,
)

from ringsim.gpu import dilated_attention  # noqa: E402
from ringsim.gpu.harness.check_support import (  # noqa: E402
    bounds,
    causal_mask,
    draw,
    max_abs_err,
    naive_dilated,
    plain_attention,
)
from ringsim.gpu.kernels import (  # noqa: E402  # noqa: E402
    Kernel,
    attend,
    attend_backward,
    backward_kernel,
    capability,
    math_attention,
)
from ringsim.tolerance import low_precision_bound  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("no_tf32"),
]


def check_adapter(kernel: Kernel, dtype: torch.dtype, causal: bool, seed: int) -> None:
    q, k, v = draw((2, 3, 517, 64), dtype, seed, "cuda")
    reason = capability(kernel, q)
    if reason is not None:
        pytest.skip(reason)
    scale = 1.1 / math.sqrt(64)
    ref = math_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale)
    naive = plain_attention(q, k, v, causal_mask(517, q.device) if causal else None, scale)
    bound = bounds(dtype, max_abs_err(naive[0], ref[0]), max_abs_err(naive[1], ref[1]))
    out, lse = attend(q, k, v, causal=causal, scale=scale, kernel=kernel)
    err = max_abs_err(out, ref[0]), max_abs_err(lse, ref[1])
    assert err[0] <= bound[0] and err[1] <= bound[1], f"{kernel.value}: {err} > {bound}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", [Kernel.FLASH, Kernel.CUDNN, Kernel.EFFICIENT, Kernel.MATH])
def test_adapter_bf16_matches_math(kernel, causal):
    check_adapter(kernel, torch.bfloat16, causal, seed=11 + causal)


@pytest.mark.parametrize("kernel", [Kernel.EFFICIENT, Kernel.MATH])
def test_adapter_fp32_within_2e5(kernel):
    check_adapter(kernel, torch.float32, True, seed=13)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_flex_adapter_lse_is_natural_log(causal):
    """FlexAttention compiles here (tens of seconds); its lse must not be base 2."""
    check_adapter(Kernel.FLEX, torch.bfloat16, causal, seed=17 + causal)


@pytest.mark.parametrize(
    "kernel", [None, Kernel.CUDNN, Kernel.FLASH, Kernel.EFFICIENT, Kernel.MATH]
)
@pytest.mark.parametrize(
    ("n", "segs", "rates", "causal", "mode"),
    [
        (2048, (512, 1024, 2048), (1, 2, 4), False, "longnet"),
        (1500, (400, 900, 3000), (1, 3, 5), True, "grouped"),  # ragged, w > n, r does not divide
    ],
)
def test_dilated_bf16_matches_definition(kernel, n, segs, rates, causal, mode):
    q, k, v = draw((1, n, 6, 64), torch.bfloat16, n + causal, "cuda")
    reason = None if kernel is None else capability(kernel, q)  # reads device, dtype, d
    if reason is not None:
        pytest.skip(reason)
    kw = dict(is_causal=causal, mode=mode)
    ref = naive_dilated(q.double(), k.double(), v.double(), segs, rates, **kw)
    naive = naive_dilated(q, k, v, segs, rates, **kw)
    bound = bounds(torch.bfloat16, max_abs_err(naive[0], ref[0]), max_abs_err(naive[1], ref[1]))
    out, lse = dilated_attention(q, k, v, segs, rates, **kw, return_lse=True, kernel=kernel)
    err = max_abs_err(out, ref[0]), max_abs_err(lse, ref[1])
    assert err[0] <= bound[0] and err[1] <= bound[1], f"{kernel}: {err} > {bound}"


# attend_backward: one key block's share of the gradient, given the FINAL out and lse of the rows
# (tests/test_kernels_backward.py checks math and flash_cpu the same way on the CPU). M = 100
# is not a multiple of 32 (the efficient kernel pads lse), H = 3 and B = 2 exercise the head
# and batch strides, "bmhd" passes q, k, v as transposed views.
BACKWARD_KERNELS = [Kernel.FLASH, Kernel.CUDNN, Kernel.EFFICIENT]


def skip_unless_runs(kernel: Kernel, dtype: torch.dtype, head_dim: int) -> None:
    reason = capability(kernel, torch.empty(1, 1, 1, head_dim, dtype=dtype, device="cuda"))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("layout", ["bhmd", "bmhd"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", BACKWARD_KERNELS)
def test_backward_low_precision_within_three_times_naive(kernel, dtype, causal, head_dim, layout):
    """Per gradient: error <= 3x that of plain autograd in the same dtype, plus 1e-6."""
    skip_unless_runs(kernel, dtype, head_dim)
    check_two_blocks(
        kernel, dtype, causal=causal, device="cuda", seed=31 + causal, head_dim=head_dim,
        m=100, l_earlier=75, layout=layout,
    )  # fmt: skip


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_efficient_fp32_within_2e5(causal, head_dim):
    skip_unless_runs(Kernel.EFFICIENT, torch.float32, head_dim)
    check_two_blocks(
        Kernel.EFFICIENT, torch.float32, causal=causal, device="cuda", seed=37,
        head_dim=head_dim, m=100, l_earlier=75, layout="bmhd",
    )  # fmt: skip


@pytest.mark.parametrize("kernel", BACKWARD_KERNELS)
def test_backward_rows_without_keys_get_zero_gradients(kernel):
    """lse = -inf rows (out 0, dout random): dq exactly 0 there, nothing else changes."""
    skip_unless_runs(kernel, torch.bfloat16, 64)
    check_two_blocks(
        kernel, torch.bfloat16, causal=True, device="cuda", seed=41, head_dim=64, m=100,
        l_earlier=75, empty_rows=slice(10, 40),
    )  # fmt: skip


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", BACKWARD_KERNELS)
def test_backward_after_the_kernels_own_forward(kernel, causal):
    """attend then attend_backward with the same kernel: its own out and lse round-trip."""
    skip_unless_runs(kernel, torch.bfloat16, 64)
    shape, scale = (2, 3, 100, 64), 1.1 / math.sqrt(64)
    q, k, v, dout = (draw_rows(shape, torch.bfloat16, 43 + i, "cuda", "bmhd") for i in range(4))
    out, lse = attend(q, k, v, causal=causal, scale=scale, kernel=kernel)
    got = attend_backward(q, k, v, out, lse, dout, causal=causal, scale=scale, kernel=kernel)
    mask = causal_mask(100, q.device) if causal else None
    wide = [x.double() for x in (q, k, v, dout)]
    expected = flat(autograd_reference(wide[0], [wide[1]], [wide[2]], [mask], wide[3], scale)[2])
    naive = errors(flat(autograd_reference(q, [k], [v], [mask], dout, scale)[2]), expected)
    err = errors(got, expected)
    bound = {name: low_precision_bound(e, "grad") for name, e in naive.items()}
    assert all(err[n] <= bound[n] for n in err), f"{kernel.value}: errors {err} > bounds {bound}"


@pytest.mark.parametrize("kernel", BACKWARD_KERNELS)
def test_backward_of_one_query_one_key_blocks(kernel):
    """Blocks of one row (a dilation rate at least the segment length): cuDNN's backward
    refuses s_q = s_kv = 1, so ``backward_kernel`` runs math there; all agree with float64."""
    skip_unless_runs(kernel, torch.bfloat16, 64)
    assert backward_kernel(Kernel.CUDNN, *(torch.empty(4, 2, 1, 64),) * 2, True) is Kernel.MATH
    q, k, v, dout = (
        draw_rows((4, 2, 1, 64), torch.bfloat16, 47 + i, "cuda", "bhmd") for i in range(4)
    )
    scale = 1 / 8
    out, lse = attend(q, k, v, causal=True, scale=scale, kernel=kernel)
    got = attend_backward(q, k, v, out, lse, dout, causal=True, scale=scale, kernel=kernel)
    assert torch.allclose(got[2].float(), dout.float(), atol=1e-2)  # one key: dv = dout
    assert got[0].abs().max() < 1e-2 and got[1].abs().max() < 1e-2  # P = 1 exactly: dS = 0
