"""Ring dilated attention in torch: one rank's code over torch.distributed or any ringsim
communicator (spec §5, §6).

It runs the same plan and the same loop as the NumPy reference
(:func:`ringsim.ringloop.run_ring`), and hands each step to the step executor that also runs
the single-device path (:mod:`ringsim.gpu.executor`): the step's batches, one kernel call per
batch and pattern group on strided views of the shard and on blocks received in the
gathered layout, and one mixing pass per step (Note [Two layouts, two combiners]). The
exchange of step t+1 is posted before step t computes, so NCCL moves the next blocks on its
own stream while the kernels run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringsim.agree import agree
from ringsim.comm.base import Communicator, Payload, Recv
from ringsim.config import DilatedConfig
from ringsim.gradrelay import GradRelay
from ringsim.layout import Layout
from ringsim.plan import RankStep, Transfer, rank_plan
from ringsim.ringloop import run_ring
from ringsim.tasks import own_slots
from ringsim.trace import RankTrace

from ..executor import BackwardExecutor, ForwardExecutor
from ..executor.base import Executor
from ..executor.pool import MemoryPool
from ..kernels import Dropout, Kernel
from .comm import receiving


@dataclass
class StepParts:
    """The ring loop's parts (:class:`ringsim.ringloop.RingParts`) over a step executor: the
    executor attends a whole step; the rank cuts only the own blocks it sends, or whose
    pieces its other pieces attend (Note [Pieces] in :mod:`ringsim.plan`): it attends each
    piece against itself in place."""

    executor: Executor

    def own_blocks(self, step: RankStep) -> dict[int, Payload]:
        plan = self.executor.plan
        sends = plan.steps[step.step + 1].sends if step.step + 1 < len(plan.steps) else ()
        needed = {t.subring.index for t in sends if t.source_rank == plan.rank}
        needed |= {
            t.subring.index
            for t in step.tasks
            if t.source_rank == plan.rank and not t.diagonal and not t.skipped
        }
        if not needed:
            return {}
        return {
            index: self.executor.own_block(pair, slots)
            for index, (pair, slots) in own_slots(step.tasks, plan.rank).items()
            if index in needed
        }

    def message(self, block: Payload, transfer: Transfer) -> Payload:
        return self.executor.message(block, transfer)

    def expected(self, transfer: Transfer) -> Recv:
        return self.executor.expected(transfer)

    def attend(self, step: RankStep, held: dict[int, Payload]) -> dict[int, Payload | None]:
        return self.executor.run(step.step, step.batches, held) or {}


def _plan(config: DilatedConfig, q, k, comm: Communicator, layout: Layout):
    _, c, h, _ = q.shape
    n, p = c * comm.world_size, comm.world_size
    return rank_plan(config, h, n, p, comm.rank, layout, kv_ratio=h // k.shape[2])


def ring_forward(
    q,
    k,
    v,
    config: DilatedConfig,
    comm: Communicator,
    kernel: Kernel,
    trace: RankTrace | None,
    layout: Layout = Layout.CONTIGUOUS,
    pad: torch.Tensor | None = None,
    dropout: Dropout | None = None,
    pool: MemoryPool | None = None,
):
    """This rank's forward, no autograd: out ``(b, c, h, d)`` in q's dtype and lse
    ``(b, h, c)``, float32 or float64; the shards hold the positions ``layout`` gives.
    ``pad``: this rank's key bias ``(b, c, h, 1)`` (Note [Key masks] in
    :mod:`ringsim.gpu.executor.base`), or None; ``dropout``: this rank's record of its
    calls' random states (Note [Dropout] in :mod:`ringsim.gpu.kernels.dropout`), or None;
    ``pool``: this rank's memory pool (Note [The memory pool]) for the executor's buffers
    and the blocks received, or None."""
    plan = _plan(config, q, k, comm, layout)
    executor = ForwardExecutor(q, k, v, plan, config, kernel, pad, dropout, pool)
    if trace is not None:
        trace.hold("q, k, v, out, lse", sum(x.nbytes for x in (q, k, v)) + executor.state_nbytes)
    ring = receiving(comm, pool, "forward receives", q.device)
    run_ring(ring, executor.plan, StepParts(executor), trace, q.element_size())
    return executor.finish()


def check_backward(comm: Communicator, kernel: Kernel, dlse: torch.Tensor | None) -> None:
    """Every rank can run this backward, or all raise together (not some of them, which
    would leave the others waiting): the lse's gradient needs the math kernel."""
    error = None
    if dlse is not None and kernel is not Kernel.MATH:
        error = NotImplementedError(
            f"dlse: a gradient through the returned lse needs kernel='math' (the {kernel.value} "
            "kernel's backward has no lse input)"
        )
    agree(comm, f"backward kernel={kernel.value} dlse={dlse is not None}", error)


def ring_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    config: DilatedConfig,
    comm: Communicator,
    kernel: Kernel,
    trace: RankTrace | None,
    layout: Layout = Layout.CONTIGUOUS,
    pad: torch.Tensor | None = None,
    dropout: Dropout | None = None,
    pool: MemoryPool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's dq, dk, dv (in q's dtype) of :func:`ring_dilated_attention`.

    The forward's schedule runs again: the same K/V blocks take the same path, each step
    runs the block gradients of the step's batches (:mod:`ringsim.gpu.executor.backward`),
    and each block's dK/dV share travels with it in float32 and back to its owner
    (:mod:`ringsim.gradrelay`).

    Args:
        q, k, v, out, dout: this rank's ``(b, c, h, d)``; out as the forward returned it.
        lse, dlse: ``(b, h, c)``: the forward's lse and its gradient (None: lse unused).
        config, comm, kernel, layout, pad, dropout, pool: as the forward ran (dropout: this
            rank's record, replayed).
        trace: where this rank's backward events go (None: nowhere).
    """
    check_backward(comm, kernel, dlse)
    plan = _plan(config, q, k, comm, layout)
    executor = BackwardExecutor(q, k, v, out, lse, dout, dlse, plan, config, kernel, pad,
                                dropout, pool)  # fmt: skip
    if trace is not None:
        trace.hold("q, k, v, out, lse, dout", sum(x.nbytes for x in (q, k, v, out, lse, dout)))
        trace.hold("dq, dk, dv", executor.grads_nbytes)
    ring = receiving(comm, pool, "backward receives", q.device)  # K/V, then dK/dV, in order
    relay = GradRelay(ring, plan, executor, trace)
    run_ring(ring, plan, StepParts(executor), trace, q.element_size(), relay)
    return executor.finish()
