"""Ring mutants: each re-introduces one defect of docs/pitfalls.md of distributed implementations.

Applied with ``pytest.MonkeyPatch`` where the ring uses the name; ``test_ring_mutants.py``
shows :func:`ring_support.ring_suite_failures` (parity at P = 1..8 and the closed-form bytes)
fails for each. The single-process mutants are in ``mutants.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from mutants import Mutant

import ringsim.comm.traced
import ringsim.plan
import ringsim.reference.ring
import ringsim.reference.simulate
from ringsim.comm import simulated
from ringsim.config import selected_range
from ringsim.plan import SubRing
from ringsim.reference.block import block_attention


def shard_relative(mp: pytest.MonkeyPatch) -> None:
    """pitfall 1: offsets counted from the start of the rank's shard, not the segment's."""
    mp.setattr(
        ringsim.plan,
        "selected_range",
        lambda pattern, seg_start, lo, hi: selected_range(pattern, lo, lo, hi),
    )


def triangle_every_step(mp: pytest.MonkeyPatch) -> None:
    """pitfall 5: a triangular mask on every ring step, in compacted coordinates."""

    def attention(q, k, v, q_positions, k_positions, *, is_causal, scale):
        return block_attention(
            q,
            k,
            v,
            np.arange(len(q_positions)),
            np.arange(len(k_positions)),
            is_causal=True,
            scale=scale,
        )

    mp.setattr(ringsim.reference.ring, "block_attention", attention)


def one_buffer(mp: pytest.MonkeyPatch) -> None:
    """pitfall 9: send and receive in one buffer; the rank's outgoing block lands where
    the incoming one should (the deterministic outcome of the race)."""
    start = simulated.SimulatedCommunicator.start

    class Aliased:
        def __init__(self, request, sends):
            self.request, self.sends = request, sends

        def wait(self):
            received = self.request.wait()
            outgoing = {tuple(a.shape for a in s.payload): s.payload for s in self.sends}
            return [outgoing.get(tuple(a.shape for a in p), p) for p in received]

    mp.setattr(
        simulated.SimulatedCommunicator,
        "start",
        lambda self, sends, recvs: Aliased(start(self, sends, recvs), sends),
    )


def full_arrays_everywhere(mp: pytest.MonkeyPatch) -> None:
    """pitfall 10: every rank gets the whole q (and k, v) instead of its shard."""
    mp.setattr(ringsim.reference.simulate, "shard", lambda x, p: [x.copy() for _ in range(p)])


def whole_group(mp: pytest.MonkeyPatch) -> None:
    """pitfall 12: every segment's blocks go around all ranks, not only its sub-ring."""

    def every_rank_every_segment(config, seq_len, world_size, rank, layout="contiguous"):
        subrings, index = [], 0
        for pair, w_eff in enumerate(config.effective_segment_lengths(seq_len)):
            for segment, start in enumerate(range(0, seq_len, w_eff)):
                stop = min(start + w_eff, seq_len)
                subrings.append(
                    SubRing(index, pair, segment, start, stop, tuple(range(world_size)))
                )
                index += 1
        return tuple(subrings)

    mp.setattr(ringsim.plan, "rank_subrings", every_rank_every_segment)


def world_of_one(mp: pytest.MonkeyPatch) -> None:
    """pitfall 15: a simulated ring that quietly runs world size 1."""
    cluster = simulated.SimulatedCluster
    mp.setattr(
        ringsim.comm.traced,
        "SimulatedCluster",
        lambda world_size, timeout: cluster(1, timeout=timeout),
    )


def late_chunk_first(mp: pytest.MonkeyPatch) -> None:
    """pitfall 19: the plan reads a zigzag shard as chunk 2P-1-j then chunk j, the reverse
    of how the shards were cut."""
    real = ringsim.plan.rank_chunks

    def swapped(layout, rank, seq_len, world_size):
        return tuple(reversed(real(layout, rank, seq_len, world_size)))

    mp.setattr(ringsim.plan, "rank_chunks", swapped)


RING_MUTANTS: dict[str, Mutant] = {
    "shard-relative-dilation": Mutant(1, shard_relative.__doc__, shard_relative),
    "triangle-every-step": Mutant(5, triangle_every_step.__doc__, triangle_every_step),
    "one-buffer": Mutant(9, one_buffer.__doc__, one_buffer),
    "full-arrays-everywhere": Mutant(10, full_arrays_everywhere.__doc__, full_arrays_everywhere),
    "whole-group": Mutant(12, whole_group.__doc__, whole_group),
    "world-of-one": Mutant(15, world_of_one.__doc__, world_of_one),
    "late-chunk-first": Mutant(19, late_chunk_first.__doc__, late_chunk_first),
}
