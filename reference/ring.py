"""Ring dilated attention, one rank's code, over any communicator (spec §5, §6).

The same function runs on each thread of the simulated cluster and on each process under
``mpiexec``. It executes the rank's :func:`ringsim.plan.rank_plan` with the shared loop
:func:`ringsim.ringloop.run_ring`, plugging in the NumPy parts below:

1. check the local input and agree with the other ranks (fail together);
2. *select* the rank's own K/V rows of each sub-ring: its first blocks;
3. each step: receive blocks, forward them, attend the rank's queries to each block with
   :func:`~ringsim.reference.block.block_attention` and merge the result into the running
   ``(out, lse)`` with the stable merge.

Only the rows a pattern selects travel, only inside a segment's sub-ring. A rank holds its
shards of q, k, v, its out and lse, and the blocks of the current step: O(seq_len / P).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ringsim.agree import agreed_config
from ringsim.comm.base import Communicator, Payload, Recv
from ringsim.config import check_flags, check_key_padding, kv_heads, kv_ratio, positions
from ringsim.plan import BlockAction, RankPlan, Task, Transfer, rank_plan
from ringsim.ringloop import TaskParts, run_ring
from ringsim.trace import RankTrace

from .block import block_attention
from .dilated import check_float, empty_result
from .merge import merge_stable
from .select import select_rows


@dataclass
class NumpyParts(TaskParts):
    """The NumPy pieces of the ring (:class:`ringsim.ringloop.RingParts`), one task at a
    time."""

    q: np.ndarray  # (b, c, h, d), this rank's shards
    k: np.ndarray
    v: np.ndarray
    out: np.ndarray  # (b, c, h, d), the running result
    lse: np.ndarray  # (b, h, c)
    plan: RankPlan
    scale: float
    #: this rank's ``(b, c)`` key padding (True = padding) or None; it travels with the
    #: keys: a block is K slots, V slots, then each slot's padding in q's dtype (1 = pad)
    key_padding: np.ndarray | None = field(default=None, kw_only=True)

    def own_block(self, pair: int, slots: tuple[range, ...]) -> Payload:
        heads = self.plan.kv_slot_heads(pair, len(slots))
        local = [positions(self.plan.local(rows)) for rows in slots]
        keys = tuple(select_rows(self.k, i, h) for i, h in zip(local, heads))
        values = tuple(select_rows(self.v, i, h) for i, h in zip(local, heads))
        if self.key_padding is None:
            return keys + values
        pads = tuple(self.key_padding[:, i].astype(self.q.dtype) for i in local)
        return keys + values + pads

    def kv_part(self, block: Payload) -> tuple[Payload, Payload]:
        """A block's K and V slots, and its padding slots (empty without a mask)."""
        kv = 2 * len(block) // (2 if self.key_padding is None else 3)
        return block[:kv], block[kv:]

    def message(self, block: Payload, transfer: Transfer) -> Payload:
        """The block (K, V[, padding]) or its dK/dV: each slot pruned to 0 rows where the
        transfer sends none of its rows."""
        copies = len(block) // len(transfer.rows)
        kept = (a if len(rows) else a[:, :0] for a, rows in zip(block, transfer.rows * copies))
        return tuple(np.ascontiguousarray(a) for a in kept)

    def expected(self, transfer: Transfer) -> Recv:
        b, _, _, d = self.q.shape
        heads = self.plan.kv_slot_heads(transfer.subring.pair, len(transfer.rows))
        shapes = tuple((b, len(r), len(h), d) for r, h in zip(transfer.rows, heads)) * 2
        if self.key_padding is not None:
            shapes += tuple((b, len(r)) for r in transfer.rows)
        return Recv(transfer.send_rank, transfer.subring.tag, shapes, self.q.dtype)

    def kv_index(self, group) -> list[int]:
        """For each query head of ``group``, the index of the K/V head it reads among the
        K/V heads a block of the group carries (all of them: 0, 1, ..., without GQA)."""
        carried = kv_heads(group.heads, self.plan.kv_ratio)
        return [carried.index(h // self.plan.kv_ratio) for h in group.heads]

    def attend_task(self, block: Payload, task: Task) -> None:
        groups = self.plan.groups[task.subring.pair]
        for g, group in enumerate(groups):
            action = task.actions[g]
            if action is BlockAction.SKIP:
                continue
            q_local = positions(self.plan.local(task.q_rows[g]))
            heads = np.array(group.heads)
            kv, pads = self.kv_part(block)
            keys, values = task.key_slots(g, len(kv))
            reads = self.kv_index(group)
            block_out, block_lse = block_attention(
                select_rows(self.q, q_local, group.heads),
                block[keys][:, :, reads],
                block[values][:, :, reads],
                positions(task.q_rows[g]),
                positions(task.k_rows[g]),
                is_causal=action is not BlockAction.FULL,
                scale=self.scale,
                **({"key_padding": pads[keys] > 0} if pads else {}),
            )
            rows, cols = q_local[:, None], heads[None, :]
            self.out[:, rows, cols], self.lse[:, cols.T, rows.T] = merge_stable(
                self.out[:, rows, cols], self.lse[:, cols.T, rows.T], block_out, block_lse
            )


def ring_dilated_attention_shard(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    segment_lengths,
    dilation_rates,
    *,
    comm: Communicator,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    trace: RankTrace | None = None,
    layout: str = "contiguous",
    key_padding_mask: np.ndarray | None = None,
):
    """This rank's part of ring dilated attention (spec §5, §6).

    Args:
        q, k, v: this rank's shards, ``(batch, seq_len / P, num_heads, head_dim)``, float32
            or float64, holding the global positions ``layout`` gives the rank
            (:func:`ringsim.layout.shard` cuts them; contiguous: ``[j*c, (j+1)*c)``); k and v
            may have fewer heads (grouped-query attention): each selected row then travels
            once per K/V head.
        comm: any ringsim communicator (simulated cluster or MPI); P = ``comm.world_size``.
        segment_lengths, dilation_rates, is_causal, mode, softmax_scale: as
            :func:`ringsim.reference.dilated_attention`, with global positions.
        return_lse: also return this rank's lse ``(batch, num_heads, seq_len / P)``.
        trace: a :class:`ringsim.trace.RankTrace` to record this rank's events in.
        layout: ``"contiguous"`` or ``"zigzag"`` (:mod:`ringsim.layout`), the same on every
            rank (checked with the rest of the configuration).
        key_padding_mask: this rank's ``(batch, seq_len / P)`` bool shard of the mask, True =
            padding (spec §1): it travels with the rank's keys (one value per selected row,
            in q's dtype), so a padded key is never attended anywhere. Every rank gives one,
            or none does.
    Returns:
        this rank's out ``(batch, seq_len / P, num_heads, head_dim)`` [, lse], rows in the
        order of its shard.
    """
    trace = trace if trace is not None else RankTrace(comm.rank)
    # 1. local checks, then every rank's verdict
    config, (b, c, h, d) = agreed_config(
        comm, q, k, v, segment_lengths, dilation_rates, is_causal=is_causal, mode=mode,
        softmax_scale=softmax_scale,
        check_array=lambda x: (check_float(x), check_flags(return_lse=return_lse),
                               check_key_padding(key_padding_mask, *x.shape[:2])),
        layout=layout, allow_gqa=True, key_padding=key_padding_mask is not None,
    )  # fmt: skip
    plan = rank_plan(config, h, c * comm.world_size, comm.world_size, comm.rank, layout,
                     kv_ratio(h, k.shape[2]))  # fmt: skip
    out, lse = empty_result(b, c, h, d, q.dtype)
    trace.hold("q, k, v, out, lse", sum(x.nbytes for x in (q, k, v, out, lse)))
    parts = NumpyParts(q, k, v, out, lse, plan, config.scale(d), key_padding=key_padding_mask)
    with np.errstate(invalid="ignore", over="ignore"):
        run_ring(comm, plan, parts, trace, q.dtype.itemsize)  # 2-3.
    return (out, lse) if return_lse else out
