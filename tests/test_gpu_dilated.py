"""The torch backend on the CPU in float64 against the dense-mask definition.

Needs torch (the ``torch`` extra, installed by the project's set-up); skipped otherwise.
GPU kernels are checked on a GPU by ``python -m ringsim.gpu.harness.check``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ringsim.batches import row_batches  # noqa: E402
from ringsim.cases import fixed_cases, random_case  # noqa: E402
from ringsim.config import make_config  # noqa: E402
from ringsim.gpu import Kernel, choose_kernel, dilated_attention  # noqa: E402
from ringsim.gpu.executor import check_differentiable  # noqa: E402
from ringsim.gpu.executor.merge import merge  # noqa: E402
from ringsim.gpu.kernels import attend, math_attention  # noqa: E402
from ringsim.plan import pair_groups  # noqa: E402
from ringsim.reference import dense_dilated_attention  # noqa: E402
from ringsim.tolerance import max_abs_error, tolerance  # noqa: E402

CPU_KERNELS = [Kernel.MATH, Kernel.FLASH_CPU]


def cases():
    rng = np.random.default_rng(21)
    return fixed_cases(1) + fixed_cases(3) + [random_case(rng, 1, max_shard=40) for _ in range(60)]


def torch_run(case, q, k, v, kernel, dtype=torch.float64):
    args = [torch.from_numpy(x).to(dtype) for x in (q, k, v)]
    out, lse = dilated_attention(
        *args,
        case.segment_lengths,
        case.dilation_rates,
        **case.kwargs(),
        return_lse=True,
        kernel=kernel,
    )
    return out.double().numpy(), lse.double().numpy()


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_torch_matches_definition_float64(kernel):
    failures = []
    for i, case in enumerate(cases()):
        q, k, v = case.inputs(seed=i)
        out, lse = torch_run(case, q, k, v, kernel)
        ref_out, ref_lse = dense_dilated_attention(
            q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs()
        )
        err = max(max_abs_error(out, ref_out), max_abs_error(lse, ref_lse))
        if err > tolerance("float64"):
            failures.append(f"{case.describe()}: {err:.2e}")
    assert not failures, "\n".join(failures)


def test_torch_float32_within_spec():
    for i, case in enumerate(cases()[:20]):
        q, k, v = case.inputs(seed=i, dtype=np.float32)
        out, lse = torch_run(case, q, k, v, Kernel.MATH, torch.float32)
        ref_out, ref_lse = dense_dilated_attention(
            q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs()
        )
        assert max_abs_error(out, ref_out) <= tolerance("float32"), case.describe()
        assert max_abs_error(lse, ref_lse) <= tolerance("float32"), case.describe()


def test_empty_rows_are_zero_and_minus_inf():
    q, k, v = (torch.randn(1, 10, 2, 4, dtype=torch.float64) for _ in range(3))
    out, lse = dilated_attention(q, k, v, (3,), (5,), return_lse=True)  # r > w
    # head 1 (offset 1) selects position 1 of each segment except the last, length 1
    assert torch.isneginf(lse[0, 1, 9]) and torch.all(out[0, 9, 1] == 0)
    assert not torch.isnan(out).any()


def test_math_kernel_keeps_nan_and_zeroes_empty_rows():
    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64) for _ in range(3))
    q[0, 0, 1, 0] = float("nan")
    out, lse = math_attention(q, k, v, causal=True, scale=0.5)
    assert torch.isnan(lse[0, 0, 1]) and not torch.isnan(lse[0, 0, [0, 2]]).any()
    assert torch.isnan(out[0, 0, 1]).all() and not torch.isnan(out[0, 0, [0, 2]]).any()
    out, _ = math_attention(q[..., :0, :], k, v, causal=False, scale=0.5)
    assert out.shape == (1, 1, 0, 4)


def test_merge_matches_logsumexp_and_handles_empty():
    out = torch.zeros(2, 5, 3, dtype=torch.float32)
    lse = torch.full((2, 5), -torch.inf)
    parts = [(torch.randn(2, 5, 3), torch.randn(2, 5) * 3) for _ in range(4)]
    parts[1][1][0, 2] = -torch.inf
    for o, l_ in parts:
        out, lse = merge(out, lse, o, l_)
    lses = torch.stack([l_ for _, l_ in parts])
    total = torch.logsumexp(lses, 0)
    expect = sum(torch.exp(l_ - total)[..., None] * o for o, l_ in parts)
    torch.testing.assert_close(lse, total)
    torch.testing.assert_close(out, expect)
    empty_out, empty_lse = merge(
        torch.zeros(1, 1, 2),
        torch.full((1, 1), -torch.inf),
        torch.zeros(1, 1, 2),
        torch.full((1, 1), -torch.inf),
    )
    assert torch.isneginf(empty_lse).all() and not torch.isnan(empty_out).any()


def test_aligned_configuration_is_one_batch_per_pair():
    config = make_config((8, 16, 32), (1, 2, 4))
    batches = [row_batches(groups, 64) for groups in pair_groups(config, 8)]
    assert [len(b) for b in batches] == [1, 1, 1]
    assert [b[0].shape for b in batches] == [(8, 8, 8), (8, 4, 8), (8, 2, 8)]


def test_ragged_batches_cover_every_selected_row_once():
    config = make_config((7, 10), (3, 4), mode="grouped")
    for groups in pair_groups(config, 5):
        seen = {}
        for batch in row_batches(groups, 23):
            for head, rows in zip(batch.heads, batch.rows):
                for r in rows.ravel():
                    assert (head, r) not in seen
                    seen[(head, r)] = True
        w, r = groups[0].pattern.segment_length, groups[0].pattern.dilation_rate
        expect = {
            (h, x)
            for g in groups
            for h in g.heads
            for x in range(23)
            if (x % w) % r == g.pattern.offset
        }
        assert set(seen) == expect


def test_kernel_choice_is_a_capability_check():
    q = torch.randn(1, 2, 4, 8)
    assert choose_kernel(q) is Kernel.MATH  # no GPU here
    assert choose_kernel(q, "flash_cpu") is Kernel.FLASH_CPU
    with pytest.raises(ValueError, match="kernel: flash cannot run here: flash needs a CUDA"):
        choose_kernel(q, Kernel.FLASH)
    with pytest.raises(ValueError, match="kernel: must be one of"):
        choose_kernel(q, "fast")
    with pytest.raises(ValueError, match="kernel: flash_cpu cannot run here"):
        choose_kernel(q.half(), Kernel.FLASH_CPU)


def test_preference_and_substitutions_are_rules_of_shapes():
    """Note [The kernel choice]: the order per architecture and each documented substitution,
    decided from shapes alone (the CUDA tests run the kernels themselves)."""
    from ringsim.gpu.kernels import (
        HOPPER_PREFERENCE,
        MAX_BLOCKS,
        MAX_EXTENT,
        PREFERENCE,
        backward_kernel,
        block_kernel,
        blocks_per_call,
        preference,
        unaligned,
    )

    assert HOPPER_PREFERENCE[0] is Kernel.CUDNN and PREFERENCE[0] is Kernel.FLASH
    assert preference(torch.device("cpu")) == PREFERENCE
    assert block_kernel(Kernel.CUDNN, 1) is Kernel.MATH
    assert block_kernel(Kernel.CUDNN, 2) is Kernel.CUDNN
    assert block_kernel(Kernel.FLASH, 1) is Kernel.FLASH
    q, k = torch.empty(2, 1, 64, 8), torch.empty(2, 1, 192, 8)
    # cuDNN's backward on a non-causal s_kv % 128 == 64 block: flash, or efficient without it
    assert backward_kernel(Kernel.CUDNN, q, k, False) is Kernel.EFFICIENT  # no flash on a CPU
    assert backward_kernel(Kernel.CUDNN, q, k, True) is Kernel.CUDNN
    assert backward_kernel(Kernel.CUDNN, q, torch.empty(2, 1, 128, 8), False) is Kernel.CUDNN
    assert backward_kernel(Kernel.FLASH, q, k, False) is Kernel.FLASH
    # calls split where a tensor would span more than 2^31 elements, or past the grid
    big = torch.empty(0, device="meta").as_strided((1024, 4, 2048, 128), (1 << 22, 128, 2048, 1))
    per = blocks_per_call(big)
    assert (per - 1) * (1 << 22) + 3 * 128 + 2047 * 2048 + 127 <= MAX_EXTENT
    assert per * (1 << 22) + 3 * 128 + 2047 * 2048 + 127 > MAX_EXTENT
    assert blocks_per_call(torch.empty(10**6, 1, 1, 8, device="meta")) == MAX_BLOCKS
    assert unaligned(torch.empty(9)[1:]) is not None and unaligned(torch.empty(8)) is None


def test_flash_cpu_adapter_matches_math():
    q, k, v = (torch.randn(3, 2, 17, 8, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        o1, l1 = attend(q, k, v, causal=causal, scale=0.3, kernel=Kernel.FLASH_CPU)
        o2, l2 = attend(q, k, v, causal=causal, scale=0.3, kernel=Kernel.MATH)
        torch.testing.assert_close(o1, o2)
        torch.testing.assert_close(l1.double(), l2)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (dict(q=np.zeros((1, 4, 2, 4))), TypeError, "q: expected a torch.Tensor"),
        (dict(q=torch.zeros(1, 4, 2, 4, dtype=torch.int64)), TypeError, "q"),
        (dict(segment_lengths=(4, 4)), ValueError, "equal length"),
        (dict(mode="dense"), ValueError, "mode"),
    ],
)
def test_bad_input(args, error, match):
    x = torch.randn(1, 4, 2, 4)
    kwargs = dict(q=x, k=x, v=x, segment_lengths=(4,), dilation_rates=(1,))
    kwargs.update(args)
    if isinstance(kwargs["q"], np.ndarray) or kwargs["q"].dtype == torch.int64:
        kwargs["k"] = kwargs["v"] = kwargs["q"]
    with pytest.raises(error, match=match):
        dilated_attention(**kwargs)


@pytest.mark.parametrize("mode", ["longnet", "grouped"])
@pytest.mark.parametrize("causal", [False, True])
def test_aligned_configurations_take_the_strided_path(mode, causal):
    from ringsim.gpu.executor import ForwardExecutor
    from ringsim.plan import rank_plan

    config = make_config((8, 16, 32), (1, 2, 4), is_causal=causal, mode=mode)
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal((2, 32, 8, 4)) for _ in range(3))
    tensors = [torch.from_numpy(x) for x in (q, k, v)]
    executor = ForwardExecutor(*tensors, rank_plan(config, 8, 32, 1, 0), config, Kernel.MATH)
    assert executor.aligned and not executor.mixing  # strided views, float64 accumulators
    out, lse = dilated_attention(
        *(torch.from_numpy(x) for x in (q, k, v)),
        (8, 16, 32),
        (1, 2, 4),
        is_causal=causal,
        mode=mode,
        return_lse=True,
    )
    ref_out, ref_lse = dense_dilated_attention(
        q, k, v, (8, 16, 32), (1, 2, 4), is_causal=causal, mode=mode
    )
    assert max_abs_error(out.numpy(), ref_out) <= tolerance("float64")
    assert max_abs_error(lse.numpy(), ref_lse) <= tolerance("float64")


def test_heads_slices_and_aligned_configurations():
    from ringsim.gpu.executor.layout import heads_slice

    assert heads_slice((1, 3, 5), 2) == slice(1, 6, 2)
    assert heads_slice((1, 2, 5), 2) is None
    assert make_config((8, 16), (2, 4)).is_aligned(32)
    assert not make_config((10, 16), (2, 4)).is_aligned(32)  # 10 does not divide 32
    assert not make_config((8, 12), (2, 4)).is_aligned(24, 2)  # c = 12: 8 does not divide it
    assert make_config((8, 16), (2, 4)).is_aligned(32, 4)  # c = 8: 16 is two shards


@pytest.mark.parametrize("segments", [(8, 16, 32), (10, 16, 32)])  # covered, not covered
def test_unfilled_accumulators_are_fully_written(monkeypatch, segments):
    """Every tensor made with ``torch.empty`` is poisoned with NaN: every element is
    written before it is read."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 32, 4, 4)) for _ in range(3))
    out, lse = dilated_attention(
        *(torch.from_numpy(x) for x in (q, k, v)),
        segments,
        (1, 2, 4),
        is_causal=True,
        return_lse=True,
    )
    ref_out, ref_lse = dense_dilated_attention(q, k, v, segments, (1, 2, 4), is_causal=True)
    assert max_abs_error(out.numpy(), ref_out) <= tolerance("float64")
    assert max_abs_error(lse.numpy(), ref_lse) <= tolerance("float64")


def test_flex_gradients_are_refused_before_any_work():
    """FlexAttention has no backward from an external lse: asking for gradients through it
    raises before any work (FlexAttention itself needs CUDA, so the check is called here);
    without gradients it is fine."""
    q, k, v = (torch.randn(1, 16, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with pytest.raises(NotImplementedError, match="kernel: flex has no backward"):
        check_differentiable(q, k, v, Kernel.FLEX)
    with torch.no_grad():
        check_differentiable(q, k, v, Kernel.FLEX)
    check_differentiable(q, k, v, Kernel.FLASH_CPU)


@pytest.mark.parametrize("segments", [(8, 16, 32), (10, 16, 32)])  # aligned, ragged
def test_batched_inputs_that_are_not_contiguous(segments):
    """(b, h, n, d) storage seen as (b, n, h, d): batch and segments share no stride, so the
    strided blocks are copies; the result is the contiguous inputs' one, to the bit."""
    rng = np.random.default_rng(8)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 4, 32, 8))).transpose(1, 2) for _ in "qkv")
    assert not q.is_contiguous()
    out = dilated_attention(q, k, v, segments, (1, 2, 4), is_causal=True)
    dense = (x.contiguous() for x in (q, k, v))
    assert torch.equal(out, dilated_attention(*dense, segments, (1, 2, 4), is_causal=True))
