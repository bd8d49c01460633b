"""The backward of ring dilated attention, one rank's code, over any communicator.

The forward's schedule runs again (:func:`ringsim.ringloop.run_ring`): the same K/V blocks
take the same path, and at each step the rank runs the block backward
(:func:`~ringsim.reference.backward.block_attention_backward`) of its queries against the
block it holds, with the *final* out and lse of its rows:

1. dq accumulates on the rank, one block at a time;
2. the block's share of dK/dV is added to the accumulator that travels with the block, and
   goes back to the block's owner when the block stops (:mod:`ringsim.gradrelay`);
3. the owner adds what comes home into its dk, dv.

Using the final out and lse in every block is what makes the gradient exact through the
LSE mixing (spec §4): ``exp(s - L)`` is the block's probability times its mixing weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ringsim.agree import agreed_config
from ringsim.comm.base import Communicator, Payload
from ringsim.config import check_key_padding, kv_ratio, positions
from ringsim.gradrelay import GradRelay, HomeAdds
from ringsim.plan import BlockAction, Task, rank_plan
from ringsim.ringloop import run_ring
from ringsim.trace import RankTrace

from .backward import block_attention_backward, check_backward_inputs
from .dilated import check_float
from .ring import NumpyParts
from .select import select_rows


@dataclass
class NumpyGradParts(HomeAdds, NumpyParts):
    """The NumPy pieces of the backward ring: ``out``, ``lse`` are the final ones."""

    dout: np.ndarray  # (b, c, h, d)
    dlse: np.ndarray | None  # (b, h, c) or None
    dq: np.ndarray  # (b, c, h, d) accumulators, q's dtype
    dk: np.ndarray
    dv: np.ndarray

    @property
    def grad_dtype(self):
        return self.q.dtype

    def _local(self, rows: range) -> np.ndarray:
        return positions(self.plan.local(rows))

    def attend_task(self, block: Payload, task: Task) -> Payload:
        """Block backward of every pattern group: dq here, the dK/dV share returned."""
        groups = self.plan.groups[task.subring.pair]
        block, pads = self.kv_part(block)  # dK/dV only: the padding has no gradient
        shares = [np.zeros_like(a) for a in block]
        for g, group in enumerate(groups):
            action = task.actions[g]
            if action is BlockAction.SKIP:
                continue
            q_local = self._local(task.q_rows[g])
            rows, cols = q_local[:, None], np.array(group.heads)[None, :]
            keys, values = task.key_slots(g, len(block))
            reads = self.kv_index(group)
            dq, dk, dv = block_attention_backward(
                select_rows(self.q, q_local, group.heads),
                block[keys][:, :, reads],
                block[values][:, :, reads],
                select_rows(self.out, q_local, group.heads),
                self.lse[:, cols.T, rows.T],
                select_rows(self.dout, q_local, group.heads),
                positions(task.q_rows[g]),
                positions(task.k_rows[g]),
                is_causal=action is not BlockAction.FULL,
                scale=self.scale,
                dlse=None if self.dlse is None else self.dlse[:, cols.T, rows.T],
                **({"key_padding": pads[keys] > 0} if pads else {}),
            )
            self.add_rows(self.dq, task.q_rows[g], group.heads, dq)
            for slot, share in ((keys, dk), (values, dv)):  # query heads sharing a K/V head
                np.add.at(shares[slot], (slice(None), slice(None), reads), share)
        return tuple(shares)

    def add_rows(self, total: np.ndarray, rows: range, heads: tuple[int, ...], share) -> None:
        """``total (b, c, h, d)`` at ``rows`` and ``heads`` += ``share (b, m, H, d)`` (rows and
        heads are unique: no lost updates)."""
        total[:, self._local(rows)[:, None], np.array(heads)[None, :]] += share

    def zeros(self, block: Payload) -> Payload:
        return tuple(np.zeros(a.shape, dtype=self.grad_dtype) for a in self.kv_part(block)[0])


def ring_dilated_attention_shard_backward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, lse: np.ndarray,
    dout: np.ndarray, segment_lengths, dilation_rates, *, comm: Communicator,
    is_causal: bool = False, mode: str = "longnet", softmax_scale: float | None = None,
    dlse: np.ndarray | None = None, trace: RankTrace | None = None, layout: str = "contiguous",
    key_padding_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """This rank's part of the backward of ring dilated attention.

    Args:
        q, k, v: this rank's shards ``(batch, seq_len / P, num_heads, head_dim)``, as given
            to :func:`~ringsim.reference.ring_dilated_attention_shard`.
        out, lse: what that forward returned on this rank: out ``(batch, seq_len / P,
            num_heads, head_dim)``, lse ``(batch, num_heads, seq_len / P)``.
        dout: the gradient of the loss with respect to out, shaped like out.
        comm, segment_lengths, dilation_rates, is_causal, mode, softmax_scale, layout: as the
            forward.
        key_padding_mask: this rank's shard of the mask, as the forward took it.
        dlse: the gradient with respect to lse, shaped like lse (None: lse unused).
        trace: a :class:`ringsim.trace.RankTrace` to record this rank's events in.
    Returns:
        this rank's ``(dq, dk, dv)``, shaped like q, k and v, in q's dtype.
    """
    trace = trace if trace is not None else RankTrace(comm.rank)
    config, (_, c, h, d) = agreed_config(
        comm, q, k, v, segment_lengths, dilation_rates, is_causal=is_causal, mode=mode,
        softmax_scale=softmax_scale, layout=layout, allow_gqa=True,
        check_array=lambda x: (check_float(x), check_backward_inputs(x, out, lse, dout, dlse),
                               check_key_padding(key_padding_mask, *x.shape[:2])),
        key_padding=key_padding_mask is not None,
    )  # fmt: skip
    plan = rank_plan(config, h, c * comm.world_size, comm.world_size, comm.rank, layout,
                     kv_ratio(h, k.shape[2]))  # fmt: skip
    grads = (np.zeros_like(q), np.zeros_like(k), np.zeros_like(v))
    trace.hold("q, k, v, out, lse, dout", sum(x.nbytes for x in (q, k, v, out, lse, dout)))
    trace.hold("dq, dk, dv", sum(x.nbytes for x in grads))
    parts = NumpyGradParts(q, k, v, out, lse, plan, config.scale(d), dout, dlse, *grads,
                           key_padding=key_padding_mask)  # fmt: skip
    with np.errstate(invalid="ignore", over="ignore"):
        run_ring(comm, plan, parts, trace, q.dtype.itemsize, GradRelay(comm, plan, parts, trace))
    return grads
