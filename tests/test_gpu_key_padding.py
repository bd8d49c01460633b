"""key_padding_mask on the torch backend: one device, the simulated ring and gloo processes.

Each path against the dense-mask definition with the mask (``ringsim.reference``), forward
and backward (the gradients against torch autograd of the definition, :mod:`grad_oracle`),
on the usual random cases with rows left with no key; a float mask against the dense
weights; bad masks named; ranks that disagree on the mask fail together.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from grad_oracle import dense_gradients  # noqa: E402

from ringsim.cases import Case, fixed_cases, grouped_query, random_case  # noqa: E402
from ringsim.gpu import (  # noqa: E402
    Kernel,
    choose_kernel,
    dilated_attention,
    ring_dilated_attention,
    simulated_ring_dilated_attention,
)
from ringsim.gpu.nn.weights import dilated_attention_weights  # noqa: E402
from ringsim.reference.parity import check_case  # noqa: E402
from ringsim.tolerance import max_abs_error  # noqa: E402


def padding(case: Case, seed: int) -> np.ndarray:
    """A random mask, True = padding, with batch element 0 padded everywhere (every row of
    it keeps no key)."""
    mask = case.key_padding(seed)
    mask[0] = True
    return mask


def one_device_cases() -> list[Case]:
    rng = np.random.default_rng(5)
    chosen = fixed_cases(1) + [random_case(rng, 1, max_shard=20) for _ in range(8)]
    return chosen + grouped_query(chosen[:4], 1)


def run_and_check(case: Case, i: int, attend) -> None:
    """``attend(q, k, v, mask)`` -> (out, lse) in float64 torch tensors that require grad:
    parity with the definition, then the gradients of <dout, out> with autograd's."""
    q, k, v = case.inputs(seed=i)
    pad = padding(case, i)
    tensors = [torch.from_numpy(x).requires_grad_() for x in (q, k, v)]
    out, lse = attend(*tensors, torch.from_numpy(pad))
    report = check_case(case, out.detach().numpy(), lse.detach().numpy(), q, k, v,
                        key_padding_mask=pad)  # fmt: skip
    assert report.ok, report.line()
    dout = case.upstream(seed=i)
    (out * torch.from_numpy(dout)).sum().backward()
    want = dense_gradients(case, q, k, v, dout, key_padding=pad)
    for name, x, expect in zip("qkv", tensors, want):
        assert max_abs_error(x.grad.numpy(), expect) <= 1e-10, (name, case.describe())


@pytest.mark.parametrize("kernel", ["math", "flash_cpu"])
def test_one_device_matches_the_definition_forward_and_backward(kernel):
    for i, case in enumerate(one_device_cases()):

        def attend(q, k, v, mask, case=case):
            return dilated_attention(q, k, v, case.segment_lengths, case.dilation_rates,
                                     **case.kwargs(), return_lse=True, kernel=kernel,
                                     key_padding_mask=mask)  # fmt: skip

        run_and_check(case, i, attend)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_the_simulated_ring_matches_the_definition_forward_and_backward(world_size, layout):
    rng = np.random.default_rng(world_size)
    chosen = fixed_cases(world_size, layout) + [
        random_case(rng, world_size, layout=layout) for _ in range(3)
    ]
    for i, case in enumerate(chosen):

        def attend(q, k, v, mask, case=case):
            return simulated_ring_dilated_attention(
                q, k, v, case.segment_lengths, case.dilation_rates, world_size=world_size,
                **case.kwargs(), return_lse=True, layout=layout, key_padding_mask=mask,
                kernel="math", timeout=30.0,
            )  # fmt: skip

        run_and_check(case, i, attend)


def test_a_float_mask_adds_to_the_scores():
    """A float mask of 0 and -inf equals the bool mask; one of finite values equals the
    dense weights (formed independently of the executor) with the same bias."""
    case = Case(2, 12, 4, 8, (4, 12), (1, 2), True)
    q, k, v = (torch.from_numpy(x) for x in case.inputs(seed=1))
    pad = torch.from_numpy(padding(case, 1))
    args = (case.segment_lengths, case.dilation_rates)
    as_bool = dilated_attention(q, k, v, *args, is_causal=True, key_padding_mask=pad)
    as_float = torch.zeros(pad.shape, dtype=torch.float64).masked_fill(pad, -torch.inf)
    same = dilated_attention(q, k, v, *args, is_causal=True, key_padding_mask=as_float)
    assert torch.equal(as_bool, same)
    bias = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 12)))
    got = dilated_attention(q, k, v, *args, is_causal=True, key_padding_mask=bias)
    weights = dilated_attention_weights(q, k, *args, is_causal=True, key_padding_mask=bias)
    want = (weights @ v.transpose(1, 2)).transpose(1, 2)
    assert max_abs_error(got.numpy(), want.numpy()) <= 1e-12
    assert max_abs_error(got.numpy(), as_bool.numpy()) > 1e-3  # the bias did something


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        ([[True] * 8], TypeError, "key_padding_mask: expected a torch.Tensor"),
        (torch.zeros(1, 8, dtype=torch.int64), TypeError, "expected bool or float"),
        (torch.zeros(2, 8, dtype=torch.bool), ValueError, r"shape must be \(batch, seq_len\)"),
        (torch.full((1, 8), torch.nan), ValueError, "must not hold NaN or \\+inf"),
        (torch.full((1, 8), torch.inf), ValueError, "must not hold NaN or \\+inf"),
    ],
)
def test_a_bad_mask_is_named(mask, error, message):
    q = torch.zeros(1, 8, 2, 8)
    with pytest.raises(error, match=message):
        dilated_attention(q, q, q, (4,), (1,), key_padding_mask=mask)
    with pytest.raises(error, match=message):
        simulated_ring_dilated_attention(q, q, q, (4,), (1,), world_size=2,
                                         key_padding_mask=mask)  # fmt: skip


@pytest.mark.parametrize("kernel", ["flash", "cudnn", "flex"])
def test_kernels_without_a_mask_are_refused_with_the_reason(kernel):
    q = torch.zeros(1, 8, 2, 16)
    with pytest.raises(ValueError, match=f"kernel: {kernel} cannot run here: .*takes no key mask"):
        choose_kernel(q, kernel, masked=True)
    with pytest.raises(ValueError, match="takes no key mask"):
        dilated_attention(q, q, q, (4,), (1,), kernel=kernel,
                          key_padding_mask=torch.zeros(1, 8, dtype=torch.bool))  # fmt: skip
    assert choose_kernel(q, None, masked=True) is Kernel.MATH  # the CPU's choice


def test_ranks_that_disagree_on_the_mask_fail_together():
    from ringsim.comm import SimulatedCluster

    q = torch.zeros(1, 4, 2, 8, dtype=torch.float64)

    def rank_fn(comm):
        mask = torch.zeros(1, 4, dtype=torch.bool) if comm.rank == 1 else None
        return ring_dilated_attention(q, q, q, (8,), (1,), comm=comm, key_padding_mask=mask)

    with pytest.raises(Exception, match="key_padding=True"):
        SimulatedCluster(2, timeout=10.0).run(rank_fn)
