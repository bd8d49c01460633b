"""The memory pool (Note [The memory pool] in :mod:`ringsim.gpu.executor.pool`).

A call with a pool computes exactly what it computes without one, forward and backward; a
second call of the same shapes takes every working buffer from the pool (no new buffer);
a result never aliases a pooled buffer, so the next call cannot overwrite it; the bound
holds; the modules own their pool and free it with themselves; bad uses are named. On a
ring the received blocks and dK/dV shares land in the pool's buffers too, one set per batch
(a pool that gave two batches one buffer is caught).
"""

from __future__ import annotations

import gc
import weakref

import pytest

torch = pytest.importorskip("torch")

from ringsim.cases import Case  # noqa: E402
from ringsim.comm.traced import run_traced  # noqa: E402
from ringsim.config import validate  # noqa: E402
from ringsim.gpu import RingDilatedAttention, dilated_attention  # noqa: E402
from ringsim.gpu.executor.pool import MemoryPool  # noqa: E402
from ringsim.gpu.harness.timing import captured  # noqa: E402
from ringsim.gpu.kernels import Kernel  # noqa: E402
from ringsim.gpu.ring import comm as ring_comm  # noqa: E402
from ringsim.gpu.ring.rank import ring_backward, ring_forward  # noqa: E402
from ringsim.layout import shard  # noqa: E402

CASES = {  # the accumulate path (ragged) and the strided path (aligned)
    "ragged": Case(2, 18, 4, 8, (5, 18), (1, 2), True),
    "aligned": Case(2, 16, 4, 8, (4, 16), (1, 2), False),
}


def run(case: Case, pool, seed: int = 0):
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in case.inputs(seed=seed))
    out, lse = dilated_attention(q, k, v, case.segment_lengths, case.dilation_rates,
                                 **case.kwargs(), return_lse=True, memory_pool=pool)  # fmt: skip
    out.backward(torch.from_numpy(case.upstream(seed=seed)))
    return out.detach(), lse, q.grad, k.grad, v.grad


@pytest.mark.parametrize("name", list(CASES))
def test_pooled_calls_equal_unpooled_and_reuse_every_buffer(name):
    case, pool = CASES[name], MemoryPool()
    plain = run(case, None)
    first = run(case, pool)
    kept, misses = len(pool.buffers), pool.misses
    second = run(case, pool)
    for a, b, c in zip(plain, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert pool.misses == misses and len(pool.buffers) == kept  # nothing new
    assert pool.hits >= kept > 0
    for x in (*first, *second):  # results are the caller's, not the pool's
        assert not pool.holds(x)


#: Causal, r > 1, segments inside a shard and across all three (4 ring steps at P = 3).
RING = Case(1, 24, 4, 8, (6, 24), (1, 2), True, world_size=3)


def ring_run(case: Case, pools, seed: int):
    """Every rank's ``(out, lse, dq, dk, dv)`` of the torch ring on the simulated cluster,
    rank r with ``pools[r]`` (None: no pool)."""
    q, k, v, dout = (torch.from_numpy(x) for x in (*case.inputs(seed), case.upstream(seed)))
    p = case.world_size
    config = validate(q, k, v, case.segment_lengths, case.dilation_rates,
                      is_causal=case.is_causal, world_size=p)  # fmt: skip

    def run_rank(comm, trace):
        mine = [shard(x, comm.rank, p) for x in (q, k, v, dout)]
        pool = pools[comm.rank]
        out, lse = ring_forward(*mine[:3], config, comm, Kernel.MATH, None, pool=pool)
        grads = ring_backward(*mine[:3], out, lse, mine[3], None, config, comm, Kernel.MATH,
                              None, pool=pool)  # fmt: skip
        return out, lse, *grads

    return run_traced(p, run_rank)[0]


def test_a_ring_receives_into_its_pool_one_buffer_set_per_batch():
    pools = [MemoryPool() for _ in range(RING.world_size)]
    ring_run(RING, pools, seed=1)  # other inputs first: their buffers are reused
    misses = [pool.misses for pool in pools]
    pooled, plain = ring_run(RING, pools, seed=2), ring_run(RING, [None] * 3, seed=2)
    for got, want, pool in zip(pooled, plain, pools):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert not any(pool.holds(x) for x in got)
    assert [pool.misses for pool in pools] == misses  # nothing new
    roles = {key[0][0] for pool in pools for key in pool.buffers}
    assert {"forward receives", "backward receives"} <= roles
    batches = {key[0][1] for pool in pools for key in pool.buffers if "receives" in key[0][0]}
    assert len(batches) > 2  # several batches, each with its own buffers


def test_a_pool_that_gives_two_batches_one_buffer_is_caught(monkeypatch):
    """The mutant: receive buffers keyed without the batch, so a later batch overwrites a
    block (or a dK/dV share) still held."""
    start = ring_comm.PooledReceives.start

    def one_set(self, sends, recvs):
        self.batches = 0
        return start(self, sends, recvs)

    monkeypatch.setattr(ring_comm.PooledReceives, "start", one_set)
    pools = [MemoryPool() for _ in range(RING.world_size)]
    pooled, plain = ring_run(RING, pools, seed=3), ring_run(RING, [None] * 3, seed=3)
    assert not all(torch.equal(a, b) for got, want in zip(pooled, plain) for a, b in zip(got, want))


def test_a_result_survives_the_next_call():
    case, pool = CASES["ragged"], MemoryPool()
    first = run(case, pool, seed=1)
    kept = [x.clone() for x in first]
    run(case, pool, seed=2)  # other inputs, the same buffers
    for a, b in zip(first, kept):
        assert torch.equal(a, b)


def test_the_bound_keeps_nothing_past_it():
    case, pool = CASES["ragged"], MemoryPool(max_bytes=0)
    assert torch.equal(run(case, pool)[0], run(case, None)[0])
    assert not pool.buffers and pool.misses > 0 and pool.hits == 0


def test_a_module_owns_its_pool_and_frees_it_with_itself():
    case = CASES["ragged"]
    module = RingDilatedAttention(case.segment_lengths, case.dilation_rates,
                                  enable_memory_pool=True)  # fmt: skip
    q, k, v = (torch.from_numpy(x) for x in case.inputs())
    module(q, k, v, is_causal=True)
    module(q, k, v, is_causal=True)
    assert module.memory_pool.hits > 0 and module.memory_pool.buffers
    assert RingDilatedAttention((4,), (1,)).memory_pool is None
    ref = weakref.ref(module.memory_pool)
    del module
    gc.collect()
    assert ref() is None


def test_bad_uses_are_named():
    q = torch.zeros(1, 8, 2, 8)
    with pytest.raises(TypeError, match="memory_pool: expected a MemoryPool"):
        dilated_attention(q, q, q, (4,), (1,), memory_pool={})
    with pytest.raises(ValueError, match="memory_pool: a CUDA graph"):
        dilated_attention(q, q, q, (4,), (1,), memory_pool=MemoryPool(), cuda_graph=True)
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryPool(max_bytes=-1)
    with pytest.raises(TypeError, match="enable_memory_pool: expected a bool"):
        RingDilatedAttention((4,), (1,), enable_memory_pool="yes")


def test_the_pattern_caches_report_their_hits():
    """The seed's "pattern caching" is the plan, row-batch and index caches: a repeated call
    hits them (cache_report, which the profile prints)."""
    from ringsim.gpu.executor.cache import cache_report

    case = CASES["ragged"]
    run(case, None)
    before = cache_report()
    run(case, None)
    after = cache_report()
    for name in ("plans", "row batches", "row indices"):
        assert after[name][0] > before[name][0], name  # hits
        assert after[name][1] == before[name][1], name  # no new miss


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
#: Sized for the GPU kernels (head_dim 64), aligned: what a CUDA graph can capture.
GPU_CASE = Case(2, 1024, 4, 64, (256, 1024), (1, 2), True)


def gpu_inputs(seed: int):
    return [torch.from_numpy(x).to("cuda", torch.bfloat16) for x in GPU_CASE.inputs(seed=seed)]


def gpu_call(x, pool):
    return dilated_attention(*x, GPU_CASE.segment_lengths, GPU_CASE.dilation_rates,
                             **GPU_CASE.kwargs(), memory_pool=pool)  # fmt: skip


@needs_cuda
@torch.no_grad()
def test_a_captured_call_with_a_pool_replays_what_an_eager_call_computes():
    pool = MemoryPool()
    static = gpu_inputs(0)
    graph, out = captured(lambda: gpu_call(static, pool), warmups=3)
    for seed in (1, 2):
        fresh = gpu_inputs(seed)
        for s, x in zip(static, fresh):
            s.copy_(x)
        graph.replay()
        eager = gpu_call(fresh, pool)  # the same pool, on the main stream, between replays
        torch.cuda.synchronize()
        # a capture runs the same kernels as an eager call (Note [Tables in CUDA graphs])
        torch.testing.assert_close(out, gpu_call(fresh, None), atol=0, rtol=0)
        torch.testing.assert_close(eager, gpu_call(fresh, None), atol=0, rtol=0)


@needs_cuda
@torch.no_grad()
def test_calls_on_two_streams_at_once_take_different_buffers():
    pool, a, b = MemoryPool(), gpu_inputs(3), gpu_inputs(4)
    want = [gpu_call(a, None), gpu_call(b, None)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    got = []
    for _ in range(3):
        for s, x in zip(streams, (a, b)):
            with torch.cuda.stream(s):
                got.append(gpu_call(x, pool))
    torch.cuda.synchronize()
    for i, out in enumerate(got):
        assert torch.equal(out, want[i % 2])
    held = {key[-1] for key in pool.buffers}
    assert {s.cuda_stream for s in streams} <= held
