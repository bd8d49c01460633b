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
    with pytest.raises(ValueError, match="message must be >= 0"):
        Fault(FaultKind.DROP, rank=0, message=-1)
    with pytest.raises(ValueError, match="world_size"):
        SimulatedCluster(2).run(lambda comm: None, faults=[Fault(FaultKind.DROP, rank=2)])
