"""Torch gradients on the CPU in float64 against the dense-mask gradient: one device, the
simulated ring (global and per rank). Real gloo processes run forward and backward in
``test_gpu_ring.py`` (``ringsim.gpu.harness.distcheck``).

Needs torch (the ``torch`` extra, installed by the project's set-up); skipped otherwise.
GPU kernels' backward is checked on a GPU by ``python -m ringsim.gpu.harness.check``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from grad_oracle import dense_gradients  # noqa: E402
from ring_support import WORLD_SIZES, ring_cases  # noqa: E402

from ringsim.cases import Case, fixed_cases, random_case  # noqa: E402
from ringsim.comm import RankFailed, SimulatedCluster  # noqa: E402
from ringsim.gpu import (  # noqa: E402
    dilated_attention,
    ring_dilated_attention,
    simulated_ring_dilated_attention,
)
from ringsim.tolerance import max_abs_error, tolerance  # noqa: E402

TOL = 10 * tolerance("float64")  # a gradient sums ~n terms: 10x the bound of out


def inputs(case: Case, seed: int, dtype=torch.float64):
    """q, k, v (requiring grad), dout and dlse of ``case``, from ``seed``."""
    q, k, v = (torch.from_numpy(x).to(dtype).requires_grad_() for x in case.inputs(seed=seed))
    rng = np.random.default_rng(500 + seed)
    b, n, h, d = case.shape
    dout = torch.from_numpy(rng.standard_normal((b, n, h, d))).to(dtype)
    dlse = torch.from_numpy(rng.standard_normal((b, h, n))).to(dtype)
    return q, k, v, dout, dlse


def check(case: Case, q, k, v, dout, dlse, out, lse, use_lse: bool) -> list[str]:
    """Backpropagate ``<dout, out> (+ <dlse, lse>)`` and compare with the oracle."""
    finite = torch.isfinite(lse)
    loss = (dout * out).sum()
    if use_lse:
        loss = loss + (dlse * torch.where(finite, lse, 0)).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    want = dense_gradients(
        case,
        *(x.detach().double().numpy() for x in (q, k, v, dout)),
        dlse.double().numpy() * finite.double().numpy() if use_lse else None,
    )
    errors = [max_abs_error(g.double().numpy(), w) for g, w in zip(grads, want)]
    return [] if max(errors) <= TOL else [f"{case.describe()}: dq/dk/dv errors {errors}"]


def single_cases():
    rng = np.random.default_rng(31)
    return fixed_cases(1) + fixed_cases(3) + [random_case(rng, 1, max_shard=30) for _ in range(30)]


@pytest.mark.parametrize("kernel", ["math", "flash_cpu"])
def test_single_device_gradients_match_definition(kernel):
    failures = []
    for i, case in enumerate(single_cases()):
        q, k, v, dout, dlse = inputs(case, i)
        out, lse = dilated_attention(
            q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs(),
            return_lse=True, kernel=kernel,
        )  # fmt: skip
        failures += check(case, q, k, v, dout, dlse, out, lse, use_lse=kernel == "math")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("kernel", ["math", "flash_cpu"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_simulated_ring_gradients_match_definition(world_size, kernel, layout):
    failures = []
    for i, case in enumerate(ring_cases([world_size], per_size=4, seed=23, layout=layout)):
        q, k, v, dout, dlse = inputs(case, i)
        out, lse = simulated_ring_dilated_attention(
            q, k, v, case.segment_lengths, case.dilation_rates, world_size=world_size,
            **case.kwargs(), return_lse=True, kernel=kernel, layout=layout,
        )  # fmt: skip
        failures += check(case, q, k, v, dout, dlse, out, lse, use_lse=kernel == "math")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_float32_gradients_within_spec(layout):
    for i, case in enumerate(ring_cases([1, 4], per_size=2, seed=5, layout=layout)):
        q, k, v, dout, _ = inputs(case, i, dtype=torch.float32)
        out = simulated_ring_dilated_attention(
            q, k, v, case.segment_lengths, case.dilation_rates, world_size=case.world_size,
            **case.kwargs(), layout=layout,
        )  # fmt: skip
        grads = torch.autograd.grad((dout * out).sum(), (q, k, v))
        want = dense_gradients(case, *(x.detach().double().numpy() for x in (q, k, v, dout)))
        for g, w in zip(grads, want):
            assert g.dtype == torch.float32
            assert max_abs_error(g.numpy(), w) <= 10 * tolerance("float32"), case.describe()


@pytest.mark.parametrize("world_size", [2, 3])
def test_per_rank_ring_backward_in_each_rank_thread(world_size):
    """The per-rank function's own backward (:class:`RingFunction`), each simulated rank
    calling backward in its thread, as ranks of torch.distributed do (CPU autograd runs in
    the calling thread)."""
    case = Case(1, 6 * world_size, 3, 4, (4, 6 * world_size), (1, 2), True, "longnet")
    case = Case(**{**case.__dict__, "world_size": world_size})
    q, k, v, dout, _ = inputs(case, 3)
    c = case.seq_len // world_size

    def run_rank(comm):
        part = slice(comm.rank * c, (comm.rank + 1) * c)
        shards = [x.detach()[:, part].clone().requires_grad_() for x in (q, k, v)]
        out = ring_dilated_attention(
            *shards, case.segment_lengths, case.dilation_rates, comm=comm, **case.kwargs()
        )
        out.backward(dout[:, part])
        return [s.grad for s in shards]

    results = SimulatedCluster(world_size, timeout=20.0).run(run_rank)
    grads = [torch.cat([r[i] for r in results], dim=1).numpy() for i in range(3)]
    want = dense_gradients(case, *(x.detach().numpy() for x in (q, k, v, dout)))
    for g, w in zip(grads, want):
        assert max_abs_error(g, w) <= TOL


def test_lse_gradient_needs_math_kernel():
    q, k, v = (torch.randn(1, 16, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = dilated_attention(q, k, v, (8, 16), (1, 2), return_lse=True, kernel="flash_cpu")
    with pytest.raises(NotImplementedError, match="dlse"):
        lse.sum().backward()
    out, lse = dilated_attention(q, k, v, (8, 16), (1, 2), return_lse=True, kernel="flash_cpu")
    out.sum().backward()  # lse returned but unused: fine
    assert torch.isfinite(q.grad).all()


def test_double_backward_is_refused_by_every_function():
    """The backward is the kernels' own, not differentiable torch ops: a graph of it
    (create_graph=True, as gradgradcheck builds) raises instead of giving wrong second
    derivatives, on one device, the simulated ring and each rank of the per-rank ring."""
    q, k, v = (torch.randn(1, 8, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    args = ((4, 8), (1, 2))
    functions = [
        lambda q, k, v: dilated_attention(q, k, v, *args),
        lambda q, k, v: simulated_ring_dilated_attention(q, k, v, *args, world_size=2),
    ]
    for fn in functions:
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.gradgradcheck(fn, (q, k, v))
        first = torch.autograd.grad(fn(q, k, v).sum(), (q, k, v))  # first order: fine
        assert all(torch.isfinite(g).all() for g in first)

    def run_rank(comm):
        shards = [x.detach()[:, comm.rank * 4 : (comm.rank + 1) * 4].requires_grad_()
                  for x in (q, k, v)]  # fmt: skip
        out = ring_dilated_attention(*shards, *args, comm=comm)
        torch.autograd.grad(out.sum(), shards, create_graph=True)

    with pytest.raises(RankFailed, match="double backward"):
        SimulatedCluster(2, timeout=20.0).run(run_rank)


def test_devices_are_checked_before_any_work():
    """k or v on another device than q: a clear error naming it (it returned a meta tensor or
    crashed inside the merge); ranks on different kinds of device disagree together, in the
    agreement step, before any block is sent."""
    q = torch.randn(1, 8, 2, 4, device="meta")
    k = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"^k: must be on q's device \(meta\), got cpu"):
        dilated_attention(q, k, k, (8,), (1,))
    with pytest.raises(ValueError, match=r"^v: must be on q's device"):
        dilated_attention(k, k, q, (8,), (1,))

    def run_rank(comm):
        device = "cpu" if comm.rank == 0 else "meta"
        x = torch.randn(1, 4, 2, 4, device=device)
        return ring_dilated_attention(x, x, x, (8,), (1,), comm=comm)

    with pytest.raises(RankFailed, match="disagree"):
        SimulatedCluster(2, timeout=20.0).run(run_rank)


def test_a_scale_beyond_float32_is_refused_on_every_path():
    """softmax_scale = 1e308 is infinite in float32, where the kernels compute the scores:
    every score NaN. Refused, naming the argument, before any work."""
    q = torch.randn(1, 8, 2, 4)
    calls = [
        lambda: dilated_attention(q, q, q, (8,), (1,), softmax_scale=1e308),
        lambda: simulated_ring_dilated_attention(q, q, q, (8,), (1,), world_size=2,
                                                 softmax_scale=-1e39),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(ValueError, match=r"^softmax_scale: .* beyond float32's range"):
            call()
    assert torch.isfinite(dilated_attention(q, q, q, (8,), (1,), softmax_scale=1e30)).all()

    def run_rank(comm):
        x = q[:, comm.rank * 4 : (comm.rank + 1) * 4]
        return ring_dilated_attention(x, x, x, (8,), (1,), comm=comm, softmax_scale=1e308)

    with pytest.raises(RankFailed, match="softmax_scale"):
        SimulatedCluster(2, timeout=20.0).run(run_rank)


@pytest.mark.parametrize("bad", ["bogus", "flex"])
def test_a_kernel_one_rank_cannot_run_fails_every_rank_together(bad):
    """The kernel was checked after the agreement: only that rank raised, the others entered
    the ring and waited (until torch.distributed's timeout on real processes)."""
    x = torch.randn(1, 8, 2, 4, dtype=torch.float64, requires_grad=True)

    def run_rank(comm):
        shard = x[:, comm.rank * 4 : (comm.rank + 1) * 4]
        kernel = bad if comm.rank == 1 else None
        try:
            ring_dilated_attention(shard, shard, shard, (8,), (1,), comm=comm, kernel=kernel)
        except (ValueError, NotImplementedError) as error:
            return type(error).__name__, str(error)
        return "ran", ""

    results = SimulatedCluster(2, timeout=20.0).run(run_rank)
    assert results[0][0] == "ValueError" and "rank 1 rejected its input" in results[0][1]
    assert results[1][1].startswith("kernel: ")
    with pytest.raises(TypeError, match=r"^comm: expected a ringsim communicator"):
        ring_dilated_attention(x, x, x, (8,), (1,), comm="x")
