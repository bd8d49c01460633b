"""Each ring mutant (pitfalls 1, 5, 9, 10, 12, 15, 19) fails the ring suite; the ring passes
it."""

from __future__ import annotations

import pytest
from ring_support import ring_suite_failures

from ringsim.conformance.ring_mutants import RING_MUTANTS


def test_ring_suite_passes_without_mutants():
    assert ring_suite_failures() == []


@pytest.mark.parametrize("name", sorted(RING_MUTANTS))
def test_ring_mutant_is_killed(name, monkeypatch):
    RING_MUTANTS[name].apply(monkeypatch)
    assert ring_suite_failures(), f"mutant {name} survived the ring suite"


def test_ring_catalogue_covers_the_issue():
    assert {m.pitfall for m in RING_MUTANTS.values()} == {1, 5, 9, 10, 12, 15, 19}
