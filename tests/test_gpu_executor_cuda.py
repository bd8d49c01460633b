"""The step executor on a CUDA device: the fused merge, the aligned forward in every schedule,
CUDA graphs, the backward on side streams and the simulated ring, against float64 (spec §9).

Needs a CUDA device: every test here is skipped, with that reason, elsewhere.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")


from ringsim.gpu import dilated_attention  # noqa: E402
from ringsim.gpu.executor.schedule import Schedule  # noqa: E402
from ringsim.gpu.harness.check_support import (  # noqa: E402
    bounds,
    draw,
    max_abs_err,
    naive_dilated,
)
from ringsim.gpu.harness.timing import captured  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("no_tf32"),
]


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


@pytest.mark.parametrize("warm", ["on the capture stream", "elsewhere"])
def test_a_graph_the_caller_captures_mixes_and_outlives_the_caches(monkeypatch, warm):
    """Under the caller's own torch.cuda.graph the forward mixes, as eagerly (Note [Tables in
    CUDA graphs]). What the graph reads survives the caches turning over and the allocator
    handing their memory to other tensors: cached tables (warmed up on the capture stream)
    and tables built inside the capture (warmed up elsewhere) alike. The gathered schedule
    makes the forward read index tables too."""
    from ringsim.gpu.executor import forward, mix_triton
    from ringsim.gpu.executor.cache import CACHES

    monkeypatch.setattr(forward, "schedule", lambda *a, **k: Schedule("gathered"))
    mixes = []
    mix = mix_triton.mix_
    monkeypatch.setattr(mix_triton, "mix_", lambda *a: mixes.append(1) or mix(*a))
    q, k, v = draw((1, 2048, 8, 64), torch.bfloat16, 71, "cuda")
    side = torch.cuda.Stream()
    misses = {}

    def run():  # the cache's counts and the mixes of the last (captured) call
        misses.update((name, cache.misses) for name, cache in CACHES.items())
        mixes.clear()
        return dilated_attention(q, k, v, *ALIGNED, is_causal=True)

    elsewhere = None if warm == "on the capture stream" else torch.cuda.Stream()
    graph, static_out = captured(run, stream=side, warm_stream=elsewhere)
    assert mixes, "the caller's capture did not take the mixing path"
    # the mixing table names the parts' addresses, new in the capture: built there either way
    indices = CACHES["gather indices"].misses - misses["gather indices"]
    assert CACHES["mixing tables"].misses > misses["mixing tables"]
    assert (indices == 0) == (warm == "on the capture stream")
    for cache in CACHES.values():  # every entry evicted, its memory handed out again
        cache.entries.clear()
    with torch.cuda.stream(side):  # (the allocator reuses a block on the stream that freed it)
        junk = [torch.full((n,), -(2**40), dtype=torch.int64, device="cuda")
                for n in (64, 128, 256, 512, 1024, 2048, 4096) for _ in range(64)]  # fmt: skip
    q.copy_(draw((1, 2048, 8, 64), torch.bfloat16, 72, "cuda")[0])
    graph.replay()
    torch.cuda.synchronize()
    want = dilated_attention(q, k, v, *ALIGNED, is_causal=True)
    assert max_abs_err(static_out, want) <= 2**-7
    del junk, graph


def test_the_general_mixing_and_summing_kernels_equal_the_residue_programs(monkeypatch):
    """Where residue programs cannot run (a head_dim not a power of 2, widths that R x BLOCK_N
    does not divide: Note [Residue programs]) the general kernels mix and sum. Forced here on
    a configuration the residue programs serve, so both compile on the GPU: the same output,
    lse and gradients up to the order of float32 additions."""
    from ringsim.gpu.executor import mix_triton

    q, k, v = (x.requires_grad_() for x in draw((1, 2048, 8, 64), torch.bfloat16, 78, "cuda"))
    dout = draw((1, 2048, 8, 64), torch.bfloat16, 79, "cuda")[0]
    results, shapes, real = {}, [], mix_triton.residue_shape
    for kernels in ("residue", "general"):
        shapes.clear()
        chosen = real if kernels == "residue" else lambda *a: None
        monkeypatch.setattr(mix_triton, "residue_shape", lambda *a, f=chosen: (
            shapes.append(f(*a)) or shapes[-1]))  # fmt: skip
        out, lse = dilated_attention(q, k, v, *ALIGNED, is_causal=True, return_lse=True)
        results[kernels] = (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
        assert len(shapes) == 4 and all((x is None) == (kernels == "general") for x in shapes)
    for residue, general in zip(results["residue"], results["general"]):
        assert max_abs_err(general, residue) <= 2**-6


def test_a_training_step_the_caller_captures_replays_the_eager_gradients(monkeypatch):
    """Forward + backward under the caller's torch.cuda.graph: the backward's direct path
    (parts and Triton sums, Note [Direct gradients]) captures too, and a replay on new
    inputs gives the eager gradients."""
    from ringsim.gpu.executor import mix_triton

    sums = []
    total = mix_triton.sum_
    monkeypatch.setattr(mix_triton, "sum_", lambda *a: sums.append(1) or total(*a))
    q, k, v = (x.requires_grad_() for x in draw((1, 2048, 8, 64), torch.bfloat16, 73, "cuda"))
    dout = draw((1, 2048, 8, 64), torch.bfloat16, 74, "cuda")[0]

    def step():
        out = dilated_attention(q, k, v, *ALIGNED, is_causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    graph, static = captured(lambda: sums.clear() or step())
    assert sums, "the captured backward did not sum its parts"
    with torch.no_grad():
        for x, seed in zip((q, k, v), (75, 76, 77)):
            x.copy_(draw((1, 2048, 8, 64), torch.bfloat16, seed, "cuda")[0])
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(static, step()):  # up to the backward kernels' own atomics
        assert max_abs_err(got, want) <= 2**-6


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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize(
    ("n", "segs"), [(2048, ALIGNED), (1400, ((300, 700), (1, 3)))], ids=["aligned", "ragged"]
)
def test_tensors_on_a_device_that_is_not_current(n, segs):
    """Tensors on cuda:1 while cuda:0 is current: every kernel, the Triton mix and merge
    included, runs on the tensors' device (the conformance suite caught the Triton launches
    going to the current device: "Pointer argument cannot be accessed from Triton")."""
    torch.cuda.set_device(0)
    q, k, v = (x.requires_grad_(True) for x in draw((1, n, 8, 64), torch.float32, 3, "cuda:1"))
    out = dilated_attention(q, k, v, *segs, is_causal=True)
    ref = naive_dilated(q.double(), k.double(), v.double(), *segs, is_causal=True)
    assert out.device == q.device and max_abs_err(out, ref[0]) <= 2e-5
    (out * torch.randn_like(out)).sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))
