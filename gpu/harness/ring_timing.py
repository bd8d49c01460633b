"""Timing the ring across ranks, for :mod:`ringsim.gpu.harness.bench_ring`: medians every
rank agrees on, peak memory, the ring's exchanges alone and its compute alone (for the share
of communication hidden), the bytes a rank sends, and PyTorch's context parallel on the
same problem.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ringsim.comm.base import Recv, Send
from ringsim.config import DilatedConfig
from ringsim.layout import Layout, shard
from ringsim.plan import rank_plan
from ringsim.ringloop import run_ring
from ringsim.tasks import slot_heads

from ..executor.forward import ForwardExecutor
from ..kernels import Kernel
from ..ring.rank import StepParts


class Loopback:
    """A communicator whose exchanges return at once, with buffers made once per shape: the
    ring's compute alone (for the hidden share)."""

    def __init__(self, comm, device: torch.device) -> None:
        self.rank, self.world_size, self.device = comm.rank, comm.world_size, device
        self.buffers: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def start(self, sends: Sequence[Send], recvs: Sequence[Recv]):
        got = []
        for r in recvs:
            key = (r.shapes, r.dtype)
            if key not in self.buffers:
                made = (torch.randn(s, device=self.device).to(r.dtype) for s in r.shapes)
                self.buffers[key] = tuple(made)
            got.append(self.buffers[key])
        return _Done(got)


class _Done:
    def __init__(self, got) -> None:
        self.got = got

    def wait(self):
        return self.got


class CommOnly(StepParts):
    """The ring's parts with no attention: its exchanges alone (for the hidden share)."""

    def attend(self, step, held):
        return {}


def agreed_median(fn: Callable, device: torch.device, budget: float) -> float:
    """Median ms of ``fn()`` (warm), the repetitions agreed by every rank (a ring call on one
    rank waits for the others), the slowest rank's median."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    reps = max(3, min(30, int(budget / max(time.perf_counter() - start, 1e-6))))
    reps = int(reduce_max(-reps, device) * -1)  # the fewest any rank asked for
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            times.append((begin, end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    sync(device)
    ms = [b.elapsed_time(e) for b, e in times] if device.type == "cuda" else times
    return reduce_max(statistics.median(ms), device)


def reduce_max(x: float, device: torch.device) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_call(fn: Callable, device: torch.device) -> float | None:
    """Run ``fn`` once (warm-up); the peak GiB it allocated beyond what was there (max over
    ranks; None on the CPU)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return reduce_max((torch.cuda.max_memory_allocated(device) - before) / 2**30, device)


def forward_backward(attention: Callable, x: Sequence[torch.Tensor], dout: torch.Tensor):
    """``attention(*x)`` and the gradients of ``<out, dout>`` w.r.t. x."""
    inputs = [t.detach().requires_grad_() for t in x]
    out = attention(*inputs)
    return torch.autograd.grad(out, inputs, dout)


def comm_device(comm) -> torch.device:
    return comm.device if comm.device is not None else torch.device("cpu")


def sent_bytes(
    config: DilatedConfig, h: int, n: int, comm, itemsize: int, b: int, d: int, layout: Layout
):
    """From this rank's plan: the K/V bytes it sends in the forward, the steps with a
    transfer (the most of any rank: they time together) and the largest K/V block any rank
    receives at one step (the peak memory is the most of any rank's too)."""
    plan = rank_plan(config, h, n, comm.world_size, comm.rank, layout)

    def nbytes(t) -> int:
        groups = plan.groups[t.subring.pair]  # slot i: group i % G (Note [Pieces])
        heads = slot_heads(groups, len(t.rows))
        return 2 * b * d * itemsize * sum(len(r) * len(h) for r, h in zip(t.rows, heads))

    total = sum(nbytes(t) for step in plan.steps for t in step.sends)
    block = max((sum(nbytes(t) for t in step.recvs) for step in plan.steps), default=0)
    steps = sum(1 for s in plan.steps if s.sends or s.recvs)
    device = comm_device(comm)
    return total, int(reduce_max(steps, device)), int(reduce_max(block, device))


def ring_parts_ms(
    shards, config, comm, kernel, device, budget, parts_type, transport, layout: Layout
):
    """Median ms of the forward ring with other parts or another transport."""
    q = shards[0]
    _, c, h, _ = q.shape
    plan = rank_plan(config, h, c * comm.world_size, comm.world_size, comm.rank, layout)

    def run():
        executor = ForwardExecutor(*shards, plan, config, kernel)
        run_ring(transport, plan, parts_type(executor), None, q.element_size())
        if parts_type is StepParts:
            executor.finish()

    return agreed_median(run, device, budget)


def torch_cp(problem, device, budget: float, backward: bool, mesh, want: torch.Tensor):
    """PyTorch's context parallel on the same global q, k, v, the same SDPA kernel, its load
    balancer on for the zigzag layout (its head-tail chunks are zigzag's: rank j holds
    chunks j and 2P-1-j), off for the contiguous one: ``(median ms, max |out - want|)``,
    ``want`` this rank's shard of the output ``(b, c, h, d)`` in that layout (that it
    computed the same function)."""
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental import _attention as cp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        Kernel.FLASH: SDPBackend.FLASH_ATTENTION,
        Kernel.CUDNN: SDPBackend.CUDNN_ATTENTION,
        Kernel.EFFICIENT: SDPBackend.EFFICIENT_ATTENTION,
    }
    causal = problem.config.is_causal
    cp._cp_options.enable_load_balance = problem.layout == "zigzag"
    cp.set_rotate_method("alltoall")
    buffers = [x.transpose(1, 2).contiguous() for x in (problem.q, problem.k, problem.v)]
    dout = problem.dout.transpose(1, 2).contiguous()  # (b, h, n, d), sharded below by hand
    local_dout = shard(dout, mesh.get_local_rank(), mesh.size(), layout=problem.layout, axis=2)
    context = cp.context_parallel(
        mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2], no_restore_buffers=set(buffers)
    )
    with context, sdpa_kernel(backends[problem.kernel]):

        def attention(*x):  # looked up here: context_parallel patches F's function
            return F.scaled_dot_product_attention(*x, is_causal=causal)

        def run():
            if backward:
                return forward_backward(attention, buffers, local_dout)
            return attention(*buffers)

        out = attention(*buffers).transpose(1, 2)  # (b, c, h, d), this rank's rows
        diff = reduce_max((out.float() - want.float()).abs().max().item(), device)
        return agreed_median(run, device, budget), diff
