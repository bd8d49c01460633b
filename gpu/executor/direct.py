"""Where the backward's block gradients go when the Triton kernels can sum them: parts, and
one pass per gradient.

Note [Direct gradients]
-----------------------
An aligned configuration whose parts the Triton kernels can combine
(:func:`~ringsim.gpu.executor.merge.mix_reason`) needs no float32 totals of dq, dk, dv: every
block gradient the kernels return is kept as a part (:class:`~ringsim.gpu.executor.part.Part`),
and one pass per gradient (:func:`~ringsim.gpu.executor.mix_triton.sum_`) adds, for each
position and head, the parts that cover it in float32 and writes the sum once in q's dtype.
Measured at 1M tokens on an H200, the totals' fill, per-group adds and final casts were a third
of the backward's time.

- **One device** (P = 1: one step, every block the rank's own): the parts of every head would
  hold 3 x sum(1/r_i) times q's bytes (5.8x for r = 1..16), so the heads are taken in chunks
  (:func:`head_chunks`: the parts of one chunk stay within q's bytes, or :data:`PARTS_BUDGET`,
  whichever is larger); heads are independent, so a chunk's sums are final.
- **A ring**: the sum reads one part per pair and head, so a pair whose gradients gather from
  several places (blocks at several steps, blocks that travel and whose dK/dV come home, the
  pieces of a zigzag shard: :attr:`DirectGradients.merged`) adds them into float32 *partials* of
  its own, in the gathered layout ``(b*S, H, m, d)`` (``c/r`` rows: a sixteenth of q for r =
  16); every other pair's gradients are kept as parts. At the end the partials are rounded to
  q's dtype, as the kernels' outputs are, and each gradient is summed once. No head chunks:
  the steps come one after the other, so every part is held until then (the parts of every
  pair but the merged ones, against float32 totals of 6x q's bytes). Measured on 2 H200s at 256K for
  LongNet's (c), causal, forward + backward (2026-11-30): 33.7 ms contiguous and 32.9 zigzag,
  against 38.7 and 38.8 with float32 totals; peak memory 4.92 GiB against 6.09-6.16.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ringsim.config import PatternGroup

from .base import Executor
from .layout import head_slices, pair_heads
from .part import Part

#: The bytes a head chunk's parts may hold at least (Note [Direct gradients]): below it,
#: short sequences keep their heads in one chunk, and their calls large.
PARTS_BUDGET = 1 << 30


def head_chunks(num_heads: int, parts_bytes: int, budget: int) -> tuple[range, ...]:
    """The heads in equal contiguous chunks, as few as keep ``parts_bytes`` (the parts of every
    head) per chunk within ``budget``: halved while the count of heads allows."""
    chunks = 1
    while parts_bytes > budget * chunks and num_heads % (2 * chunks) == 0:
        chunks *= 2
    size = num_heads // chunks
    return tuple(range(i, i + size) for i in range(0, num_heads, size))


def chunk_groups(groups: tuple[PatternGroup, ...], heads: range) -> tuple[PatternGroup, ...]:
    """The pattern groups restricted to ``heads`` (groups with none of them dropped)."""
    chosen = (replace(g, heads=tuple(h for h in g.heads if h in heads)) for g in groups)
    return tuple(g for g in chosen if g.heads)


class DirectGradients:
    """A ring rank's direct gradients (Note [Direct gradients]): the parts of dq, dk and dv
    (:attr:`parts`, q's dtype) and the float32 partials of the :attr:`merged` pairs, summed
    by :meth:`sums`."""

    def __init__(self, executor: Executor, dtype: torch.dtype) -> None:
        self.executor, self.dtype = executor, dtype
        plan = executor.plan
        #: the pairs whose gradients add into partials: in several batches, in a sub-ring of
        #: several ranks (dK/dV come home), or with pieces
        self.merged = plan.multi_batch_pairs | plan.shared_pairs | executor.spanning
        self.parts: tuple[list[Part], ...] = ([], [], [])
        self.partials: dict[int, tuple[torch.Tensor, ...]] = {}

    def of(self, pair: int, g: int | None = None) -> tuple[torch.Tensor, ...]:
        """The dq, dk, dv partials ``(b*S, H, m, d)`` of a merged pair (zero when first
        asked), or the views of group g's heads."""
        ex = self.executor
        if pair not in self.partials:
            shape = (*ex.gathered_shape(pair), ex.d)
            self.partials[pair] = tuple(
                ex.buffer(f"{name} partial {pair}", shape, self.dtype, fill=0.0)
                for name in ("dq", "dk", "dv")
            )
        if g is None:
            return self.partials[pair]
        heads = head_slices(ex.groups(pair))[g]
        return tuple(x[:, heads] for x in self.partials[pair])

    def sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq, dk, dv in q's dtype: the partials rounded and summed with the parts."""
        from .mix_triton import sum_

        ex = self.executor
        for pair, partials in self.partials.items():
            heads, offsets = pair_heads(ex.groups(pair))
            width, rate = ex.widths[pair], ex.rates[pair]
            for mine, x in zip(self.parts, partials):
                mine.append(Part(pair, width, rate, heads, offsets, x.to(ex.q.dtype), None))
        grads = []
        for mine in self.parts:
            total = torch.empty_like(ex.q, memory_format=torch.contiguous_format)
            if mine:
                sum_(mine, ex.widths, ex.rates, total)
                mine.clear()  # freed before the next gradient's total is allocated
            else:  # a rank with no query rows
                total.zero_()
            grads.append(total)
        self.parts, self.partials = ([], [], []), {}
        return grads[0], grads[1], grads[2]
