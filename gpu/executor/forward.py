"""The step executor, forward: one rank's batches of one step, and their results combined.

One executor serves the single-device path (P = 1: one step, every block the rank's own)
and every step of the ring (:mod:`ringsim.gpu.ring`). The plan hands it a step's
:class:`~ringsim.plan.TaskBatch` es; it runs each batch with as few kernel calls as it can
and combines the step's results into the running ``(out, lse)``.

Note [Two layouts, two combiners]
---------------------------------
**Aligned** configurations (the aligned case of spec §5,
:meth:`~ringsim.config.DilatedConfig.is_aligned`: each local width ``W = min(w', c)``
divides c, r divides W and c) run every batch on strided
views of the rank's q, k, v (:mod:`ringsim.gpu.executor.layout`): one kernel call per batch
and pattern group (or one per batch on gathered rows, or the group calls side by side:
:mod:`ringsim.gpu.executor.schedule`). A block received over the ring arrives in the
gathered layout ``(b, m, H, d)`` (every head of the pair, K then V): one buffer per tensor,
read by the kernels as it is.

**Other** configurations (a ragged last segment, r not dividing w', segments crossing shard
boundaries at odd places: :func:`~ringsim.gpu.executor.base.strided`) gather the rows of
each batch by index: one call per set of pattern groups with equal row counts over the
rank's own rows
(:class:`ringsim.batches.RowBatch`), one per task and group on blocks received.

Results combine one of two ways:

- **mix** (CUDA, or Triton's interpreter; fp16/bf16/fp32; aligned): every call's
  ``(out, lse)`` is kept as the kernel returned it (a :class:`Part`), and at the end of the
  step one Triton pass (:func:`~ringsim.gpu.executor.mix_triton.mix_`) mixes them with the
  running state; the last busy step writes q's dtype, earlier ones a float32 running out;
- **accumulate** (everywhere else): each result is merged into float32 accumulators
  (float64 for float64 input) with the stable LSE merge, through strided views or by index.

Note [The lse layout]
---------------------
Every lse the package hands around is ``(b, h, n)`` (``(b, h, c)`` on a rank), as the
public functions return it and the kernels make it. The executor writes its own through a
``(b, c, h)`` view, rows then heads like out's ``(b, c, h, d)``, so that one index (``[:,
rows, heads]``) or one strided block view (:func:`~ringsim.gpu.executor.layout.group_blocks`)
serves out and lse alike. The mix writes the ``(b, h, c)`` tensor through that view (its
kernel takes strides). Only the accumulate path keeps a rows-first accumulator: its blocks
must be views of the accumulator for the in-place merge, and a ``(b, h, c)`` tensor's
blocks cannot merge the batch and segment strides when b > 1; :meth:`ForwardExecutor.finish`
copies it to ``(b, h, c)`` once (1/d of out's size).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from ringsim.batches import RowBatch, task_row_batches
from ringsim.comm.base import Payload
from ringsim.config import DilatedConfig
from ringsim.plan import BlockAction, RankPlan, TaskBatch

from ..kernels import Dropout, Kernel, accumulator_dtype, attend
from .base import Executor
from .layout import (
    batch_blocks,
    batch_index,
    group_blocks,
    head_slices,
    heads_index,
    kv_index,
    pair_heads,
    range_index,
    select,
    unblock,
)
from .merge import merge_, merge_into, mix_reason
from .part import Part
from .pool import MemoryPool
from .schedule import Schedule, SideStreams, schedule


class ForwardExecutor(Executor):
    """The forward of one rank (module docstring): :meth:`run` each step, then
    :meth:`finish`."""

    def __init__(self, q, k, v, plan: RankPlan, config: DilatedConfig, kernel: Kernel,
                 pad: torch.Tensor | None = None, dropout: Dropout | None = None,
                 pool: MemoryPool | None = None) -> None:  # fmt: skip
        super().__init__(q, k, v, plan, config, kernel, pad, dropout, pool)
        self.mixing = self.aligned and mix_reason(q) is None
        b, c, h, d = q.shape
        # lse stored (b, h, c), written through its (b, c, h) view (Note [The lse layout])
        if self.mixing:
            self.out: torch.Tensor | None = None  # q's dtype, written by the last busy step
            self.lse = self.buffer("lse", (b, h, c), torch.float32).transpose(1, 2)
            self.kept: list[Part] = []  # final parts of pairs done, until the mix
            self.running: dict[int, list[Part]] = {}  # float32 partials of pairs not done
        else:
            acc = accumulator_dtype(q.dtype)
            self.out = self.buffer("out", (b, c, h, d), acc, fill=0.0)
            # rows first, so that group_blocks views it in place (Note [The lse layout])
            self.lse = self.buffer("lse rows", (b, c, h), acc, fill=-torch.inf)

    @property
    def state_nbytes(self) -> int:
        """Bytes of the result: out (float32 accumulators, or q's dtype when mixing) and lse
        (the memory meter of the ring's trace)."""
        b, c, h, d = self.q.shape
        size = self.q.element_size() if self.mixing else self.lse.element_size()
        return b * c * h * d * size + self.lse.nbytes

    def run(self, index: int, batches: tuple[TaskBatch, ...], held: dict[int, Payload]) -> None:
        """Attend every batch of step ``index`` and combine the results."""
        parts: list[Part] = []
        for batch in batches:
            if batch.pair in self.spanning and not batch.own:
                parts += self._piece_parts(batch, held)
            elif self.aligned:
                parts += self._aligned(batch, held)
            elif batch.own:
                self._own_rows(batch)
            else:
                self._received(batch, held)
        if self.mixing:
            self._keep(index, parts)
            if index == self.plan.last_busy_step:
                self._mix()
        elif parts:
            for part in parts:  # accumulate: merge into views of the accumulators
                views = [
                    group_blocks(x, part.group, self.span, view=True) for x in (self.out, self.lse)
                ]
                if part.piece is not None:
                    views = [self.piece(x, part.piece) for x in views]
                merge_(*views, part.out, part.lse)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """out ``(b, c, h, d)`` in q's dtype and lse ``(b, h, c)``, contiguous, float32
        (float64 for float64 input)."""
        if not self.mixing:  # the accumulator's rows-first lse, copied once (1/d of out)
            lse = self.released(self.lse.transpose(1, 2).contiguous())
            return self.released(self.out.to(self.q.dtype)), lse
        if self.out is None:  # no step had work (a rank with no query rows)
            self.out = torch.zeros_like(self.q)
            self.lse.fill_(-torch.inf)
        return self.out, self.released(self.lse.transpose(1, 2))

    def _aligned(self, batch: TaskBatch, held: dict[int, Payload]) -> list[Part]:
        groups = self.groups(batch.pair)
        width, segments, rows = self.layout_of(batch)
        rate = self.rates[batch.pair]
        # a pair whose partials are merged across steps needs -inf for empty rows
        merged = batch.pair in self.plan.multi_step_pairs or batch.pair in self.spanning
        raw_lse = self.mixing and not merged
        call = functools.partial(attend, causal=self.causal(batch), scale=self.scale,
                                 kernel=self.kernel, raw_lse=raw_lse)  # fmt: skip
        # one part per call, in the pair's own layout: no head slices for merged pairs
        views = self.views(batch, groups, split=not merged)
        how = schedule(groups, self.b, segments, rows, self.q.device, gather=self.mixing,
                       free=views is not None)  # fmt: skip
        if how is Schedule.GATHERED:  # one call for the pair (or slice) on gathered rows
            parts = []
            for chosen in views or (groups,):
                keys = self.key_blocks(batch, held, None, chosen)
                out, lse = call(self.gathered(self.q, chosen), *keys)
                parts.append(Part(batch.pair, width, rate, *pair_heads(chosen), out, lse))
            return parts
        sides = SideStreams(self.q.device) if how is Schedule.STREAMS else None
        parts = []
        for g, group in enumerate(groups):
            q = group_blocks(self.q, group, self.span)
            if sides is None:
                out, lse = call(q, *self.key_blocks(batch, held, g))
            else:
                with sides.on(g):
                    out, lse = call(q, *self.key_blocks(batch, held, g))
                out.record_stream(sides.main)  # made on a side stream, read on main
                lse.record_stream(sides.main)
            offsets = (group.pattern.offset,) * len(group.heads)
            parts.append(Part(batch.pair, width, rate, group.heads, offsets, out, lse, group))
        if sides is not None:
            sides.join()
        return parts

    def _piece_parts(self, batch: TaskBatch, held: dict[int, Payload]) -> list[Part]:
        """Note [Strided pieces] (:mod:`ringsim.gpu.executor.base`): each task of a batch off
        the diagonal is one call for every head of the pair, its query chunk's rows gathered
        against one piece of a block; split into its groups' parts for the accumulators."""
        groups = self.groups(batch.pair)
        heads, offsets = pair_heads(groups)
        width, rate = self.widths[batch.pair], self.rates[batch.pair]
        parts = []
        for task in batch.tasks:
            rows, chunk, keys = self.piece_task(batch, task, held)
            q = self.gathered(self.q, groups, rows)
            out, lse = attend(q, *keys, causal=False, scale=self.scale, kernel=self.kernel)
            part = Part(batch.pair, width, rate, heads, offsets, out, lse, piece=chunk)
            parts += [part] if self.mixing else part.split(groups)
        return parts

    def _keep(self, index: int, parts: list[Part]) -> None:
        """Note [Partials across steps]: a pair attended at several steps (its segments
        span shards) merges each step's parts into its own float32 partials, in the parts'
        layout (``c/r`` rows: a sixteenth of the output for r = 16), with the stable merge;
        at its last step they are rounded to q's dtype, as every kernel's output is, and
        kept with the other pairs' parts for the one mix of the last busy step. A pair whose
        segments span a zigzag shard's chunks (Note [Strided pieces]) has parts of several
        shapes (pieces, groups, the whole pair): they merge into one partial of the pair
        in the gathered layout, a piece into its chunk and a group into its heads."""
        by_pair: dict[int, list[Part]] = {}
        for part in parts:
            by_pair.setdefault(part.pair, []).append(part)
        for pair, mine in by_pair.items():
            running = self.running.pop(pair, None)
            last = index == self.plan.pair_last_steps[pair]
            if pair in self.spanning:  # one float32 partial from the first part on
                partial = running[0] if running else self._pair_partial(pair)
                for part in mine:
                    merge_(*self._place(partial, part), part.out, part.lse)
                mine = [partial]
            elif running is not None:  # same schedule, same shapes: part i onto partial i
                for partial, part in zip(running, mine):
                    merge_(partial.out, partial.lse, part.out, part.lse)
                mine = running
            elif not last:  # the first step of several: float32 partials
                mine = [replace(p, out=p.out.float()) for p in mine]
            if not last:
                self.running[pair] = mine
            else:
                self.kept += [replace(p, out=p.out.to(self.q.dtype)) for p in mine]

    def _pair_partial(self, pair: int) -> Part:
        """An empty float32 partial of every head of ``pair``, gathered: ``(0, -inf)``."""
        shape = self.gathered_shape(pair)
        out = self.buffer(f"partial {pair}", (*shape, self.d), torch.float32, fill=0.0)
        lse = self.buffer(f"partial {pair} lse", shape, torch.float32, fill=-torch.inf)
        heads, offsets = pair_heads(self.groups(pair))
        return Part(pair, self.widths[pair], self.rates[pair], heads, offsets, out, lse)

    def _place(self, partial: Part, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        """Where ``part`` lies in its pair's gathered ``partial``: views of its out and lse
        (a group's heads, a piece's chunk)."""
        views = partial.out, partial.lse
        if part.group is not None:
            groups = self.groups(part.pair)
            heads = head_slices(groups)[groups.index(part.group)]
            views = tuple(x[:, heads] for x in views)
        elif part.heads != partial.heads:
            raise ValueError(f"executor: a part of pair {part.pair} in another head order")
        if part.piece is not None:
            views = tuple(self.piece(x, part.piece) for x in views)
        return views

    def _mix(self) -> None:
        from .mix_triton import mix_

        self.out = torch.empty_like(self.q, memory_format=torch.contiguous_format)
        mix_(self.kept, self.widths, self.rates, self.out, self.lse)
        self.kept = []

    def _own_rows(self, batch: TaskBatch) -> None:
        """A ragged batch on the rank's own rows: one gather and one call per row batch."""
        causal = self.causal(batch)
        for rows in task_row_batches(batch, self.groups(batch.pair), self.plan.chunks):
            attend_rows(self.q, self.k, self.v, self.out, self.lse, rows, causal=causal,
                        scale=self.scale, kernel=self.kernel, pad=self.pad,
                        kv_ratio=self.kv_ratio, dropout=self.dropout)  # fmt: skip

    def _received(self, batch: TaskBatch, held: dict[int, Payload]) -> None:
        """A ragged batch on blocks received (or on another piece of the rank's own block):
        one call per task and pattern group."""
        groups = self.groups(batch.pair)
        causal = self.causal(batch)
        for task in batch.tasks:
            block = held[task.subring.index]
            for g, group in enumerate(groups):
                if batch.actions[g] is BlockAction.SKIP:
                    continue
                local = self.plan.local(task.q_rows[g])
                keys, values, bias = self.slot_blocks(task, g, block)
                out, lse = attend(
                    select(self.q, local, group.heads),
                    keys,
                    values,
                    causal=causal,
                    scale=self.scale,
                    kernel=self.kernel,
                    bias=bias,
                    dropout=self.dropout,
                )
                rows = range_index(local, self.q.device)[:, None]  # (m, 1)
                heads = heads_index(group.heads, self.q.device)[None, :]  # (1, H)
                block_out, block_lse = out.transpose(1, 2), lse.transpose(1, 2)
                merge_into(self.out, self.lse, rows, heads, block_out, block_lse)


def attend_rows(q, k, v, out, lse, batch: RowBatch, *, causal: bool, scale: float, kernel,
                pad: torch.Tensor | None = None, kv_ratio: int = 1,
                dropout: Dropout | None = None) -> None:  # fmt: skip
    """Attend one row batch (rows: indices into q, k, v, and ``pad``, the key bias ``(b, n,
    h_kv, 1)`` if any; k, v with ``h / kv_ratio`` heads: Note [Fewer K/V heads] in
    :mod:`ringsim.gpu.executor.base`) and merge it into ``out (b, n, h, d)``, ``lse (b, n,
    h)``."""
    rows, heads = batch_index(batch, q.device)
    kv = kv_index(heads, kv_ratio)
    bias = None if pad is None else batch_blocks(pad, batch, rows, kv).transpose(-1, -2)
    block_out, block_lse = attend(
        batch_blocks(q, batch, rows, heads),
        *(batch_blocks(x, batch, rows, kv) for x in (k, v)),
        causal=causal,
        scale=scale,
        kernel=kernel,
        bias=bias,
        dropout=dropout,
    )
    b = q.shape[0]
    merge_into(out, lse, rows, heads, unblock(block_out, b), unblock(block_lse, b))
