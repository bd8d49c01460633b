"""Kernel adapters and dilated_attention on a CUDA device, against float64 (SPEC 9).

Needs a CUDA device: every test here is skipped, with that reason, where
``torch.cuda.is_available()`` is False (and the module where torch is missing). The full
device check is ``python -m ringsim.gpu.check``; this is its quick subset for pytest.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from ringsim.gpu import dilated_attention  # noqa: E402
from ringsim.gpu.check_support import (  # noqa: E402
    bounds,
    causal_mask,
    draw,
    max_abs_err,
    naive_dilated,
    plain_attention,
)
from ringsim.gpu.kernels import Kernel, attend, capability, math_attention  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 bounds assume full float32 products."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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


@pytest.mark.parametrize("kernel", [None, Kernel.FLASH, Kernel.EFFICIENT, Kernel.MATH])
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
