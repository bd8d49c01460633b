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

Where the Triton kernels can sum the block gradients, they are kept as parts instead of
added into totals (Note [Direct gradients] in :mod:`ringsim.gpu.executor.direct`).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ringsim.comm.base import Payload
from ringsim.config import DilatedConfig
from ringsim.gradrelay import HomeAdds
from ringsim.plan import BlockAction, RankPlan, TaskBatch, Transfer

from ..kernels import Dropout, Kernel, accumulator_dtype, block_backward
from .base import Executor
from .direct import PARTS_BUDGET, DirectGradients, chunk_groups, head_chunks
from .layout import (
    batch_blocks,
    batch_index,
    gathered_blocks,
    group_blocks,
    head_slices,
    heads_index,
    kv_index,
    pair_heads,
    range_index,
    scatter_add_pair,
    select,
    unblock,
)
from .merge import mix_reason
from .part import Part
from .pool import MemoryPool
from .schedule import Schedule, SideStreams, schedule


class BackwardExecutor(HomeAdds, Executor):
    """dq, dk, dv of one rank: :meth:`run` each step (its dK/dV shares go to the relay),
    then :meth:`finish`. Also the relay's :class:`~ringsim.gradrelay.GradParts`.

    Args:
        q, k, v, out, dout: the rank's ``(b, c, h, d)``; out as the forward returned it.
        lse, dlse: ``(b, h, c)``: the forward's lse and its gradient (None: the loss does
            not read lse); read through their ``(b, c, h)`` views, rows then heads like out
            (Note [The lse layout] in :mod:`ringsim.gpu.executor.forward`).
        plan, config, kernel, pad, dropout: as the forward ran (dropout: the forward's
            record, replayed).
    """

    def __init__(self, q, k, v, out, lse, dout, dlse, plan: RankPlan, config: DilatedConfig,
                 kernel: Kernel, pad: torch.Tensor | None = None,
                 dropout: Dropout | None = None,
                 pool: MemoryPool | None = None) -> None:  # fmt: skip
        super().__init__(q, k, v, plan, config, kernel, pad, dropout, pool)
        if self.dropout is not None:
            self.dropout.rewind()  # the forward's calls again, in its order
        self.out, self.dout = out, dout
        self.dlse = None if dlse is None else dlse.transpose(1, 2)
        # the kernels read +inf on rows with no key (Note [Backward with the final out and lse])
        self.lse = torch.where(torch.isneginf(lse), torch.inf, lse).transpose(1, 2)
        self.grad_dtype = accumulator_dtype(q.dtype)
        # Note [Direct gradients]: aligned, parts the Triton kernels can sum
        self.direct = self.aligned and mix_reason(q) is None
        if self.direct:  # written in q's dtype by run() (one device) or finish() (a ring)
            self.dq = self.dk = self.dv = None
            self.grads = DirectGradients(self, self.grad_dtype)  # on a ring
        else:
            self.dq, self.dk, self.dv = (
                self.buffer(name, x.shape, self.grad_dtype, fill=0.0)
                for name, x in zip(("dq", "dk", "dv"), (q, k, v))
            )

    def run(self, index: int, batches: tuple[TaskBatch, ...], held: dict[int, Payload]):
        """The block gradients of step ``index``: the dK/dV share of every held block
        (None: a block held but not attended here, or the rank's own block, whose dK/dV
        this rank has added already)."""
        shares: dict[int, Payload | None] = dict.fromkeys(held)
        if self.direct and self.plan.world_size == 1:
            self._direct(batches)
            return shares
        for batch in batches:
            if self.direct and batch.pair not in self.grads.merged:  # parts, summed at the end
                self._direct_batch(batch, self.groups(batch.pair), range(self.h), self.grads.parts)
            elif batch.pair in self.spanning and not batch.own:
                self._piece_grads(batch, held, shares)
            elif self.aligned:
                self._aligned(batch, held, shares)
            elif batch.own:
                self._own_rows(batch)
            else:
                self._received(batch, held, shares)
        return shares

    @property
    def grads_nbytes(self) -> int:
        """Bytes of dq, dk, dv as this executor holds them: float32 totals, or q's dtype when
        direct (the memory meter of the ring's trace)."""
        size = self.q.element_size() if self.direct else self.grad_dtype.itemsize
        return sum(x.numel() for x in (self.q, self.k, self.v)) * size

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq, dk, dv in q's dtype (each float32 total freed as it is cast: a lower peak)."""
        if self.direct and self.plan.world_size > 1:
            return self.grads.sums()
        totals = [self.dq, self.dk, self.dv]
        self.dq = self.dk = self.dv = None
        return tuple(self.released(totals.pop(0).to(self.q.dtype)) for _ in range(3))

    def _direct(self, batches: tuple[TaskBatch, ...]) -> None:
        """Note [Direct gradients]: every batch's block gradients as parts, head chunk by head
        chunk, each gradient summed once into q's dtype."""
        from .mix_triton import sum_

        grads = [torch.empty_like(self.q, memory_format=torch.contiguous_format) for _ in "qkv"]
        self.dq, self.dk, self.dv = grads
        parts_bytes = 3 * sum(self.q.nbytes // r for r in self.rates)
        for heads in head_chunks(self.h, parts_bytes, max(self.q.nbytes, PARTS_BUDGET)):
            # the chunk's parts are freed when its sums are written, before the next chunk:
            # held on by a loop variable, a third of them stayed (measured: 248 MiB of 1008
            # at 128K tokens on an H200, 2026-12-01, scripts/probe_one_gpu.py memory-peak)
            parts: tuple[list[Part], ...] = ([], [], [])
            for batch in batches:
                self._direct_batch(batch, chunk_groups(self.groups(batch.pair), heads), heads,
                                   parts)  # fmt: skip
            for total, mine in zip(grads, parts):
                sum_(mine, self.widths, self.rates, total[:, :, heads.start : heads.stop])
                mine.clear()

    def _direct_batch(self, batch: TaskBatch, groups, heads: range, parts) -> None:
        """The block gradients of one own batch's ``groups`` (one head chunk), as parts: one
        call per group (side by side where small), or one call on the gathered rows of every
        group where the groups' calls are too small to fill the GPU (the forward's
        :class:`~ringsim.gpu.executor.schedule.Schedule`)."""
        if not groups:  # grouped mode: none of the chunk's heads has this pair
            return
        width, segments, rows = self.layout_of(batch)
        rate = self.rates[batch.pair]
        views = self.views(batch, groups, split=True)
        how = schedule(groups, self.b, segments, rows, self.q.device, free=views is not None)
        if how is Schedule.GATHERED:
            for chosen in views or (groups,):
                blocks = functools.partial(self.gathered, groups=chosen)
                grads = self._grads(batch, blocks, blocks(self.k), blocks(self.v))
                pair, offsets = pair_heads(chosen)
                local = tuple(h - heads.start for h in pair)
                for mine, grad in zip(parts, grads):
                    mine.append(Part(batch.pair, width, rate, local, offsets,
                                     grad.to(self.q.dtype), None))  # fmt: skip
            return
        sides = SideStreams(self.q.device) if how is Schedule.STREAMS else None
        for g, group in enumerate(groups):
            blocks = functools.partial(group_blocks, group=group, length=self.span)
            with sides.on(g) if sides else contextlib.nullcontext():
                grads = self._grads(batch, blocks, blocks(self.k), blocks(self.v))
                grads = [x.to(self.q.dtype) for x in grads]  # math's (one-key blocks): float32
            local = tuple(h - heads.start for h in group.heads)
            offsets = (group.pattern.offset,) * len(local)
            for mine, grad in zip(parts, grads):
                if sides:  # made on a side stream, read on main
                    grad.record_stream(sides.main)
                mine.append(Part(batch.pair, width, rate, local, offsets, grad, None, group))
        if sides:
            sides.join()

    def _grads(self, batch: TaskBatch, blocks, k, v, bias=None):
        """The block backward (:func:`~ringsim.gpu.kernels.block_backward`: the entry point
        checked the inputs once) of the query blocks ``blocks(x)`` against ``k, v`` (and the
        key bias ``bias``, Note [Key masks])."""
        return block_backward(
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
            bias=bias,
            dropout=self.dropout,
        )

    def _aligned(self, batch: TaskBatch, held, shares) -> None:
        """An aligned batch (a merged pair's, when direct: Note [Direct gradients]): dq and
        an own block's dK/dV added into the totals or the pair's partials, a received
        block's dK/dV copied into its share; one call per group (side by side where small),
        or, into partials, one call on the pair's gathered rows."""
        groups = self.groups(batch.pair)
        _, segments, rows = self.layout_of(batch)
        how = schedule(groups, self.b, segments, rows, self.q.device, gather=self.direct,
                       free=self.views(batch, groups) is not None)  # fmt: skip
        if self.direct:  # the pair's partials, made before any side stream writes them
            self._targets(batch.pair)
        if not batch.own:
            index = batch.tasks[0].subring.index
            shares[index] = tuple(
                torch.empty(x.shape, dtype=self.grad_dtype, device=x.device) for x in held[index]
            )
        if how is Schedule.GATHERED:
            blocks = functools.partial(self.gathered, groups=groups)
            keys = self.key_blocks(batch, held, None)
            grads = self._grads(batch, blocks, *keys)
            self._add(batch, self._targets(batch.pair), shares, slice(None), *grads)
            return
        sides = SideStreams(self.q.device) if how is not Schedule.STRIDED else None
        for g, group in enumerate(groups):
            with sides.on(g) if sides else contextlib.nullcontext():
                blocks = functools.partial(group_blocks, group=group, length=self.span)
                grads = self._grads(batch, blocks, *self.key_blocks(batch, held, g))
                self._add(batch, self._targets(batch.pair, g), shares, head_slices(groups)[g],
                          *grads)  # fmt: skip
        if sides:  # the next batch adds to the same totals: it starts after the join
            sides.join()

    def _add(self, batch: TaskBatch, targets, shares, heads: slice, dq, dk, dv) -> None:
        """dq into its target; dK/dV into theirs (the rank's own block) or into the
        ``heads`` of the received block's share."""
        targets[0].add_(dq)
        if batch.own:
            targets[1].add_(dk)
            targets[2].add_(dv)
        else:
            share = shares[batch.tasks[0].subring.index]
            for total, part in zip(share, (dk, dv)):
                gathered_blocks(total, heads).copy_(part)

    def _targets(self, pair: int, g: int | None = None) -> tuple[torch.Tensor, ...]:
        """Where the dq, dk, dv of group g of ``pair`` (None: every head, gathered) add:
        blocks ``(b*S, H, m, d)`` of the pair's float32 partials (direct) or of the totals
        (group views; the totals take no gathered call)."""
        if not self.direct:
            group = self.groups(pair)[g]
            totals = (self.dq, self.dk, self.dv)
            return tuple(group_blocks(x, group, self.span, view=True) for x in totals)
        return self.grads.of(pair, g)

    def _piece_grads(self, batch: TaskBatch, held, shares) -> None:
        """Note [Strided pieces] (:mod:`ringsim.gpu.executor.base`): each task of a batch off
        the diagonal is one call for every head of the pair, its query chunk's rows gathered
        against one piece of a block: dq added into those rows, dK/dV into the share of the
        block's piece."""
        groups = self.groups(batch.pair)
        for task in batch.tasks:
            rows, chunk, keys = self.piece_task(batch, task, held)
            index = task.subring.index
            if shares.get(index) is None:
                shares[index] = self.zeros(held[index])
            blocks = functools.partial(self.gathered, groups=groups, rows=rows)
            dq, dk, dv = self._grads(batch, blocks, *keys)
            if self.direct:  # into the chunk of the pair's partial
                self.piece(self._targets(batch.pair)[0], chunk).add_(dq)
            else:
                scatter_add_pair(self.dq, dq.transpose(1, 2), groups, rows)
            share, half = shares[index], len(shares[index]) // 2
            for i, grad in zip((task.k_piece, half + task.k_piece), (dk, dv)):
                gathered_blocks(share[i]).add_(grad)

    def _own_rows(self, batch: TaskBatch) -> None:
        from ringsim.batches import task_row_batches

        for rb in task_row_batches(batch, self.groups(batch.pair), self.plan.chunks):
            rows, heads = batch_index(rb, self.q.device)
            blocks = functools.partial(batch_blocks, batch=rb, rows=rows, heads=heads)
            kv = kv_index(heads, self.kv_ratio)
            keys = functools.partial(batch_blocks, batch=rb, rows=rows, heads=kv)
            bias = None if self.pad is None else keys(self.pad).transpose(-1, -2)
            grads = self._grads(batch, blocks, keys(self.k), keys(self.v), bias)
            self.dq[:, rows, heads] += unblock(grads[0], self.b)
            for total, part in zip((self.dk, self.dv), grads[1:]):
                if self.kv_ratio == 1:
                    total[:, rows, heads] += unblock(part, self.b)
                else:  # query heads sharing a K/V head: the same index, added up
                    values = unblock(part, self.b).to(total.dtype).permute(1, 2, 0, 3)
                    total.permute(1, 2, 0, 3).index_put_((rows, kv), values, accumulate=True)

    def _received(self, batch: TaskBatch, held, shares) -> None:
        groups = self.groups(batch.pair)
        for task in batch.tasks:
            block = held[task.subring.index]
            share = list(self.zeros(block))
            for g, group in enumerate(groups):
                if batch.actions[g] is BlockAction.SKIP:
                    continue
                rows = task.q_rows[g]
                local = self.plan.local(rows)
                blocks = functools.partial(select, rows=local, heads=group.heads)
                keys, values = task.key_slots(g, self.kv_len(block))
                dq, dk, dv = self._grads(batch, blocks, *self.slot_blocks(task, g, block))
                share[keys], share[values] = (self.kv_sum(x, group.heads) for x in (dk, dv))
                self.add_rows(self.dq, rows, group.heads, dq)
            mine = tuple(x.to(self.grad_dtype) for x in share)
            before = shares.get(task.subring.index)  # several pieces of one block add up
            shares[task.subring.index] = mine if before is None else self.add(before, mine)

    # --- the relay's parts (GradParts) -------------------------------------------------------

    def zeros(self, block: Payload) -> Payload:
        """Zero dK/dV shaped like ``block``'s K and V slots (a key bias has no gradient)."""
        kv = block[: self.kv_len(block)]
        return tuple(torch.zeros(a.shape, dtype=self.grad_dtype, device=a.device) for a in kv)

    def add(self, a: Payload, b: Payload) -> Payload:
        for x, y in zip(a, b):  # a is this rank's own share: added in place
            x.add_(y)
        return a

    def add_rows(self, total: torch.Tensor, rows: range, heads: tuple[int, ...], share) -> None:
        """``total (b, c, h, d)`` at ``rows`` and ``heads`` += ``share (b, H, m, d)``."""
        index = (
            range_index(self.plan.local(rows), total.device)[:, None],
            heads_index(heads, total.device)[None, :],
        )
        total[(slice(None), *index)] += share.transpose(1, 2).to(total.dtype)

    def add_home(self, grads: Payload, transfer: Transfer) -> None:
        """Add the dK/dV of this rank's own rows that came home into its dk, dv (the pair's
        partials, when direct)."""
        if not self.aligned:
            return super().add_home(grads, transfer)
        pair = transfer.subring.pair
        groups = self.groups(pair)
        half = len(grads) // 2  # a K and a V per piece (Note [Strided pieces])
        for p, sent in enumerate(self._pieces_sent(transfer)):
            if not sent:
                continue
            chunk = self.chunk_of(transfer.rows[p * len(groups)])
            if self.direct:  # the gathered layout, as the partials
                for total, part in zip(self._targets(pair)[1:], (grads[p], grads[half + p])):
                    view = self.piece(total, chunk) if pair in self.spanning else total
                    view.add_(gathered_blocks(part))
                continue
            for group, heads in zip(groups, head_slices(groups)):
                for total, part in zip((self.dk, self.dv), (grads[p], grads[half + p])):
                    view = group_blocks(total, group, self.span, view=True)
                    if self.pieces:
                        view = self.piece(view, chunk)
                    view.add_(gathered_blocks(part, heads))
        return None
