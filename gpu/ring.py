"""Ring dilated attention in torch: one rank's code over torch.distributed or any ringsim
communicator (SPEC 5-6).

It runs the same plan and the same loop as the NumPy reference
(:func:`ringsim.ringloop.run_ring`), with torch parts: blocks are kept in the kernels'
``(b, H, m, d)`` layout, attended by the chosen kernel, and merged into float32
accumulators (float64 for float64 input). Sends are packed into new buffers when posted
and receives land in fresh buffers, never in a buffer being sent (PITFALLS 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringsim.agree import agreed_config
from ringsim.comm.base import Communicator, Payload, Recv
from ringsim.config import DilatedConfig
from ringsim.plan import BlockAction, RankPlan, Task, Transfer, rank_plan
from ringsim.ringloop import run_ring
from ringsim.trace import RankTrace

from .dilated import check_differentiable, check_tensor
from .kernels import Kernel, attend, choose_kernel, math_attention
from .merge import accumulator_dtype, merge_into


@dataclass
class TorchParts:
    """The torch pieces of the ring (:class:`ringsim.ringloop.RingParts`)."""

    q: torch.Tensor  # (b, c, h, d), this rank's shards
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor  # (b, c, h, d) accumulator
    lse: torch.Tensor  # (b, c, h) accumulator
    plan: RankPlan
    scale: float
    kernel: Kernel

    def local(self, rows: range) -> torch.Tensor:
        start = self.plan.shard.start
        return torch.arange(rows.start - start, rows.stop - start, rows.step, device=self.q.device)

    def select(self, x: torch.Tensor, rows: range, heads: tuple[int, ...]) -> torch.Tensor:
        """``x (b, c, h, *rest)`` -> the rows and heads, as ``(b, H, m, *rest)`` contiguous
        (q, k, v, out: ``(b, H, m, d)``; lse ``(b, c, h)``: ``(b, H, m)``)."""
        return x[:, self.local(rows)][:, :, list(heads)].transpose(1, 2).contiguous()

    def own_block(self, task: Task) -> Payload:
        groups = self.plan.groups[task.subring.pair]
        keys = tuple(self.select(self.k, r, g.heads) for r, g in zip(task.k_rows, groups))
        values = tuple(self.select(self.v, r, g.heads) for r, g in zip(task.k_rows, groups))
        return keys + values

    def message(self, block: Payload, transfer: Transfer) -> Payload:
        return tuple(a if len(rows) else a[:, :, :0] for a, rows in zip(block, transfer.rows * 2))

    def expected(self, transfer: Transfer) -> Recv:
        b, _, _, d = self.q.shape
        groups = self.plan.groups[transfer.subring.pair]
        shapes = tuple((b, len(g.heads), len(r), d) for r, g in zip(transfer.rows, groups))
        return Recv(transfer.send_rank, transfer.subring.tag, shapes * 2, self.q.dtype)

    def attend(self, block: Payload, task: Task) -> None:
        groups = self.plan.groups[task.subring.pair]
        for g, group in enumerate(groups):
            action = task.actions[g]
            if action is BlockAction.SKIP:
                continue
            qs, ks, vs = (
                self.select(self.q, task.q_rows[g], group.heads),
                block[g],
                block[len(groups) + g],
            )
            if action is BlockAction.MASKED:  # keys and queries interleave: mask by position
                q_pos = torch.tensor(list(task.q_rows[g]), device=qs.device)
                k_pos = torch.tensor(list(task.k_rows[g]), device=qs.device)
                out, lse = math_attention(
                    qs,
                    ks,
                    vs,
                    causal=True,
                    scale=self.scale,
                    allowed=k_pos[None, :] <= q_pos[:, None],
                )
            else:
                out, lse = attend(
                    qs,
                    ks,
                    vs,
                    causal=action is BlockAction.CAUSAL,
                    scale=self.scale,
                    kernel=self.kernel,
                )
            heads = torch.as_tensor(group.heads, device=qs.device)[None, :]  # (1, H)
            rows = self.local(task.q_rows[g])[:, None]  # (m, 1)
            merge_into(self.out, self.lse, rows, heads, out.transpose(1, 2), lse.transpose(1, 2))


def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths,
    dilation_rates,
    *,
    group=None,
    comm: Communicator | None = None,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    kernel: Kernel | str | None = None,
    trace: RankTrace | None = None,
    backward_trace: RankTrace | None = None,
):
    """This rank's part of ring dilated attention, on local shards (SPEC 5-6).

    Differentiable: the backward runs the ring again (:mod:`ringsim.gpu.ring_backward`), so
    every rank must call backward, as with any torch.distributed collective. Over the
    simulated cluster on a GPU, one autograd engine thread serves every virtual rank, so
    their backward passes cannot wait for each other there: use
    :func:`~ringsim.gpu.simulated_ring_dilated_attention`, which runs the backward ring
    itself.

    Args:
        q, k, v: this rank's shards ``(batch, seq_len / P, num_heads, head_dim)``; rank j
            holds global positions ``[j*c, (j+1)*c)``.
        group: the torch.distributed process group (default: the default group), used
            when ``comm`` is None.
        comm: any ringsim communicator instead (e.g. a simulated cluster's).
        segment_lengths, dilation_rates, is_causal, mode, softmax_scale: as
            :func:`ringsim.gpu.dilated_attention`, with global positions.
        return_lse: also return this rank's lse ``(batch, num_heads, seq_len / P)``.
        kernel: the attention kernel (default: the fastest that can run).
        trace: a :class:`ringsim.trace.RankTrace` to record this rank's events in.
        backward_trace: another, for the events of the backward pass.
    Returns:
        this rank's out ``(batch, seq_len / P, num_heads, head_dim)`` in q's dtype [, lse].
    """
    if comm is None:
        from .comm import TorchDistCommunicator

        comm = TorchDistCommunicator(group)
    trace = trace if trace is not None else RankTrace(comm.rank)
    config, _ = agreed_config(
        comm,
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        mode=mode,
        softmax_scale=softmax_scale,
        check_array=check_tensor,
    )
    chosen = choose_kernel(q, kernel)
    check_differentiable(q, k, v, chosen)
    from .autograd import RingFunction

    out, lse = RingFunction.apply(q, k, v, config, comm, chosen, trace, backward_trace)
    return (out, lse) if return_lse else out


def ring_forward(q, k, v, config: DilatedConfig, comm: Communicator, kernel: Kernel, trace):
    """This rank's forward, no autograd: out ``(b, c, h, d)`` in q's dtype and the lse
    accumulator ``(b, c, h)`` (rows, then heads), float32 or float64."""
    b, c, h, d = q.shape
    plan = rank_plan(config, h, c * comm.world_size, comm.world_size, comm.rank)
    acc = accumulator_dtype(q.dtype)
    out = torch.zeros(b, c, h, d, dtype=acc, device=q.device)
    lse = torch.full((b, c, h), -torch.inf, dtype=acc, device=q.device)  # rows, then heads
    trace.hold("q, k, v, out, lse", sum(x.nbytes for x in (q, k, v, out, lse)))
    parts = TorchParts(q, k, v, out, lse, plan, config.scale(d), kernel)
    run_ring(comm, plan, parts, trace, q.element_size())
    return out.to(q.dtype), lse
