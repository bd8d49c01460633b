"""The simulated ring against the dense-mask definition, its trace, memory and failures."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ring_support import WORLD_SIZES, byte_failures, ring_cases, ring_failures, run_ring

from ringsim.cases import Case, fixed_cases, random_case
from ringsim.comm import CommError, Fault, FaultKind
from ringsim.reference import dilated_attention, ring_dilated_attention
from ringsim.reference.parity import check_case
from ringsim.trace import TraceAction


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_matches_definition(world_size, dtype, layout):
    failures = ring_failures(ring_cases([world_size], per_size=10, layout=layout), dtype=dtype)
    assert not failures, "\n".join(failures)


@given(
    seed=st.integers(0, 2**32 - 1),
    world_size=st.sampled_from(WORLD_SIZES),
    layout=st.sampled_from(["contiguous", "zigzag"]),
)
def test_ring_matches_definition_random(seed, world_size, layout):
    case = random_case(np.random.default_rng(seed), world_size, layout=layout)
    failures = ring_failures([case])
    assert not failures, "\n".join(failures)


def test_ring_equals_single_process_reference():
    case = Case(2, 30, 5, 4, (7, 13, 30), (2, 3, 4), True, "longnet", 5)
    q, k, v = case.inputs(seed=11)
    out, lse, _ = run_ring(case, q, k, v)
    ref_out, ref_lse = dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs(), return_lse=True
    )
    np.testing.assert_allclose(out, ref_out, atol=1e-12, rtol=0)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))


def test_global_entry_point_returns_out_lse_trace():
    case = Case(1, 24, 3, 4, (8, 24), (1, 3), True, "longnet", 4)
    q, k, v = case.inputs(seed=2)
    out = ring_dilated_attention(q, k, v, (8, 24), (1, 3), world_size=4, is_causal=True)
    out2, lse, trace = ring_dilated_attention(
        q, k, v, (8, 24), (1, 3), world_size=4, is_causal=True, return_lse=True, return_trace=True
    )
    assert out.shape == q.shape and lse.shape == (1, 3, 24) and trace.world_size == 4
    np.testing.assert_array_equal(out, out2)
    assert check_case(case, out, lse, q, k, v).ok


def test_trace_bytes_equal_closed_form():
    """spec §5: on aligned configurations, causal and not, each rank's bytes are exact."""
    failures = byte_failures()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", ring_cases(per_size=4), ids=lambda c: c.describe())
def test_no_rank_receives_rows_nobody_further_attends(case):
    q, k, v = case.inputs(seed=1)
    *_, trace = run_ring(case, q, k, v)
    computed = trace.select(TraceAction.COMPUTE)
    for recv in trace.select(TraceAction.RECV):
        users = [
            e
            for e in computed
            if e.subring == recv.subring
            and e.source_rank == recv.source_rank
            and e.step >= recv.step
        ]
        assert users, f"rank {recv.rank} received a block nobody attends: {recv}"
        for rows in recv.rows:
            assert len(rows) == 0 or users


def test_trace_records_every_step_and_skip():
    case = Case(1, 16, 2, 4, (16,), (2,), True, "longnet", 4)
    q, k, v = case.inputs(seed=0)
    *_, trace = run_ring(case, q, k, v)
    assert trace.num_steps == 4
    skips = trace.select(TraceAction.SKIP)
    # causal: at step t, ranks 0..t-1 hold no useful block (4*3/2 = 6 skipped blocks)
    assert sorted((e.step, e.rank) for e in skips) == [
        (1, 0),
        (2, 0),
        (2, 1),
        (3, 0),
        (3, 1),
        (3, 2),
    ]
    assert len(trace.select(TraceAction.COMPUTE)) == len(trace.select(TraceAction.MERGE)) == 10
    assert "step" in trace.table() and "bytes sent" in trace.table()


def test_peak_bytes_halve_when_world_size_doubles():
    peaks = {}
    for p in (2, 4, 8):
        case = Case(1, 64, 4, 8, (64, 64), (1, 4), False, "longnet", p)  # g = P for both
        q, k, v = case.inputs(seed=3)
        *_, trace = run_ring(case, q, k, v)
        peaks[p] = max(trace.peak_bytes)
    assert peaks[4] <= 0.55 * peaks[2] and peaks[8] <= 0.55 * peaks[4], peaks


# --- failures: each ends quickly with one clear error, never a hang ---------------------

CASE = Case(1, 24, 3, 4, (24,), (2,), False, "longnet", 3)


def run_with_faults(faults, timeout=3.0):
    q, k, v = CASE.inputs(seed=4)
    return ring_dilated_attention(
        q,
        k,
        v,
        CASE.segment_lengths,
        CASE.dilation_rates,
        world_size=3,
        return_lse=True,
        faults=faults,
        timeout=timeout,
    )


def test_dropped_message_fails_fast_naming_the_waiting_rank():
    start = time.monotonic()
    with pytest.raises(CommError, match="rank 2") as info:
        run_with_faults([Fault(FaultKind.DROP, rank=1, message=0)])
    assert time.monotonic() - start < 10.0  # deadlock detection or the 3 s timeout
    assert "from rank 1" in str(info.value) or "source 1" in str(info.value)


def test_crashed_rank_fails_everyone_naming_it():
    with pytest.raises(CommError, match="rank 0") as info:
        run_with_faults([Fault(FaultKind.CRASH, rank=0, message=1)])
    assert "crash" in str(info.value)


def test_corrupted_message_is_reported_with_rank_and_rows():
    q, k, v = CASE.inputs(seed=4)
    out, lse = run_with_faults([Fault(FaultKind.CORRUPT, rank=0, message=0)])
    report = check_case(CASE, out, lse, q, k, v)
    assert not report.ok
    # rank 0's first message carries its block to rank 1, which forwards it to rank 2:
    # their rows are wrong, rank 0's own rows are not
    assert set(report.bad_rows) == {1, 2}
    assert report.bad_rows[1] == tuple(range(8, 16))
    assert "rank 1 rows 8-15" in report.line()


def test_delayed_message_still_correct():
    q, k, v = CASE.inputs(seed=4)
    out, lse = run_with_faults([Fault(FaultKind.DELAY, rank=2, message=0, delay=0.2)])
    assert check_case(CASE, out, lse, q, k, v).ok


def test_ranks_that_disagree_fail_together():
    from ringsim.comm import SimulatedCluster
    from ringsim.reference import ring_dilated_attention_shard

    q, k, v = CASE.inputs(seed=4)

    def rank_main(comm):
        segs = (12,) if comm.rank == 1 else (24,)
        lo = comm.rank * 8
        return ring_dilated_attention_shard(
            q[:, lo : lo + 8], k[:, lo : lo + 8], v[:, lo : lo + 8], segs, (2,), comm=comm
        )

    with pytest.raises(CommError, match="disagree"):
        SimulatedCluster(3, timeout=5.0).run(rank_main)


def test_one_rank_with_bad_input_fails_every_rank_with_its_error():
    from ringsim.comm import SimulatedCluster
    from ringsim.reference import ring_dilated_attention_shard

    q, k, v = CASE.inputs(seed=4)

    def rank_main(comm):
        rates = (0,) if comm.rank == 2 else (2,)
        lo = comm.rank * 8
        return ring_dilated_attention_shard(
            q[:, lo : lo + 8], k[:, lo : lo + 8], v[:, lo : lo + 8], (24,), rates, comm=comm
        )

    with pytest.raises(CommError, match="dilation_rates"):
        SimulatedCluster(3, timeout=5.0).run(rank_main)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(world_size=5), ValueError, "world_size"),
        (dict(world_size=0), ValueError, "world_size"),
        (dict(world_size=2.0), TypeError, "world_size"),
        (dict(world_size=3, mode="dense"), ValueError, "mode"),
        (dict(world_size=3, softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ],
)
def test_bad_input_raises_before_any_rank_starts(kwargs, error, match):
    q, k, v = CASE.inputs(seed=4)
    with pytest.raises(error, match=match):
        ring_dilated_attention(q, k, v, (24,), (2,), **kwargs)


def test_nan_input_propagates_without_hanging():
    q, k, v = CASE.inputs(seed=4)
    k[0, 5, 1, 0] = np.nan  # a key of rank 0, head 1 (offset 1: position 5 is selected)
    out, lse = ring_dilated_attention(q, k, v, (24,), (2,), world_size=3, return_lse=True)
    assert np.isnan(lse[0, 1, 1::2]).all()
    assert np.isnan(out[0, 1::2, 1]).all()  # every query of head 1's pattern sees the key
    assert not np.isnan(out[0, :, 0]).any() and not np.isnan(out[0, :, 2]).any()


def test_simulated_ring_needs_neither_torch_nor_mpi():
    """pitfall 15: P > 1 on the simulated cluster, in a process that never imports either."""
    code = (
        "import sys, numpy as np\n"
        "from ringsim.reference import ring_dilated_attention\n"
        "x = np.random.default_rng(0).standard_normal((1, 24, 2, 4))\n"
        "out, tr = ring_dilated_attention(x, x, x, (24,), (2,), world_size=4,"
        " return_trace=True)\n"
        "assert tr.world_size == 4 and sum(map(tr.sent_bytes, range(4))) > 0\n"
        "bad = [m for m in ('torch', 'mpi4py') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_trace_refuses_a_rank_it_does_not_have():
    """sent_bytes(7) of a 4-rank run read 0, as if rank 7 had sent nothing."""
    case = fixed_cases(4)[1]
    _, _, trace = run_ring(case, *case.inputs())
    for call in (trace.sent_bytes, trace.work, lambda r: trace.select("send", r)):
        with pytest.raises(ValueError, match=r"rank: the trace has ranks 0\.\.3, got 7"):
            call(7)
    assert trace.sent_bytes(np.int64(1)) == trace.sent_bytes(1)
