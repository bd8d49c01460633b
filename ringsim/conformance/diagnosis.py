"""Which known wrong variant of the definition a failing output equals.

For every failing case the reference is run again under each mutant of the catalogue (the
pitfalls, single-process and ring, and peers' conventions) on the same inputs; a variant
*matches* the case when the user's output is within the case's tolerance of the variant's
while the variant itself differs from the definition there (a variant that is right on a
case explains nothing). The summary names the variant that matches the most failing cases.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ringsim.cases import Case
from ringsim.reference import dilated_attention
from ringsim.reference.backward import dilated_attention_backward_chain
from ringsim.reference.simulate import ring_dilated_attention
from ringsim.tolerance import max_abs_error

from .calls import Outcome
from .conventions import CONVENTIONS
from .mutants import BACKWARD_MUTANTS, MUTANTS
from .patching import Mutant, applied
from .ring_mutants import RING_MUTANTS

#: Ring mutants whose outputs are right (or that break the simulated ring itself): they show
#: in memory or bytes, never in an output, so no output is matched to them.
OUTPUT_INVISIBLE = frozenset({"full-arrays-everywhere", "world-of-one", "whole-group"})


def forward_variants(kind: str) -> dict[str, Mutant]:
    """The variants tried on a wrong forward: a ring's also include the ring mutants."""
    found = {**MUTANTS, **CONVENTIONS}
    if kind == "shard":
        found |= {k: m for k, m in RING_MUTANTS.items() if k not in OUTPUT_INVISIBLE}
    return found


def _variant_forward(name: str, case: Case, q, k, v, pad) -> tuple[np.ndarray, np.ndarray]:
    args = (q, k, v, case.segment_lengths, case.dilation_rates)
    kwargs = {**case.kwargs(), "key_padding_mask": pad, "return_lse": True}
    if name in RING_MUTANTS:  # on the simulated cluster, at the case's world size
        return ring_dilated_attention(*args, **kwargs, world_size=case.world_size,
                                      layout=case.layout, timeout=10.0)  # fmt: skip
    return dilated_attention(*args, **kwargs)


def _close(outcome: Outcome, out, lse, tol: float) -> bool:
    if max_abs_error(outcome.out, out) > tol:
        return False
    return outcome.lse is None or max_abs_error(outcome.lse, lse) <= tol


def forward_matches(
    kind: str, case: Case, q, k, v, outcome: Outcome, definition, tol: float, pad=None
) -> tuple[str, ...]:
    """Names of the variants whose (out, lse) on this case equal the user's and not the
    definition's. A variant that cannot run on the case (the mutated ring may raise or
    deadlock) matches nothing."""
    found = []
    for name, mutant in forward_variants(kind).items():
        try:
            with applied(mutant):
                out, lse = _variant_forward(name, case, q, k, v, pad)
        except Exception:  # a broken variant is not a match; nothing of the user's is hidden
            continue
        if _close(outcome, out, lse, tol) and not _close(
            replace(outcome, out=definition.out, lse=definition.lse), out, lse, tol
        ):
            found.append(name)
    return tuple(found)


def chain_gradients(case: Case, q, k, v, dout, pad=None) -> tuple[np.ndarray, ...]:
    """dq, dk, dv by the chain rule through the mix (where the backward mutants act)."""
    args = (case.segment_lengths, case.dilation_rates)
    kwargs = {**case.kwargs(), "key_padding_mask": pad}
    out, lse = dilated_attention(q, k, v, *args, **kwargs, return_lse=True)
    return dilated_attention_backward_chain(q, k, v, out, lse, dout, *args, **kwargs)


def gradient_matches(case: Case, q, k, v, dout, outcome: Outcome, tol: float,
                     pad=None) -> tuple[str, ...]:  # fmt: skip
    """Names of the backward variants whose dq, dk, dv equal the user's."""
    found = []
    for name, mutant in BACKWARD_MUTANTS.items():
        with applied(mutant):
            grads = chain_gradients(case, q, k, v, dout, pad)
        assert outcome.grads is not None
        if all(max_abs_error(g, w) <= tol for g, w in zip(outcome.grads, grads)):
            found.append(name)
    return tuple(found)


def describe(name: str) -> str:
    """``"<what the variant does> (pitfall N)"`` or ``"(<the peer's name>)"``."""
    catalogue = {**MUTANTS, **CONVENTIONS, **RING_MUTANTS, **BACKWARD_MUTANTS}
    mutant = catalogue[name]
    return f"{mutant.description} ({mutant.source})"


@dataclass(frozen=True)
class Diagnosis:
    """The variants that explain the most failing cases (several when they tie: the cases
    cannot tell them apart), and on how many of them."""

    names: tuple[str, ...]
    matched: int
    failing: int

    @property
    def name(self) -> str | None:
        """The variant named first (the catalogue's order among ties), or None."""
        return self.names[0] if self.names else None

    def line(self) -> str:
        if self.failing == 0:
            return "diagnosis: no failing case returned a result to compare"
        if not self.names:
            return (
                f"diagnosis: no known wrong variant matches the {self.failing} failing "
                "case(s); look at the first wrong rows and heads in the table"
            )
        which = ", or with ".join(describe(name) for name in self.names)
        return (
            f"diagnosis: your output equals the definition with {which}, "
            f"on {self.matched}/{self.failing} failing cases"
        )


def summarise(matches: list[tuple[str, ...]]) -> Diagnosis:
    """``matches``: the variants matched by each failing case that returned a result."""
    counts: dict[str, int] = {}
    for names in matches:
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return Diagnosis((), 0, len(matches))
    top = max(counts.values())
    return Diagnosis(tuple(n for n in counts if counts[n] == top), top, len(matches))
