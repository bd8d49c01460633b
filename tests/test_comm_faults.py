"""Faults injected into the simulated cluster: a dropped message, a crashed rank, corrupted
values and a delay, each ending as the failure mode says (fast, naming the ranks)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from comm_support import assert_same, random_payloads, ring_once

from ringsim.comm import (
    CommTimeout,
    DeadlockError,
    Fault,
    FaultKind,
    RankCrashed,
    RankFailed,
    SimulatedCluster,
)


@pytest.mark.parametrize("message", [0, 1])
def test_fault_drop_ends_fast_naming_the_receiver(message: int) -> None:
    payloads = random_payloads(10, 3, 2)
    began = time.monotonic()
    with pytest.raises(RankFailed) as info:
        SimulatedCluster(3, timeout=2).run(
            ring_once(payloads, 2), faults=[Fault(FaultKind.DROP, rank=1, message=message)]
        )
    assert time.monotonic() - began < 4
    error = info.value.error
    assert isinstance(error, (DeadlockError, CommTimeout))
    assert f"rank 2 waits for recv from rank 1 tag {message}" in str(error)


def test_fault_crash_names_the_rank() -> None:
    payloads = random_payloads(11, 4, 2)
    with pytest.raises(RankFailed) as info:
        SimulatedCluster(4, timeout=5).run(
            ring_once(payloads, 2), faults=[Fault(FaultKind.CRASH, rank=3, message=1)]
        )
    assert info.value.rank == 3 and isinstance(info.value.error, RankCrashed)
    assert "injected crash on rank 3 at message 1" in str(info.value)


def test_fault_corrupt_delivers_wrong_values() -> None:
    payloads = random_payloads(12, 3, 2)
    results = SimulatedCluster(3, timeout=5).run(
        ring_once(payloads, 2), faults=[Fault(FaultKind.CORRUPT, rank=0, message=1)]
    )
    for rank, got in enumerate(results):
        source = (rank - 1) % 3
        for step in range(2):
            if (source, step) == (0, 1):
                for g, w in zip(got[step], payloads[0][1], strict=True):
                    assert np.all(np.isfinite(g))
                    np.testing.assert_array_equal(g, w + 1.0)
            else:
                assert_same(got[step], payloads[source][step])


def test_fault_delay_keeps_results_correct() -> None:
    payloads = random_payloads(13, 3, 2)
    delay = 0.3
    began = time.monotonic()
    results = SimulatedCluster(3, timeout=5).run(
        ring_once(payloads, 2), faults=[Fault(FaultKind.DELAY, rank=2, delay=delay)]
    )
    assert time.monotonic() - began >= delay
    for rank, got in enumerate(results):
        source = (rank - 1) % 3
        for step in range(2):
            assert_same(got[step], payloads[source][step])


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match=r"^message: must be >= 0"):
        Fault(FaultKind.DROP, rank=0, message=-1)
    with pytest.raises(ValueError, match=r"^faults: .* past world_size 2"):
        SimulatedCluster(2).run(lambda comm: None, faults=[Fault(FaultKind.DROP, rank=2)])
    for rank in ("0", 0.5, True):
        with pytest.raises(TypeError, match=r"^rank: expected an int"):
            Fault(FaultKind.DROP, rank=rank)
    with pytest.raises(TypeError, match=r"^delay: expected a number"):
        Fault(FaultKind.DELAY, rank=0, delay="1")


@pytest.mark.parametrize("faults", [None, "drop", 3, Fault(FaultKind.DROP, rank=0), [None]])
def test_faults_that_are_not_a_sequence_of_fault_name_the_argument(faults) -> None:
    with pytest.raises(TypeError, match=r"^faults: expected"):
        SimulatedCluster(2).run(lambda comm: None, faults=faults)


def test_faults_as_a_generator_are_read_once_and_fire() -> None:
    """A generator was used up by the type check, and no fault fired."""
    payloads = random_payloads(13, 2, 1)
    faults = (f for f in [Fault(FaultKind.CORRUPT, rank=0, message=0)])
    results = SimulatedCluster(2, timeout=5).run(ring_once(payloads, 1), faults=faults)
    assert not np.array_equal(results[1][0][0], payloads[0][0][0])


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 1e12])
def test_timeouts_out_of_range_are_refused(timeout) -> None:
    with pytest.raises(ValueError, match=r"^timeout: must be a number of seconds in \(0, "):
        SimulatedCluster(2, timeout=timeout)


@pytest.mark.parametrize("timeout", ["5", True, None])
def test_timeouts_of_another_type_are_refused(timeout) -> None:
    with pytest.raises(TypeError, match=r"^timeout: expected a number of seconds"):
        SimulatedCluster(2, timeout=timeout)
