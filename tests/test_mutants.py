"""Every mutant in ``mutants.py`` must make the parity check fail (docs/pitfalls.md: a check that no
mutant can fail verifies nothing), and the unmutated reference must pass it."""

from __future__ import annotations

import numpy as np
import pytest

import ringsim.reference
from ringsim.cases import PARITY_CASES, Case
from ringsim.config import make_config
from ringsim.conformance.mutants import BACKWARD_MUTANTS, MUTANTS
from ringsim.reference import dense_dilated_attention
from ringsim.reference.dense import masked_attention, pattern_mask
from ringsim.reference.parity import function_failures


def _case(label: str) -> Case:
    (case,) = [c for c in PARITY_CASES if c.label == label]
    return case


def _args(case: Case) -> tuple:
    """q, k, v ``(b, n, h, d)`` of the case, then its segment lengths and dilation rates."""
    return (*case.inputs(), case.segment_lengths, case.dilation_rates)


def test_baseline_passes() -> None:
    failures = function_failures(ringsim.reference.dilated_attention, PARITY_CASES)
    assert failures == [], "\n".join(failures)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_killed(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    MUTANTS[name].apply(monkeypatch)
    failures = function_failures(ringsim.reference.dilated_attention, PARITY_CASES)
    assert failures, f"mutant {name!r} ({MUTANTS[name].description}) survived every case"


def test_catalogue_covers_pitfalls() -> None:
    """The forward mutants here; the backward ones (pitfall 14) are killed by the gradient
    oracles in test_backward_reference.py."""
    everything = {**MUTANTS, **BACKWARD_MUTANTS}
    assert len(everything) == len(MUTANTS) + len(BACKWARD_MUTANTS)  # no name in both
    assert {2, 3, 4, 5, 6, 7, 8, 14} <= {m.pitfall for m in everything.values()}
    assert all(m.description for m in everything.values())


def test_naive_merge_killed_by_overflow_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The high-dynamic-range case has no empty row, so only overflow can kill the naive
    merge there: the stable merge passes it and the naive one fails it."""
    case = _case("high dynamic range")
    _, lse = dense_dilated_attention(*_args(case), **case.kwargs())
    assert np.isfinite(lse).all() and lse.max() > 709  # exp(lse) overflows float64
    assert function_failures(ringsim.reference.dilated_attention, [case]) == []
    MUTANTS["naive_merge"].apply(monkeypatch)
    assert function_failures(ringsim.reference.dilated_attention, [case])


def test_high_dynamic_range_case_has_large_lse_gaps() -> None:
    """Some row's patterns differ in lse by more than 1e3 (so exp of the gap underflows)."""
    case = _case("high dynamic range")
    q, k, v = case.inputs()
    config = make_config(case.segment_lengths, case.dilation_rates, **case.kwargs())
    largest_gap = 0.0
    with np.errstate(invalid="ignore"):
        for head, patterns in enumerate(config.head_patterns(case.num_heads)):
            lses = np.stack(
                [
                    masked_attention(
                        q[:, :, head],
                        k[:, :, head],
                        v[:, :, head],
                        pattern_mask(p, case.seq_len),
                        config.scale(case.head_dim),
                    )[1]
                    for p in patterns
                ]
            )
            largest_gap = max(largest_gap, float(np.ptp(lses, axis=0).max()))
    assert largest_gap > 1e3


def test_parity_cases_cover_the_brief() -> None:
    """The fixed cases cover what the mutants need: causal and not, both modes, r > 1,
    r not dividing w, r > w with rows no pattern gives a key, ragged segments, w > n,
    several pairs, batch 2."""
    cases = PARITY_CASES
    pairs = [(w, r, c) for c in cases for w, r in zip(c.segment_lengths, c.dilation_rates)]
    assert {c.is_causal for c in cases} == {False, True}
    assert {c.mode for c in cases} == {"longnet", "grouped"}
    assert any(r > 1 and r < min(w, c.seq_len) and min(w, c.seq_len) % r for w, r, c in pairs)
    assert any(r > min(w, c.seq_len) for w, r, c in pairs)
    assert any(c.seq_len % min(w, c.seq_len) for w, _, c in pairs)  # ragged last segment
    assert any(w > c.seq_len for w, _, c in pairs)
    assert any(len(c.segment_lengths) >= 3 for c in cases)
    assert any(c.batch == 2 for c in cases)
    empty_rows = 0
    for case in cases:
        _, lse = dense_dilated_attention(*_args(case), **case.kwargs())
        empty_rows += int(np.isneginf(lse).sum())
    assert empty_rows > 0
