"""Peer conventions: how other implementations choose a head's dilation offset.

Both differ from the definition (every head h of pair i uses offset ``h mod r_i``), so an
implementation that follows one of them fails the conformance suite; the diagnosis then names
the convention instead of a bug.

- **torchscale's head blocks** (LongNet's reference code, ``dense_to_sparse``): the heads are
  padded to a multiple of r and cut into r contiguous blocks; block j uses offset j, so
  head h uses ``h // ceil(H / r)``.
- **per-group offsets** (the dilated-attention-pytorch classes the seed grew from): in grouped
  mode every head of group i uses offset ``i mod r_i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ringsim.config import DilatedConfig, Pattern, PatternGroup

from .patching import Mutant, SetAttr

#: offset(pair, head, num_heads, rate) of one convention
OffsetRule = Callable[[int, int, int, int], int]


def _groups_by(rule: OffsetRule):
    """A ``DilatedConfig.pattern_groups`` that gives head h of pair i ``rule(i, h, H, r_i)``."""

    def pattern_groups(self: DilatedConfig, num_heads: int) -> tuple[PatternGroup, ...]:
        groups = []
        for pair, heads in enumerate(self.head_groups(num_heads)):
            w, r = self.segment_lengths[pair], self.dilation_rates[pair]
            by_offset: dict[int, list[int]] = {}
            for h in heads:
                by_offset.setdefault(rule(pair, h, num_heads, r) % r, []).append(h)
            for offset in sorted(by_offset):
                groups.append(PatternGroup(pair, Pattern(w, r, offset), tuple(by_offset[offset])))
        return tuple(groups)

    return pattern_groups


def _offsets(rule: OffsetRule) -> Callable[[SetAttr], None]:
    def apply(patcher: SetAttr) -> None:
        patcher.setattr(DilatedConfig, "pattern_groups", _groups_by(rule))

    return apply


def head_block(pair: int, head: int, num_heads: int, rate: int) -> int:
    """torchscale: head h is in block ``h // ceil(H / r)``, and block j uses offset j."""
    return head // math.ceil(num_heads / rate)


def group_index(pair: int, head: int, num_heads: int, rate: int) -> int:
    """dilated-attention-pytorch: every head of group i uses offset ``i mod r_i``."""
    return pair


CONVENTIONS: dict[str, Mutant] = {
    "torchscale-head-blocks": Mutant(
        None,
        "offsets by contiguous head blocks: head h uses h // ceil(H / r), not h mod r",
        _offsets(head_block),
        origin="torchscale's dense_to_sparse",
    ),
    "per-group-offsets": Mutant(
        None,
        "one offset per head group: every head of group i uses i mod r_i, not h mod r_i",
        _offsets(group_index),
        origin="dilated-attention-pytorch's head groups",
    ),
}
