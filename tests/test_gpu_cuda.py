"""Kernel adapters, their backward and dilated_attention on a CUDA device, against float64
(SPEC 9).

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
from ringsim.gpu.executor.schedule import Schedule  # noqa: E402
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


def test_cuda_graph_forward_equals_eager_and_takes_new_inputs():
    """The graphed forward replays the eager one (same kernels, same order): equal results,
    fresh ones for new inputs, and clones that a later replay does not overwrite."""
    from ringsim.gpu.executor.graphs import clear_graphs

    args = ((256, 512, 1024), (1, 2, 4))
    shape = (1, 1024, 8, 64)
    runs = []
    for seed in (51, 52):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v = (
            torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in "qkv"
        )
        eager = dilated_attention(q, k, v, *args, is_causal=True, return_lse=True)
        graphed = dilated_attention(
            q, k, v, *args, is_causal=True, return_lse=True, cuda_graph=True
        )
        runs.append((eager, graphed))
    for eager, graphed in runs:  # the first run's clones survive the second replay
        assert torch.equal(eager[0], graphed[0]) and torch.equal(eager[1], graphed[1])
    assert not torch.equal(runs[0][1][0], runs[1][1][0])
    clear_graphs()


def test_cuda_graph_refuses_what_it_cannot_capture():
    q = torch.randn(1, 1000, 4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"cuda_graph: .* aligned configuration"):
        dilated_attention(q, q, q, (300,), (1,), cuda_graph=True)  # ragged: 300 ∤ 1000
    x = q[:, :512].clone().requires_grad_()
    with pytest.raises(ValueError, match=r"cuda_graph: .* forward only"):
        dilated_attention(x, x, x, (256,), (1,), cuda_graph=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 72])
def test_fused_merge_equals_the_torch_merge(dtype, head_dim):
    """The Triton merge against ``lerp_merge_`` on strided views of float32 accumulators,
    with rows empty in the block, empty so far, empty in both, and a NaN row."""
    from ringsim.gpu.executor.merge import fused_merge_reason, lerp_merge_
    from ringsim.gpu.executor.merge_triton import fused_merge_

    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    b, n, h, d = 2, 96, 6, head_dim
    out = torch.randn(b, n, h, d, generator=gen, device="cuda")
    lse = 3 * torch.randn(b, n, h, generator=gen, device="cuda")
    lse[:, 5], lse[:, 7] = -math.inf, -math.inf  # empty so far
    view = lambda x: x.view(b, n // 2, 2, h, *x.shape[3:])[:, :, 1, ::2].transpose(1, 2)  # noqa: E731
    shape = view(out).shape
    block_out = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    block_lse = 3 * torch.randn(shape[:3], generator=gen, device="cuda")
    block_lse[:, :, 3] = -math.inf  # row 7 of out (view row 3): empty in both
    block_lse[:, :, 10] = -math.inf  # empty in the block only
    block_lse[:, :, 12] = math.nan
    assert fused_merge_reason(view(out), block_out) is None
    want_out, want_lse = out.clone(), lse.clone()
    lerp_merge_(view(want_out), view(want_lse), block_out, block_lse)
    fused_merge_(view(out), view(lse), block_out, block_lse)
    assert torch.equal(torch.isnan(out), torch.isnan(want_out))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    finite = ~torch.isnan(want_out)
    assert (out[finite] - want_out[finite]).abs().max() < 1e-5
    same = torch.isfinite(want_lse)
    assert (lse[same] - want_lse[same]).abs().max() < 1e-5


# The aligned forward on CUDA: every pair's calls (strided, gathered or on side streams),
# then one Triton mixing pass (gpu/executor/forward.py, gpu/executor/mix_triton.py).
ALIGNED = ((256, 512, 1024, 2048), (1, 2, 4, 8))


@pytest.mark.parametrize("schedule", ["strided", "gathered", "streams"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_aligned_forward_matches_definition(monkeypatch, schedule, dtype, causal):
    from ringsim.gpu.executor import forward

    calls = []
    monkeypatch.setattr(forward, "schedule", lambda *a, **k: calls.append(1) or Schedule(schedule))
    q, k, v = draw((2, 2048, 8, 64), dtype, 7 + causal, "cuda")
    ref = naive_dilated(q.double(), k.double(), v.double(), *ALIGNED, is_causal=causal)
    naive = naive_dilated(q, k, v, *ALIGNED, is_causal=causal)
    bound = bounds(dtype, max_abs_err(naive[0], ref[0]), max_abs_err(naive[1], ref[1]))
    out, lse = dilated_attention(q, k, v, *ALIGNED, is_causal=causal, return_lse=True)
    err = max_abs_err(out, ref[0]), max_abs_err(lse, ref[1])
    assert calls and err[0] <= bound[0] and err[1] <= bound[1], f"{err} > {bound}"


def test_aligned_forward_equals_the_accumulating_path(monkeypatch):
    """Same kernels, same float32 arithmetic up to the order of the merges."""
    from ringsim.gpu.executor import forward

    q, k, v = draw((1, 4096, 16, 128), torch.bfloat16, 3, "cuda")
    args = ((512, 1024, 2048, 4096), (1, 2, 4, 8))
    mixed = dilated_attention(q, k, v, *args, is_causal=True, return_lse=True)
    monkeypatch.setattr(forward, "mix_reason", lambda q: "accumulate, for the comparison")
    accumulated = dilated_attention(q, k, v, *args, is_causal=True, return_lse=True)
    assert max_abs_err(mixed[0], accumulated[0]) <= 2**-7  # one bf16 rounding of |out| < 2
    assert max_abs_err(mixed[1], accumulated[1]) <= 1e-5


def test_schedule_follows_the_tiles_per_multiprocessor(monkeypatch):
    from ringsim.config import make_config
    from ringsim.gpu.executor import schedule as sched
    from ringsim.plan import pair_groups

    monkeypatch.setattr(sched, "_multiprocessors", lambda device: 132)
    config = make_config((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16))
    cuda = torch.device("cuda")

    def plan(groups, n, device=cuda):
        w, r = groups[0].pattern.effective_length(n), groups[0].pattern.dilation_rate
        return sched.schedule(groups, 1, n // w, w // r, device).value

    plans = {n: [plan(g, n) for g in pair_groups(config, 16)] for n in (32768, 1048576)}
    assert plans[32768] == ["strided", "streams", "streams", "gathered", "gathered"]
    assert plans[1048576] == ["strided", "strided", "strided", "strided", "streams"]
    assert plan(pair_groups(config, 16)[4], 32768, torch.device("cpu")) == "strided"


def test_batched_inputs_that_are_not_contiguous():
    """(b, h, n, d) storage seen as (b, n, h, d): batch and segments do not share a stride."""
    q, k, v = (x.transpose(1, 2) for x in draw((2, 8, 2048, 64), torch.bfloat16, 5, "cuda"))
    assert not q.is_contiguous()
    out = dilated_attention(q, k, v, *ALIGNED, is_causal=True)
    want = dilated_attention(*(x.contiguous() for x in (q, k, v)), *ALIGNED, is_causal=True)
    assert torch.equal(out, want)


@pytest.mark.parametrize("schedule", ["gathered", "streams"])
def test_cuda_graph_captures_each_schedule(monkeypatch, schedule):
    """Side streams and gathers inside a capture: the replay equals eager on new inputs."""
    from ringsim.gpu.executor import forward
    from ringsim.gpu.executor.graphs import clear_graphs

    monkeypatch.setattr(forward, "schedule", lambda *a, **k: Schedule(schedule))
    for seed in (61, 62):
        q, k, v = draw((1, 2048, 8, 64), torch.bfloat16, seed, "cuda")
        eager = dilated_attention(q, k, v, *ALIGNED, is_causal=True, return_lse=True)
        graphed = dilated_attention(
            q, k, v, *ALIGNED, is_causal=True, return_lse=True, cuda_graph=True
        )
        assert torch.equal(eager[0], graphed[0]) and torch.equal(eager[1], graphed[1])
    clear_graphs()


def test_a_graph_the_caller_captures_takes_the_accumulating_path():
    """The mixing path's tables could not outlive a capture it does not own: under the
    caller's own torch.cuda.graph the forward accumulates instead, and replays correctly."""
    from ringsim.gpu.executor.merge import mix_reason

    q, k, v = draw((1, 2048, 8, 64), torch.bfloat16, 71, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            dilated_attention(q, k, v, *ALIGNED, is_causal=True)
    torch.cuda.current_stream().wait_stream(side)
    graph, reasons = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        reasons.append(mix_reason(q))
        static_out = dilated_attention(q, k, v, *ALIGNED, is_causal=True)
    assert "outside cuda_graph=True" in reasons[0]
    q.copy_(draw((1, 2048, 8, 64), torch.bfloat16, 72, "cuda")[0])
    graph.replay()
    want = dilated_attention(q, k, v, *ALIGNED, is_causal=True)
    assert max_abs_err(static_out, want) <= 2**-7


def test_backward_on_side_streams_equals_the_serial_backward(monkeypatch):
    """The groups of a small pair write disjoint heads of dq, dk, dv: side by side on the
    side streams they give the serial gradients (up to the kernels' own atomics)."""
    from ringsim.gpu.executor import backward

    q, k, v = draw((1, 2048, 8, 64), torch.bfloat16, 81, "cuda")
    dout = draw((1, 2048, 8, 64), torch.bfloat16, 82, "cuda")[0]
    grads = {}
    for plan in ("strided", "streams"):
        monkeypatch.setattr(backward, "schedule", lambda *a, plan=plan, **k: Schedule(plan))
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        dilated_attention(*x, *ALIGNED, is_causal=True).backward(dout)
        grads[plan] = [t.grad for t in x]
    for serial, sides in zip(grads["strided"], grads["streams"]):
        assert max_abs_err(sides, serial) <= 2**-6


# The ring's step executor on CUDA, over the simulated cluster on one GPU: blocks received in
# the gathered layout, one mixing pass per step with the running state carried between steps.
RING = ((256, 1024, 4096), (1, 2, 4))


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_simulated_ring_on_cuda_matches_definition(world_size, causal):
    from ringsim.gpu import simulated_ring_dilated_attention

    q, k, v = draw((1, 4096, 8, 64), torch.bfloat16, 90 + world_size + causal, "cuda")
    ref = naive_dilated(q.double(), k.double(), v.double(), *RING, is_causal=causal)
    naive = naive_dilated(q, k, v, *RING, is_causal=causal)
    bound = bounds(torch.bfloat16, max_abs_err(naive[0], ref[0]), max_abs_err(naive[1], ref[1]))
    out, lse = simulated_ring_dilated_attention(
        q, k, v, *RING, world_size=world_size, is_causal=causal, return_lse=True
    )
    err = max_abs_err(out, ref[0]), max_abs_err(lse, ref[1])
    assert err[0] <= bound[0] and err[1] <= bound[1], f"{err} > {bound}"


def test_simulated_ring_gradients_on_cuda_match_one_device():
    """The ring backward's executor (float32 dK/dV shares in the gathered layout, sent on and
    home) against the single device's, in bf16."""
    from ringsim.gpu import simulated_ring_dilated_attention

    q, k, v = draw((1, 4096, 8, 64), torch.bfloat16, 95, "cuda")
    dout = draw((1, 4096, 8, 64), torch.bfloat16, 96, "cuda")[0]
    grads = []
    for world_size in (1, 4):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        simulated_ring_dilated_attention(*x, *RING, world_size=world_size, is_causal=True).backward(
            dout
        )
        grads.append([t.grad.float() for t in x])
    for one, ring in zip(*grads):
        assert max_abs_err(ring, one) <= 2**-5 * max(1.0, one.abs().max().item())
