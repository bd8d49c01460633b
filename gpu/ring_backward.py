"""The backward of the torch ring: one rank's code, over torch.distributed or any ringsim
communicator.

It runs the forward's schedule again with the shared loop, as the NumPy reference does
(:mod:`ringsim.reference.ring_backward`): K/V blocks take the same path, each step runs the
kernel's backward of the rank's queries against the block it holds, with the rank's final
out and lse, dq accumulates in float32 on the rank, and each block's dK/dV share travels
with it in float32 and back to its owner (:mod:`ringsim.gradrelay`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringsim.agree import agree
from ringsim.comm.base import Communicator, Payload
from ringsim.config import DilatedConfig
from ringsim.gradrelay import GradRelay, HomeAdds
from ringsim.plan import BlockAction, Task, rank_plan
from ringsim.ringloop import run_ring
from ringsim.trace import RankTrace

from .kernels import Kernel
from .kernels_backward import attend_backward
from .merge import accumulator_dtype
from .ring import TorchParts


@dataclass
class TorchGradParts(HomeAdds, TorchParts):
    """The torch pieces of the backward ring: ``out``, ``lse`` are the final ones."""

    dout: torch.Tensor  # (b, c, h, d)
    dlse: torch.Tensor | None  # (b, c, h) or None
    dq: torch.Tensor  # (b, c, h, d) accumulators, float32 or float64
    dk: torch.Tensor
    dv: torch.Tensor

    @property
    def grad_dtype(self) -> torch.dtype:
        return self.dq.dtype

    def attend(self, block: Payload, task: Task) -> Payload:
        """Kernel backward of every pattern group: dq here, the dK/dV share returned."""
        groups = self.plan.groups[task.subring.pair]
        shares = list(self.zeros(block))
        for g, group in enumerate(groups):
            action = task.actions[g]
            if action is BlockAction.SKIP:
                continue
            allowed = None
            if action is BlockAction.MASKED:  # keys and queries interleave: mask by position
                q_pos = torch.tensor(list(task.q_rows[g]), device=self.q.device)
                k_pos = torch.tensor(list(task.k_rows[g]), device=self.q.device)
                allowed = k_pos[None, :] <= q_pos[:, None]
            rows, heads = task.q_rows[g], group.heads
            dq, shares[g], shares[len(groups) + g] = attend_backward(
                self.select(self.q, rows, heads),
                block[g],
                block[len(groups) + g],
                self.select(self.out, rows, heads),
                self.select(self.lse, rows, heads),
                self.select(self.dout, rows, heads),
                causal=action is not BlockAction.FULL,
                scale=self.scale,
                kernel=Kernel.MATH if allowed is not None else self.kernel,
                allowed=allowed,
                dlse=None if self.dlse is None else self.select(self.dlse, rows, heads),
            )
            self.add_rows(self.dq, rows, heads, dq)
        return tuple(x.to(self.grad_dtype) for x in shares)  # dK/dV travel in float32

    def add_rows(self, total: torch.Tensor, rows: range, heads: tuple[int, ...], share) -> None:
        """``total (b, c, h, d)`` at ``rows`` and ``heads`` += ``share (b, H, m, d)``."""
        index = self.local(rows)[:, None], torch.as_tensor(heads, device=total.device)[None, :]
        total[(slice(None), *index)] += share.transpose(1, 2).to(total.dtype)

    def zeros(self, block: Payload) -> Payload:
        return tuple(torch.zeros(a.shape, dtype=self.grad_dtype, device=a.device) for a in block)


def check_backward(comm: Communicator, kernel: Kernel, dlse: torch.Tensor | None) -> None:
    """Every rank can run this backward, or all raise together (not some of them, which
    would leave the others waiting): the lse's gradient needs the math kernel."""
    error = None
    if dlse is not None and kernel is not Kernel.MATH:
        error = NotImplementedError(
            f"dlse: a gradient through the returned lse needs kernel='math' (the {kernel.value} "
            "kernel's backward has no lse input)"
        )
    agree(comm, "backward", error)


def ring_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    config: DilatedConfig,
    comm: Communicator,
    kernel: Kernel,
    trace: RankTrace,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's dq, dk, dv (in q's dtype) of :func:`~ringsim.gpu.ring_dilated_attention`.

    Args:
        q, k, v, out, dout: this rank's ``(b, c, h, d)``; out as the forward returned it.
        lse, dlse: ``(b, c, h)`` (rows, then heads): the forward's lse accumulator and its
            gradient (None: lse unused).
        config, comm, kernel: as the forward ran.
        trace: where this rank's backward events go.
    """
    check_backward(comm, kernel, dlse)
    b, c, h, d = q.shape
    plan = rank_plan(config, h, c * comm.world_size, comm.world_size, comm.rank)
    acc = accumulator_dtype(q.dtype)
    grads = [torch.zeros(b, c, h, d, dtype=acc, device=q.device) for _ in range(3)]
    trace.hold("q, k, v, out, lse, dout", sum(x.nbytes for x in (q, k, v, out, lse, dout)))
    trace.hold("dq, dk, dv", sum(x.nbytes for x in grads))
    parts = TorchGradParts(q, k, v, out, lse, plan, config.scale(d), kernel, dout, dlse, *grads)
    relay = GradRelay(comm, plan, parts, trace)
    run_ring(comm, plan, parts, trace, q.element_size(), relay)
    return tuple(x.to(q.dtype) for x in grads)  # (one shard each: small next to the ring)
