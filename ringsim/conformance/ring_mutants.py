"""Ring mutants: each puts back one defect of distributed implementations (the pitfalls page).

Applied where the ring uses the name (:mod:`ringsim.conformance.patching`). The test suite
shows that its ring suite (parity at P = 1..8 and the closed-form bytes) fails for each; the
conformance suite runs the simulated ring under the others to diagnose a user's ring. Three
leave no mark on an output (whole group: the output is right, the bytes are not) or break the
simulated ring itself (full arrays everywhere, a world of one), so no output can be matched
to them. The single-process mutants are in
:mod:`ringsim.conformance.mutants`.
"""

from __future__ import annotations

import numpy as np

import ringsim.comm.traced
import ringsim.plan
import ringsim.reference.ring
import ringsim.reference.simulate
from ringsim.comm import simulated
from ringsim.config import selected_range
from ringsim.plan import SubRing
from ringsim.reference.block import block_attention

from .patching import Mutant, SetAttr


def shard_relative(mp: SetAttr) -> None:
    """pitfall 1: offsets counted from the start of the rank's shard, not the segment's."""
    mp.setattr(
        ringsim.plan,
        "selected_range",
        lambda pattern, seg_start, lo, hi: selected_range(pattern, lo, lo, hi),
    )


def triangle_every_step(mp: SetAttr) -> None:
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


def one_buffer(mp: SetAttr) -> None:
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


def full_arrays_everywhere(mp: SetAttr) -> None:
    """pitfall 10: every rank gets the whole q (and k, v) instead of its shard."""

    def whole(x, world_size, layout, axis=1):
        return [x.copy() for _ in range(world_size)]

    mp.setattr(ringsim.reference.simulate, "_shards", whole)


def whole_group(mp: SetAttr) -> None:
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


def world_of_one(mp: SetAttr) -> None:
    """pitfall 15: a simulated ring that quietly runs world size 1."""
    cluster = simulated.SimulatedCluster
    mp.setattr(
        ringsim.comm.traced,
        "SimulatedCluster",
        lambda world_size, **options: cluster(1, **options),
    )


def late_chunk_first(mp: SetAttr) -> None:
    """pitfall 19: the plan reads a zigzag shard as chunk 2P-1-j then chunk j, the reverse
    of how the shards were cut."""
    real = ringsim.plan.rank_chunks

    def swapped(layout, rank, seq_len, world_size):
        return tuple(reversed(real(layout, rank, seq_len, world_size)))

    mp.setattr(ringsim.plan, "rank_chunks", swapped)


RING_MUTANTS: dict[str, Mutant] = {
    "shard-relative-dilation": Mutant(
        1, "dilation offsets counted from each rank's shard start, not the segment's",
        shard_relative,
    ),
    "triangle-every-step": Mutant(
        5, "a triangular causal mask on every ring step, in compacted coordinates",
        triangle_every_step,
    ),
    "one-buffer": Mutant(
        9, "one buffer for send and receive: the outgoing block stays where the incoming "
        "one should land", one_buffer,
    ),
    "full-arrays-everywhere": Mutant(
        10, "every rank holds the whole q, k and v, not its shard", full_arrays_everywhere
    ),
    "whole-group": Mutant(
        12, "every segment's blocks sent around all ranks, not only its sub-ring", whole_group
    ),
    "world-of-one": Mutant(15, "a simulated ring that quietly runs world size 1", world_of_one),
    "late-chunk-first": Mutant(
        19, "a zigzag shard read as chunk 2P-1-j then chunk j", late_chunk_first
    ),
}  # fmt: skip
