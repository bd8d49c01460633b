"""Ring dilated attention, one rank's code, over any communicator (SPEC 5-6).

The same function runs on each thread of the simulated cluster and on each process under
``mpiexec``. It executes the rank's :func:`ringsim.plan.rank_plan`, step by step:

1. check the local input and agree with the other ranks (fail together);
2. at step 0, *select* the rank's own K/V rows of each sub-ring: its first block;
3. each step: wait for the blocks posted at the previous step, post the next step's
   exchange (so it overlaps the compute), attend the rank's queries to each held block, and
   merge the block result into the running ``(out, lse)`` with the stable merge.

Only the rows a pattern selects travel, only inside a segment's sub-ring. A rank holds its
shards of q, k, v, its out and lse, and the blocks of the current step: O(seq_len / P).
"""

from __future__ import annotations

import numpy as np

from ringsim.agree import agree
from ringsim.comm.base import Communicator, Payload, Recv, Request, Send, payload_nbytes
from ringsim.config import check_qkv, make_config
from ringsim.plan import BlockAction, RankPlan, RankStep, Task, Transfer, rank_plan
from ringsim.trace import Event, RankTrace, TraceAction

from .block import block_attention
from .dilated import check_float, empty_result
from .merge import merge_stable


def positions(rows: range) -> np.ndarray:
    return np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)


def own_block(k: np.ndarray, v: np.ndarray, task: Task, plan: RankPlan) -> Payload:
    """This rank's K and V rows of each pattern group: ``(K_g0.., V_g0..)``, each
    ``(b, rows, heads of the group, d)``."""
    groups = plan.groups[task.subring.pair]
    local = [positions(rows) - plan.shard.start for rows in task.k_rows]
    keys = tuple(k[:, i][:, :, list(g.heads)] for i, g in zip(local, groups))
    values = tuple(v[:, i][:, :, list(g.heads)] for i, g in zip(local, groups))
    return keys + values


def message(block: Payload, transfer: Transfer) -> Payload:
    """The part of a held block a transfer sends: pruned groups travel as 0 rows."""
    m = len(transfer.rows)
    kept = [a if len(rows) else a[:, :0] for a, rows in zip(block, transfer.rows * 2)]
    return tuple(np.ascontiguousarray(a) for a in kept[:m] + kept[m:])


def expected(transfer: Transfer, plan: RankPlan, shape: tuple[int, ...], dtype) -> Recv:
    """The receive of a transfer: shapes from the plan, so buffers can be made up front."""
    b, _, _, d = shape
    groups = plan.groups[transfer.subring.pair]
    shapes = tuple((b, len(rows), len(g.heads), d) for rows, g in zip(transfer.rows, groups))
    return Recv(transfer.send_rank, transfer.subring.tag, shapes * 2, np.dtype(dtype))


def post(
    comm: Communicator,
    step: RankStep,
    held: dict[int, Payload],
    plan: RankPlan,
    shape: tuple[int, ...],
    dtype,
    trace: RankTrace,
) -> Request:
    """Post one step's sends (from the blocks held now) and receives."""
    sends = []
    for t in step.sends:
        payload = message(held[t.subring.index], t)
        sends.append(Send(t.recv_rank, t.subring.tag, payload))
        trace.add(
            Event(
                step.step,
                plan.rank,
                TraceAction.SEND,
                t.recv_rank,
                payload_nbytes(payload),
                t.subring.pair,
                t.subring.index,
                t.source_rank,
                t.rows,
            )
        )
    recvs = [expected(t, plan, shape, dtype) for t in step.recvs]
    return comm.start(sends, recvs)


def attend(
    q, block: Payload, task: Task, plan: RankPlan, out, lse, scale: float, trace: RankTrace
) -> None:
    """Attend the rank's queries to one held block and merge into ``(out, lse)`` in place."""
    groups = plan.groups[task.subring.pair]
    m = len(groups)
    for g, group in enumerate(groups):
        action = task.actions[g]
        if action is BlockAction.SKIP:
            continue
        q_local = positions(task.q_rows[g]) - plan.shard.start
        heads = np.array(group.heads)
        block_out, block_lse = block_attention(
            q[:, q_local][:, :, heads],
            block[g],
            block[m + g],
            positions(task.q_rows[g]),
            positions(task.k_rows[g]),
            is_causal=action is not BlockAction.FULL,
            scale=scale,
        )
        rows, cols = q_local[:, None], heads[None, :]
        out[:, rows, cols], lse[:, cols.T, rows.T] = merge_stable(
            out[:, rows, cols], lse[:, cols.T, rows.T], block_out, block_lse
        )
    detail = ",".join(a.value for a in task.actions)
    base = dict(
        step=task.step,
        rank=plan.rank,
        pair=task.subring.pair,
        subring=task.subring.index,
        source_rank=task.source_rank,
        detail=detail,
    )
    if task.skipped:
        trace.add(Event(action=TraceAction.SKIP, **base))
        return
    attended = tuple(q for q, a in zip(task.q_rows, task.actions) if a is not BlockAction.SKIP)
    trace.add(Event(action=TraceAction.COMPUTE, rows=attended, **base))
    trace.add(Event(action=TraceAction.MERGE, **base))


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
):
    """This rank's part of ring dilated attention (SPEC 5-6).

    Args:
        q, k, v: this rank's shards, ``(batch, seq_len / P, num_heads, head_dim)``, float32
            or float64; rank j holds global positions ``[j*c, (j+1)*c)``.
        comm: any ringsim communicator (simulated cluster or MPI); P = ``comm.world_size``.
        segment_lengths, dilation_rates, is_causal, mode, softmax_scale: as
            :func:`ringsim.reference.dilated_attention`, with global positions.
        return_lse: also return this rank's lse ``(batch, num_heads, seq_len / P)``.
        trace: a :class:`ringsim.trace.RankTrace` to record this rank's events in.
    Returns:
        this rank's out ``(batch, seq_len / P, num_heads, head_dim)`` [, lse].
    """
    trace = trace if trace is not None else RankTrace(comm.rank)
    error, description, config = None, "", None
    try:  # 1. local checks first; every rank then learns every rank's verdict
        config = make_config(
            segment_lengths,
            dilation_rates,
            is_causal=is_causal,
            mode=mode,
            softmax_scale=softmax_scale,
        )
        b, c, h, d = check_qkv(q, k, v)
        check_float(q)
        config.head_groups(h)
        description = (
            f"w={config.segment_lengths} r={config.dilation_rates} "
            f"{config.mode.value} causal={config.is_causal} "
            f"scale={config.softmax_scale} shard={(b, c, h, d)} {q.dtype}"
        )
    except (TypeError, ValueError) as err:
        error = err
    agree(comm, description, error)
    shape, dtype = (b, c, h, d), q.dtype
    plan = rank_plan(config, h, c * comm.world_size, comm.world_size, comm.rank)
    scale = config.scale(d)
    out, lse = empty_result(b, c, h, d, dtype)
    trace.hold("q, k, v, out, lse", sum(x.nbytes for x in (q, k, v, out, lse)))

    held: dict[int, Payload] = {}  # sub-ring index -> the block this rank holds this step
    pending: Request | None = None
    with np.errstate(invalid="ignore", over="ignore"):
        for index, step in enumerate(plan.steps):
            if pending is not None:  # 3a. the blocks posted at the previous step
                trace.hold("in flight", 0)
                for t, payload in zip(step.recvs, pending.wait()):
                    held[t.subring.index] = payload
                    trace.add(
                        Event(
                            step.step,
                            plan.rank,
                            TraceAction.RECV,
                            t.send_rank,
                            payload_nbytes(payload),
                            t.subring.pair,
                            t.subring.index,
                            t.source_rank,
                            t.rows,
                        )
                    )
            for task in step.tasks:  # 2. step 0: the rank's own rows of each sub-ring
                if task.source_rank == plan.rank:
                    held[task.subring.index] = own_block(k, v, task, plan)
            trace.hold("blocks held", sum(payload_nbytes(p) for p in held.values()))
            pending = None
            if index + 1 < len(plan.steps):  # 3b. overlap: post the next exchange first
                nxt = plan.steps[index + 1]
                pending = post(comm, nxt, held, plan, shape, dtype, trace)
                trace.hold(
                    "in flight",
                    sum(_nbytes(r) for r in (expected(t, plan, shape, dtype) for t in nxt.recvs)),
                )
            for task in step.tasks:  # 3c. attend and merge
                if task.subring.index in held or task.skipped:
                    attend(q, held.get(task.subring.index, ()), task, plan, out, lse, scale, trace)
            held.clear()  # sent blocks were copied when posted; nothing else needs them
            trace.hold("blocks held", 0)
    return (out, lse) if return_lse else out


def _nbytes(recv: Recv) -> int:
    return sum(int(np.prod(s)) for s in recv.shapes) * recv.dtype.itemsize
