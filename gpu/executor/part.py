"""One kernel call's result as the Triton passes read it
(:mod:`ringsim.gpu.executor.mix_triton`): a forward call's ``(out, lse)``, or one block
gradient of the backward (its ``out``; no lse)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ringsim.config import PatternGroup

from .layout import head_slices


@dataclass
class Part:
    """One kernel call's result: ``out (b*S, H, m, d)`` and ``lse (b*S, H, m)``. Row i of
    block ``bi*S + s``, head j, is local position ``s*width + i*rate + offsets[j]`` of head
    ``heads[j]`` in pair ``pair``; ``group`` is the pattern group (None for a call over a
    whole pair). ``piece``: a call on one chunk of a zigzag shard (Note [Strided pieces] in
    :mod:`ringsim.gpu.executor.base`), its blocks ``(b, H, m, d)``."""

    pair: int
    width: int
    rate: int
    heads: tuple[int, ...]
    offsets: tuple[int, ...]
    out: torch.Tensor
    lse: torch.Tensor | None  # None: a block gradient (the sum reads no lse)
    group: PatternGroup | None = None
    piece: int | None = None  # the one chunk of the shard it covers (b*S = b), or all

    def split(self, groups: tuple[PatternGroup, ...]) -> list[Part]:
        """A call over a whole pair (heads in ``groups``' order) as one part per group: views
        of its out and lse."""
        return [
            replace(self, heads=g.heads, offsets=(g.pattern.offset,) * len(g.heads), group=g,
                    out=self.out[:, heads], lse=None if self.lse is None else self.lse[:, heads])
            for g, heads in zip(groups, head_slices(groups))
        ]  # fmt: skip
