"""The simulated cluster: exchanges, copies, errors, deadlock and timeout (injected faults:
``test_comm_faults.py``)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from comm_support import assert_same, random_payloads, recv_for

from ringsim.comm import (
    ChecksummedCommunicator,
    ClusterAborted,
    CommError,
    CommTimeout,
    Communicator,
    DeadlockError,
    Payload,
    RankFailed,
    Recv,
    Send,
    SimulatedCluster,
)

WORLD_SIZES = (1, 2, 3, 4, 8)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ring_exchange_both_directions(world_size: int, dtype) -> None:
    steps = 3
    payloads = random_payloads(world_size * 10 + steps, world_size, 2 * steps, dtype)

    def fn(comm: Communicator) -> list[Payload]:
        rank, p = comm.rank, comm.world_size
        right, left = (rank + 1) % p, (rank - 1) % p
        got = []
        for step in range(steps):
            mine_r, mine_l = payloads[rank][2 * step], payloads[rank][2 * step + 1]
            sends = [Send(right, 2 * step, mine_r), Send(left, 2 * step + 1, mine_l)]
            recvs = [
                recv_for(left, 2 * step, payloads[left][2 * step]),
                recv_for(right, 2 * step + 1, payloads[right][2 * step + 1]),
            ]
            # Alternate the overlapped form and the blocking one.
            got += comm.start(sends, recvs).wait() if step % 2 else comm.exchange(sends, recvs)
        return got

    results = SimulatedCluster(world_size, timeout=10).run(fn)
    assert len(results) == world_size
    for rank, got in enumerate(results):
        left, right = (rank - 1) % world_size, (rank + 1) % world_size
        for step in range(steps):
            assert_same(got[2 * step], payloads[left][2 * step])
            assert_same(got[2 * step + 1], payloads[right][2 * step + 1])


def test_results_in_rank_order() -> None:
    rng = np.random.default_rng(1)
    values = rng.standard_normal(5)
    assert SimulatedCluster(5).run(lambda comm: values[comm.rank]) == list(values)


def test_send_copies_payload() -> None:
    (payload,) = random_payloads(2, 1, 1)[0]
    original = tuple(a.copy() for a in payload)

    def fn(comm: Communicator) -> Payload | None:
        if comm.rank == 0:
            request = comm.start([Send(1, 0, payload)], [])
            for a in payload:
                a += 100.0  # after posting: must not change what rank 1 gets
            request.wait()
            comm.allgather("mutated")
            return None
        (got,) = comm.exchange([], [recv_for(0, 0, original)])
        comm.allgather("checked after the sender's mutation")
        return got

    got = SimulatedCluster(2, timeout=10).run(fn)[1]
    assert_same(got, original)


def test_fifo_and_matching_in_posting_order() -> None:
    """Messages with one (source, dest, tag) arrive in order, to receives in posting order."""
    first, second = random_payloads(3, 1, 2)[0]

    def fn(comm: Communicator) -> tuple[Payload, Payload] | None:
        if comm.rank == 0:
            comm.exchange([Send(1, 7, first), Send(1, 7, second)], [])
            return None
        early = comm.start([], [recv_for(0, 7, first)])
        late = comm.start([], [recv_for(0, 7, second)])
        (b,) = late.wait()  # waited first, but posted second
        (a,) = early.wait()
        return a, b

    a, b = SimulatedCluster(2, timeout=10).run(fn)[1]
    assert_same(a, first)
    assert_same(b, second)


@pytest.mark.parametrize(
    "shapes, dtype, what",
    [(((4, 3), (2, 5)), np.float64, "shapes"), (((3, 4), (2, 5)), np.float32, "float32")],
)
def test_mismatched_receive_names_ranks_tag_and_shapes(shapes, dtype, what) -> None:
    rng = np.random.default_rng(4)
    payload = (rng.standard_normal((3, 4)), rng.standard_normal((2, 5)))

    def fn(comm: Communicator) -> None:
        if comm.rank == 0:
            comm.exchange([Send(1, 9, payload)], [])
        else:
            comm.exchange([], [Recv(0, 9, shapes, np.dtype(dtype))])

    with pytest.raises(RankFailed) as info:
        SimulatedCluster(2, timeout=10).run(fn)
    error = info.value.error
    assert type(error) is CommError and info.value.rank == 1
    text = str(error)
    assert "rank 1 received from rank 0 tag 9" in text
    assert "(3, 4)" in text and what in text
    assert f"expected 2 arrays of {np.dtype(dtype)}" in text


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_allgather_returns_independent_copies(world_size: int) -> None:
    rng = np.random.default_rng(world_size)
    objects = [{"rank": r, "data": rng.standard_normal(3)} for r in range(world_size)]

    def fn(comm: Communicator) -> list[object]:
        first = comm.allgather(objects[comm.rank])
        second = comm.allgather(comm.rank * 2)
        assert second == [2 * r for r in range(comm.world_size)]
        return first

    results = SimulatedCluster(world_size, timeout=10).run(fn)
    for gathered in results:
        for r, obj in enumerate(gathered):
            assert obj["rank"] == r
            np.testing.assert_array_equal(obj["data"], objects[r]["data"])
            assert not np.shares_memory(obj["data"], objects[r]["data"])
    if world_size > 1:
        assert not np.shares_memory(results[0][0]["data"], results[1][0]["data"])


def test_deadlock_diagnostic_names_waiters_sources_and_finished() -> None:
    """Ranks 0-2 each wait for the next one; rank 3 returns at once."""
    like = random_payloads(5, 1, 1)[0][0]

    def fn(comm: Communicator) -> None:
        if comm.rank < 3:
            comm.exchange([], [recv_for((comm.rank + 1) % 3, 40 + comm.rank, like)])

    began = time.monotonic()
    with pytest.raises(RankFailed) as info:
        SimulatedCluster(4, timeout=20).run(fn)
    assert time.monotonic() - began < 5  # detected, not timed out
    assert isinstance(info.value.error, DeadlockError)
    assert info.value.__cause__ is info.value.error
    text = str(info.value.error)
    for rank in range(3):
        assert f"rank {rank} waits for recv from rank {(rank + 1) % 3} tag {40 + rank}" in text
    assert "finished: ranks [3]" in text
    # Every blocked rank got the same DeadlockError message.
    failures = info.value.failures
    assert sorted(r for r, _ in failures) == [0, 1, 2]
    assert all(isinstance(e, DeadlockError) and str(e) == text for _, e in failures)


def test_deadlock_in_allgather_names_missing_rank() -> None:
    def fn(comm: Communicator) -> None:
        if comm.rank != 1:
            comm.allgather(comm.rank)

    with pytest.raises(RankFailed) as info:
        SimulatedCluster(3, timeout=20).run(fn)
    assert isinstance(info.value.error, DeadlockError)
    assert "waits in allgather #0 for ranks [1]" in str(info.value.error)


def test_wait_times_out_naming_rank_source_and_tag() -> None:
    like = random_payloads(6, 1, 1)[0][0]

    def fn(comm: Communicator) -> None:
        if comm.rank == 0:
            comm.exchange([], [recv_for(1, 3, like)])
        else:
            time.sleep(0.6)  # busy, not blocked: no deadlock, so only the timeout can fire

    began = time.monotonic()
    with pytest.raises(RankFailed) as info:
        SimulatedCluster(2, timeout=0.2).run(fn)
    assert time.monotonic() - began < 3
    assert isinstance(info.value.error, CommTimeout)
    assert "rank 0 timed out" in str(info.value.error)
    assert "recv from rank 1 tag 3" in str(info.value.error)


def test_rank_error_aborts_others_and_is_chained() -> None:
    like = random_payloads(7, 1, 1)[0][0]

    def fn(comm: Communicator) -> None:
        if comm.rank == 2:
            time.sleep(0.05)  # let the others block first
            raise ValueError("bad input on purpose")
        comm.exchange([], [recv_for(2, 0, like)])

    began = time.monotonic()
    with pytest.raises(RankFailed) as info:
        SimulatedCluster(4, timeout=20).run(fn)
    assert time.monotonic() - began < 5  # woken, not timed out
    failed = info.value
    assert failed.rank == 2 and isinstance(failed.error, ValueError)
    assert failed.__cause__ is failed.error
    assert str(failed).startswith("rank 2 failed: ValueError: bad input on purpose")
    secondary = {r: e for r, e in failed.failures if r != 2}
    assert sorted(secondary) == [0, 1, 3]
    assert all(isinstance(e, ClusterAborted) for e in secondary.values())


def test_invalid_send_is_rejected() -> None:
    payload = random_payloads(8, 1, 1)[0][0]

    def fn(comm: Communicator) -> None:
        comm.exchange([Send(comm.world_size, 0, payload)], [])

    with pytest.raises(RankFailed) as info:
        SimulatedCluster(2, timeout=10).run(fn)
    assert isinstance(info.value.error, ValueError)
    assert "dest must be a rank in [0, 2)" in str(info.value.error)


def test_undelivered_message_is_an_error() -> None:
    payload = random_payloads(9, 1, 1)[0][0]

    def fn(comm: Communicator) -> None:
        if comm.rank == 0:
            comm.exchange([Send(1, 5, payload)], [])

    with pytest.raises(CommError, match=r"\(\(0, 1, 5\), 1\)"):
        SimulatedCluster(2, timeout=10).run(fn)


def test_importing_ringsim_comm_does_not_import_mpi4py() -> None:
    code = (
        "import sys, ringsim, ringsim.comm, ringsim.launch, ringsim.checks; "
        "assert 'mpi4py' not in sys.modules, 'mpi4py imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_wait_times_out_only_when_the_whole_cluster_stalls() -> None:
    """Rank 0 waits 1.2 s for rank 2, longer than the 0.5 s timeout, while ranks 1 and 2 keep
    exchanging messages every 0.1 s: the cluster is making progress, so rank 0 does not time
    out (a long run of many ranks must not time out on its own); a stall still does."""
    payload = random_payloads(20, 1, 1)[0][0]

    def fn(comm: Communicator) -> int:
        if comm.rank == 0:
            return len(comm.exchange([], [recv_for(2, 99, payload)]))
        peer = 3 - comm.rank  # ranks 1 and 2 talk to each other
        for step in range(12):
            time.sleep(0.1)
            comm.exchange([Send(peer, step, payload)], [recv_for(peer, step, payload)])
        if comm.rank == 2:
            comm.exchange([Send(0, 99, payload)], [])
        return 0

    assert SimulatedCluster(3, timeout=0.5).run(fn) == [1, 0, 0]


@pytest.mark.parametrize("checked", [False, True], ids=["plain", "checksummed"])
def test_a_receive_lands_in_the_arrays_it_names(checked: bool) -> None:
    """``Recv.into``: the payload is written into the receiver's arrays and returned as them
    (the memory pool's buffers), through the checksum wrapper too."""
    payloads = random_payloads(10, 2, 1)

    def fn(comm: Communicator) -> bool:
        comm = ChecksummedCommunicator(comm) if checked else comm
        source = (comm.rank - 1) % 2
        like = payloads[source][0]
        into = tuple(np.full_like(a, np.nan) for a in like)
        recv = replace(recv_for(source, 0, like), into=into)
        (got,) = comm.exchange([Send((comm.rank + 1) % 2, 0, payloads[comm.rank][0])], [recv])
        assert_same(got, like)
        return all(g is t for g, t in zip(got, into, strict=True))

    assert SimulatedCluster(2, timeout=10).run(fn) == [True, True]


@pytest.mark.parametrize(
    "into, error",
    [
        ([np.zeros(3)], "into must be a tuple of 1 arrays of float64, shapes \\[\\(3,\\)\\]"),
        ((np.zeros(4),), "into must be a tuple of 1 arrays of float64"),
        ((np.zeros(3, np.float32),), "got \\[\\(\\(3,\\), 'float32'\\)\\]"),
        ((np.zeros(6)[::2],), "into arrays must be contiguous"),
    ],
    ids=["not-a-tuple", "shape", "dtype", "strided"],
)
def test_a_receive_into_arrays_that_do_not_fit_is_rejected(into, error: str) -> None:
    def fn(comm: Communicator) -> None:
        comm.exchange([], [Recv(0, 0, ((3,),), np.dtype(np.float64), into=into)])

    with pytest.raises(RankFailed) as info:
        SimulatedCluster(1, timeout=10).run(fn)
    assert "recvs[0] (source 0, tag 0)" in str(info.value.error)
    assert re.search(error, str(info.value.error))
