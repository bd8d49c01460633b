"""The step executor, backward: one rank's block gradients of one step's batches.

Every batch runs the kernels' own backward with the *final* out and lse of its query rows
(Note [Backward with the final out and lse] in :mod:`ringsim.gpu.kernels.backward`): each
block's share of the exact gradient of the LSE mixture, on the same views and blocks the
forward used (Note [Two layouts, two combiners] in :mod:`ringsim.gpu.executor.forward`).

- dq adds into the rank's float32 total (float64 for float64 input), through strided views
  or by index: rows and heads are unique within one call, so nothing is lost;
- the dK/dV of the rank's own rows add into its dk, dv totals at once;
- the dK/dV of a block received are the step's *share*: float32, in the block's layout
  (the gathered ``(b, m, H, d)`` of K, then of V, for an aligned ring), returned to the ring
  loop, whose relay (:mod:`ringsim.gradrelay`) sends it on with the block and home to its
  owner, where :meth:`BackwardExecutor.add_home` adds it.

On CUDA the groups of a pair too small to fill the GPU run side by side
(:class:`ringsim.gpu.executor.schedule.SideStreams`; they write disjoint heads).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ringsim.comm.base import Payload
from ringsim.config import DilatedConfig
from ringsim.gradrelay import HomeAdds
from ringsim.plan import BlockAction, RankPlan, TaskBatch, Transfer

from ..kernels import Kernel, accumulator_dtype, attend_backward
from .forward import Executor
from .layout import (
    batch_blocks,
    batch_index,
    gathered_blocks,
    group_blocks,
    head_slices,
    heads_index,
    range_index,
    select,
    unblock,
)
from .schedule import Schedule, SideStreams, schedule


class BackwardExecutor(HomeAdds, Executor):
    """dq, dk, dv of one rank: :meth:`run` each step (its dK/dV shares go to the relay),
    then :meth:`finish`. Also the relay's :class:`~ringsim.gradrelay.GradParts`.

    Args:
        q, k, v, out, dout: the rank's ``(b, c, h, d)``; out as the forward returned it.
        lse, dlse: ``(b, c, h)`` (rows, then heads): the forward's lse and its gradient
            (None: the loss does not read lse).
        plan, config, kernel: as the forward ran.
    """

    def __init__(self, q, k, v, out, lse, dout, dlse, plan: RankPlan, config: DilatedConfig,
                 kernel: Kernel) -> None:  # fmt: skip
        super().__init__(q, k, v, plan, config, kernel)
        self.out, self.lse, self.dout, self.dlse = out, lse, dout, dlse
        self.grad_dtype = accumulator_dtype(q.dtype)
        self.dq, self.dk, self.dv = (
            torch.zeros(q.shape, dtype=self.grad_dtype, device=q.device) for _ in range(3)
        )

    def run(self, index: int, batches: tuple[TaskBatch, ...], held: dict[int, Payload]):
        """The block gradients of step ``index``: the dK/dV share of every held block
        (None: a block held but not attended here, or the rank's own block, whose dK/dV
        this rank has added already)."""
        shares: dict[int, Payload | None] = dict.fromkeys(held)
        for batch in batches:
            if self.aligned:
                self._aligned(batch, held, shares)
            elif batch.own:
                self._own_rows(batch)
            else:
                self._received(batch, held, shares)
        return shares

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq, dk, dv in q's dtype (each float32 total freed as it is cast: a lower peak)."""
        totals = [self.dq, self.dk, self.dv]
        self.dq = self.dk = self.dv = None
        return tuple(totals.pop(0).to(self.q.dtype) for _ in range(3))

    def _grads(self, batch: TaskBatch, blocks, k, v):
        """``attend_backward`` of the query blocks ``blocks(x)`` against ``k, v``."""
        return attend_backward(
            blocks(self.q),
            k,
            v,
            blocks(self.out),
            blocks(self.lse).contiguous(),  # the kernels read lse densely
            blocks(self.dout),
            causal=self.causal(batch),
            scale=self.scale,
            kernel=self.kernel,
            dlse=None if self.dlse is None else blocks(self.dlse).contiguous(),
        )

    def _aligned(self, batch: TaskBatch, held, shares) -> None:
        groups = self.groups(batch.pair)
        _, segments, rows = self.layout_of(batch)
        small = schedule(groups, self.b, segments, rows, self.q.device, gather=False)
        sides = SideStreams(self.q.device) if small is not Schedule.STRIDED else None
        if not batch.own:
            index = batch.tasks[0].subring.index
            share = tuple(
                torch.empty(x.shape, dtype=self.grad_dtype, device=x.device) for x in held[index]
            )
            shares[index] = share
        for g, group in enumerate(groups):
            with sides.on(g) if sides else contextlib.nullcontext():
                blocks = functools.partial(group_blocks, group=group, length=self.c)
                dq, dk, dv = self._grads(batch, blocks, *self.key_blocks(batch, held, g))
                blocks(self.dq, view=True).add_(dq)
                if batch.own:  # the rank's own rows: straight into its totals
                    blocks(self.dk, view=True).add_(dk)
                    blocks(self.dv, view=True).add_(dv)
                else:  # this step's share of the block's dK/dV, in its layout
                    heads = head_slices(groups)[g]
                    for total, part in zip(share, (dk, dv)):
                        gathered_blocks(total, heads).copy_(part)
        if sides:  # the next batch adds to the same totals: it starts after the join
            sides.join()

    def _own_rows(self, batch: TaskBatch) -> None:
        from ringsim.batches import task_row_batches

        start = self.plan.shard.start
        for rb in task_row_batches(batch, self.groups(batch.pair)):
            rows, heads = batch_index(rb, start, self.q.device)
            blocks = functools.partial(batch_blocks, batch=rb, rows=rows, heads=heads)
            grads = self._grads(batch, blocks, blocks(self.k), blocks(self.v))
            for total, part in zip((self.dq, self.dk, self.dv), grads):
                total[:, rows, heads] += unblock(part, self.b)

    def _received(self, batch: TaskBatch, held, shares) -> None:
        groups, start = self.groups(batch.pair), self.plan.shard.start
        for task in batch.tasks:
            block = held[task.subring.index]
            share = list(self.zeros(block))
            for g, group in enumerate(groups):
                if batch.actions[g] is BlockAction.SKIP:
                    continue
                rows = task.q_rows[g]
                blocks = functools.partial(select, rows=rows, heads=group.heads, start=start)
                dq, share[g], share[len(groups) + g] = self._grads(
                    batch, blocks, block[g], block[len(groups) + g]
                )
                self.add_rows(self.dq, rows, group.heads, dq)
            shares[task.subring.index] = tuple(x.to(self.grad_dtype) for x in share)

    # --- the relay's parts (GradParts) -------------------------------------------------------

    def zeros(self, block: Payload) -> Payload:
        return tuple(torch.zeros(a.shape, dtype=self.grad_dtype, device=a.device) for a in block)

    def add(self, a: Payload, b: Payload) -> Payload:
        for x, y in zip(a, b):  # a is this rank's own share: added in place
            x.add_(y)
        return a

    def add_rows(self, total: torch.Tensor, rows: range, heads: tuple[int, ...], share) -> None:
        """``total (b, c, h, d)`` at ``rows`` and ``heads`` += ``share (b, H, m, d)``."""
        index = (
            range_index(rows, self.plan.shard.start, total.device)[:, None],
            heads_index(heads, total.device)[None, :],
        )
        total[(slice(None), *index)] += share.transpose(1, 2).to(total.dtype)

    def add_home(self, grads: Payload, transfer: Transfer) -> None:
        """Add the dK/dV of this rank's own rows that came home into its dk, dv."""
        if not self.aligned:
            return super().add_home(grads, transfer)
        groups = self.groups(transfer.subring.pair)
        for group, heads in zip(groups, head_slices(groups)):
            for total, part in zip((self.dk, self.dv), grads):
                group_blocks(total, group, self.c, view=True).add_(gathered_blocks(part, heads))
        return None
