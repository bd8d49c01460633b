"""The ring plan as tables: pure functions, no communication (spec §5)."""

from __future__ import annotations

import numpy as np
import pytest
from ring_support import ALIGNED

from ringsim.cases import fixed_cases, random_case
from ringsim.config import make_config
from ringsim.layout import rank_chunks
from ringsim.plan import (
    BlockAction,
    block_action,
    rank_subrings,
    ring_plan,
    subring_ranks,
)
from ringsim.trace import closed_form_bytes as closed_form

F, C, M, S = BlockAction.FULL, BlockAction.CAUSAL, BlockAction.MASKED, BlockAction.SKIP


@pytest.mark.parametrize(
    ("q_rows", "k_rows", "causal", "expected"),
    [
        (range(8, 12), range(0, 4), False, F),
        (range(0, 4), range(8, 12), False, F),  # non-causal: every block counts
        (range(8, 12), range(0, 4), True, F),  # keys wholly before the queries
        (range(0, 4), range(8, 12), True, S),  # keys wholly after
        (range(0, 8, 2), range(0, 8, 2), True, C),  # the diagonal block
        (range(4, 8), range(4, 5), True, F),  # the key is at or before every query
        (range(1, 9, 2), range(0, 8, 2), True, M),  # interleaved, not the same rows
        (range(0), range(0, 4), False, S),  # no query
        (range(0, 4), range(3, 3), True, S),  # no key
        (range(5, 6), range(5, 6), True, F),  # one row: the diagonal is all there is
    ],
)
def test_block_action_table(q_rows, k_rows, causal, expected):
    assert block_action(q_rows, k_rows, causal) is expected


@pytest.mark.parametrize(
    ("start", "stop", "n", "p", "ranks"),
    [
        (0, 12, 12, 3, (0, 1, 2)),
        (0, 4, 12, 3, (0,)),
        (3, 6, 12, 3, (0, 1)),  # a ragged segment crossing a shard boundary
        (8, 12, 12, 3, (2,)),
        (10, 12, 12, 6, (5,)),
        (5, 11, 12, 6, (2, 3, 4, 5)),
    ],
)
def test_subring_ranks_table(start, stop, n, p, ranks):
    assert subring_ranks(start, stop, n, p) == ranks


def test_rank_chunks_table():
    assert [rank_chunks("contiguous", r, 12, 3) for r in range(3)] == [
        (range(0, 4),),
        (range(4, 8),),
        (range(8, 12),),
    ]
    # zigzag: 2P = 6 chunks of 2; rank j holds chunk j, then chunk 5 - j
    assert [rank_chunks("zigzag", r, 12, 3) for r in range(3)] == [
        (range(0, 2), range(10, 12)),
        (range(2, 4), range(8, 10)),
        (range(4, 6), range(6, 8)),
    ]


def test_rank_subrings_follow_global_segments():
    config = make_config((5, 12), (1, 2))
    # n = 12, P = 3, c = 4: pair 0 has segments [0,5) [5,10) [10,12); pair 1 one segment
    got = [(s.pair, s.start, s.stop, s.ranks, s.index) for s in rank_subrings(config, 12, 3, 1)]
    assert got == [(0, 0, 5, (0, 1), 0), (0, 5, 10, (1, 2), 1), (1, 0, 12, (0, 1, 2), 3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("segs", "rates", "n", "p", "heads", "mode"), ALIGNED)
def test_planned_bytes_equal_closed_form(segs, rates, n, p, heads, mode, causal):
    config = make_config(segs, rates, is_causal=causal, mode=mode)
    assert config.is_aligned(n, p)
    batch, d = 2, 3
    for plan in ring_plan(config, heads, n, p):
        planned = 0
        for step in plan.steps:
            for t in step.sends:
                groups = plan.groups[t.subring.pair]
                rows = sum(len(r) * len(g.heads) for r, g in zip(t.rows, groups))
                planned += 2 * batch * rows * d * 8
        assert planned == closed_form(config, heads, batch, d, n, p, plan.rank)


def all_cases():
    rng = np.random.default_rng(7)
    return [
        c
        for p in (1, 2, 3, 4, 5, 8)
        for c in fixed_cases(p) + [random_case(rng, p) for _ in range(20)]
    ]


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.describe())
def test_every_send_has_its_receive_and_stays_in_its_subring(case):
    config = make_config(
        case.segment_lengths, case.dilation_rates, is_causal=case.is_causal, mode=case.mode
    )
    plans = ring_plan(config, case.num_heads, case.seq_len, case.world_size)
    sends = sorted(
        (t.step, t.subring.index, t.send_rank, t.recv_rank)
        for p in plans
        for s in p.steps
        for t in s.sends
    )
    recvs = sorted(
        (t.step, t.subring.index, t.send_rank, t.recv_rank)
        for p in plans
        for s in p.steps
        for t in s.recvs
    )
    assert sends == recvs
    for plan in plans:
        for step in plan.steps:
            for t in step.sends:
                ring = t.subring.ranks
                assert t.send_rank in ring and t.recv_rank in ring and t.source_rank in ring
                assert ring.index(t.recv_rank) == (ring.index(t.send_rank) + 1) % len(ring)
                assert any(len(r) for r in t.rows), "a message with no rows was planned"


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.describe())
def test_no_block_travels_past_its_last_user(case):
    """Each sent group's rows are attended (not SKIP) by the receiver or a later place."""
    config = make_config(
        case.segment_lengths, case.dilation_rates, is_causal=case.is_causal, mode=case.mode
    )
    plans = ring_plan(config, case.num_heads, case.seq_len, case.world_size)
    used = {}  # (sub-ring, source rank, group) -> steps at which some rank attends it
    for plan in plans:
        for step in plan.steps:
            for task in step.tasks:
                for g, action in enumerate(task.actions):
                    if action is not BlockAction.SKIP:
                        key = (task.subring.index, task.source_rank, g)
                        used.setdefault(key, []).append(task.step)
    for plan in plans:
        for step in plan.steps:
            for t in step.recvs:
                for g, rows in enumerate(t.rows):
                    if len(rows):
                        later = used.get((t.subring.index, t.source_rank, g), [])
                        assert any(s >= t.step for s in later), (t, "nobody further uses it")


def test_step_batches_group_tasks_by_pair_action_and_rows():
    """P = 2, n = 16: pair 0 (w = 4) has two segments per shard, every one own and causal:
    one batch; pair 1 (w = 16) spans both shards: at step 1 rank 1 attends rank 0's block
    (FULL), rank 0 skips rank 1's (SKIP, in no batch)."""
    config = make_config((4, 16), (1, 2), is_causal=True)
    plans = ring_plan(config, 2, 16, 2)
    step0 = plans[1].steps[0].batches
    assert [(b.pair, b.own, len(b.tasks), b.actions) for b in step0] == [
        (0, True, 2, (C,)),
        (1, True, 1, (C, C)),
    ]
    assert [(b.pair, b.own, b.actions) for b in plans[1].steps[1].batches] == [(1, False, (F, F))]
    assert plans[0].steps[1].batches == ()  # the block of rank 1 is skipped by rank 0
    assert plans[0].last_busy_step == 0 and plans[1].last_busy_step == 1
    assert plans[1].pair_last_steps == {0: 0, 1: 1} and plans[1].multi_step_pairs == {1}
    assert plans[0].multi_step_pairs == frozenset()


def test_ragged_tasks_with_other_row_counts_form_their_own_batch():
    """w = 6 on n = 16, P = 1: two full segments (counts 3, 3 for r = 2) and a ragged tail
    of 4 positions (counts 2, 2): two batches of one pair."""
    plan = ring_plan(make_config((6,), (2,)), 2, 16, 1)[0]
    batches = plan.steps[0].batches
    assert [(len(b.tasks), b.q_counts) for b in batches] == [(2, (3, 3)), (1, (2, 2))]


def test_rank_plan_is_cached():
    from ringsim.plan import rank_plan

    config = make_config((4, 16), (1, 2))
    assert rank_plan(config, 2, 16, 2, 1) is rank_plan(config, 2, 16, 2, 1)
