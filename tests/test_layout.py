"""Layouts (spec §5): shard and unshard, the zigzag plan as tables, balance and bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ring_support import ZIGZAG_ALIGNED

import ringsim
from ringsim.cases import Case
from ringsim.config import make_config
from ringsim.layout import check_layout, chunk_length, chunk_owner, local_rows, rank_chunks
from ringsim.plan import rank_subrings, ring_plan, subring_ranks
from ringsim.reference.simulate import run_case
from ringsim.trace import closed_form_bytes

LAYOUTS = ("contiguous", "zigzag")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_unshard_inverts_shard(layout, world_size, kind):
    n = 4 * world_size
    x = np.random.default_rng(world_size).standard_normal((2, n, 3, 2))
    lse = np.random.default_rng(1).standard_normal((2, 3, n))
    if kind == "torch":
        x, lse = torch.from_numpy(x), torch.from_numpy(lse)
    shards = [ringsim.shard(x, r, world_size, layout=layout) for r in range(world_size)]
    lse_shards = [
        ringsim.shard(lse, r, world_size, layout=layout, axis=-1) for r in range(world_size)
    ]
    assert all(s.shape == (2, 4, 3, 2) for s in shards)
    assert type(shards[0]) is type(x)
    back = ringsim.unshard(shards, layout=layout)
    back_lse = ringsim.unshard(lse_shards, layout=layout, axis=-1)
    assert (np.asarray(back) == np.asarray(x)).all()
    assert (np.asarray(back_lse) == np.asarray(lse)).all()


def test_zigzag_shard_holds_chunk_j_then_chunk_2p_minus_1_minus_j():
    x = np.arange(16)[None, :]  # positions as values: P = 4, 8 chunks of 2
    got = [ringsim.shard(x, r, 4, layout="zigzag")[0].tolist() for r in range(4)]
    assert got == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    contiguous = [ringsim.shard(x, r, 4)[0].tolist() for r in range(4)]
    assert contiguous == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_is_a_copy(layout):
    """A contiguous slice is a view; a rank writing into it would change the global array."""
    for x in (np.zeros((1, 8, 1, 1)), torch.zeros(1, 8, 1, 1)):
        ringsim.shard(x, 0, 2, layout=layout)[:] = 1
        assert not x.any()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: check_layout("zig-zag"), ValueError, "layout: expected one of"),
        (lambda: check_layout(2), TypeError, "layout: expected one of"),
        (lambda: check_layout("zigzag", 12, 4), ValueError, r"seq_len: .* seq_len % 8"),
        (lambda: ringsim.shard(np.zeros((1, 8)), 2, 2), ValueError, "rank: expected 0 <= rank"),
        (lambda: ringsim.unshard([]), ValueError, "shards: expected one shard per rank"),
    ],
)
def test_bad_layout_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_every_ring_entry_point_refuses_a_zigzag_that_does_not_cut():
    q = np.zeros((1, 12, 2, 2))
    with pytest.raises(ValueError, match="seq_len % 8"):
        ringsim.reference.ring_dilated_attention(q, q, q, (12,), (1,), world_size=4,
                                                 layout="zigzag")  # fmt: skip
    with pytest.raises(ValueError, match="layout: expected one of"):
        ringsim.reference.ring_dilated_attention(q, q, q, (12,), (1,), world_size=4,
                                                 layout="diagonal")  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_chunk_owner_inverts_rank_chunks(layout, world_size):
    """The plan finds sub-rings and the parity report finds a row's rank by chunk_owner; the
    shards are cut by rank_chunks: they must say the same (pitfall 19)."""
    n = 12 * world_size
    s = chunk_length(layout, n, world_size)
    held = {
        chunk.start // s: rank
        for rank in range(world_size)
        for chunk in rank_chunks(layout, rank, n, world_size)
        if len(chunk) == s
    }
    assert sorted(held) == list(range(n // s))  # every chunk, each of length s, once
    assert all(chunk_owner(layout, i, world_size) == r for i, r in held.items())


def test_local_rows_map_each_chunk_to_its_place_in_the_shard():
    chunks = rank_chunks("zigzag", 1, 16, 4)  # positions 2-3 and 12-13
    assert chunks == (range(2, 4), range(12, 14))
    assert local_rows(chunks, range(2, 4)) == range(0, 2)
    assert local_rows(chunks, range(12, 14)) == range(2, 4)
    assert local_rows(chunks, range(13, 14)) == range(3, 4)
    with pytest.raises(ValueError, match="inside one chunk"):
        local_rows(chunks, range(3, 13))


@pytest.mark.parametrize(
    ("start", "stop", "ranks"),
    [
        (0, 16, (0, 1, 2, 3)),  # the whole sequence: every rank, in rank order
        (0, 8, (0, 1, 2, 3)),  # the first half: early chunks
        (8, 16, (3, 2, 1, 0)),  # the second half: by first position held
        (4, 12, (2, 3)),  # across the middle: two ranks, two pieces each
        (6, 10, (3,)),  # chunks 3 and 4: both rank 3's
        (1, 3, (0, 1)),  # a ragged segment across a chunk boundary
    ],
)
def test_zigzag_subring_ranks_table(start, stop, ranks):
    assert subring_ranks(start, stop, 16, 4, "zigzag") == ranks


def test_zigzag_plan_table_for_one_segment_over_every_rank():
    """P = 2, n = 8, w = 8, causal: rank 0 holds 0-1 and 6-7, rank 1 holds 2-3 and 4-5."""
    config = make_config((8,), (1,), is_causal=True)
    plans = ring_plan(config, 1, 8, 2, "zigzag")
    own = [(t.q_piece, t.k_piece, t.actions[0].value) for t in plans[0].steps[0].tasks]
    assert own == [(0, 0, "causal"), (0, 1, "skip"), (1, 0, "full"), (1, 1, "causal")]
    # step 1: rank 0 gets rank 1's block (2-3, 4-5): its late queries 6-7 see both pieces
    got = [(t.q_piece, t.k_piece, t.actions[0].value) for t in plans[0].steps[1].tasks]
    assert got == [(0, 0, "skip"), (0, 1, "skip"), (1, 0, "full"), (1, 1, "full")]
    # rank 0's block: its early piece (0-1) is useful to rank 1, its late piece (6-7) is not
    (sent,) = plans[0].steps[1].sends
    assert sent.rows == (range(0, 2), range(6, 6))
    (recv,) = plans[0].steps[1].recvs
    assert recv.rows == (range(2, 4), range(4, 6))
    assert [s.ranks for s in rank_subrings(config, 8, 2, 0, "zigzag")] == [(0, 1)]


def test_wrong_rows_are_blamed_on_the_rank_that_holds_them():
    """Rank 1 holds rows 4-11 of 16 in the zigzag layout at P = 2; a message rank 0 sends
    corrupted spoils them, and the report names rank 1 for all of them."""
    from ringsim.comm import Fault, FaultKind
    from ringsim.reference.parity import check_case

    case = Case(1, 16, 2, 4, (16,), (1,), True, "longnet", 2, layout="zigzag")
    q, k, v = case.inputs()
    out, lse = ringsim.reference.ring_dilated_attention(
        q, k, v, (16,), (1,), world_size=2, is_causal=True, layout="zigzag", return_lse=True,
        faults=[Fault(FaultKind.CORRUPT, 0, 0)],
    )  # fmt: skip
    report = check_case(case, out, lse, q, k, v)
    assert report.bad_rows == {1: tuple(range(4, 12))}, report.line()


def _work(case: Case) -> list[int]:
    *_, trace = run_case(case, *case.inputs())
    return [trace.work(r) for r in range(case.world_size)]


@pytest.mark.parametrize("world_size", [2, 3, 4, 5, 8])
@pytest.mark.parametrize(
    "segments",
    [("n",), ("n/2", "n"), ("n/4", "n/2", "n")],
    ids=["plain", "longnet-2", "longnet-3"],
)
def test_zigzag_balances_causal_work(world_size, segments):
    """spec §5's target: every rank's causal work within 10% of the mean, for plain ring
    attention and LongNet configurations whose longest segment spans every rank; the
    contiguous layout is measured to be less balanced on the same cases."""
    n = 16 * world_size
    sizes = {"n": n, "n/2": n // 2, "n/4": n // 4}
    segs = tuple(sizes[s] for s in segments)
    rates = tuple(2**i for i in range(len(segs)))
    balanced = _work(Case(1, n, 4, 2, segs, rates, True, "longnet", world_size, layout="zigzag"))
    mean = np.mean(balanced)
    assert max(abs(w - mean) for w in balanced) <= 0.1 * mean, balanced
    skewed = _work(Case(1, n, 4, 2, segs, rates, True, "longnet", world_size))
    assert sum(skewed) == sum(balanced)  # the same scores, spread differently
    assert max(skewed) > max(balanced), skewed


def test_work_counts_every_score_once():
    """Non-causal, one segment: every rank scores its c queries against all n keys, per head."""
    case = Case(1, 12, 3, 2, (12,), (1,), False, "longnet", 3, layout="zigzag")
    assert _work(case) == [4 * 12 * 3] * 3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("segs", "rates", "n", "p", "heads", "mode"), ZIGZAG_ALIGNED)
def test_zigzag_trace_bytes_equal_closed_form(segs, rates, n, p, heads, mode, causal):
    case = Case(2, n, heads, 3, segs, rates, causal, mode, p, layout="zigzag")
    *_, trace = run_case(case, *case.inputs())
    config = make_config(segs, rates, is_causal=causal, mode=mode)
    for rank in range(p):
        want = closed_form_bytes(config, heads, 2, 3, n, p, rank, layout="zigzag")
        assert trace.sent_bytes(rank) == want, rank
