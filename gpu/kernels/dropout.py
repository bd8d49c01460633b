"""Attention dropout of one forward pass and its backward: what each kernel call drew.

Note [Dropout]
--------------
Dropout zeroes each attention probability with probability p and scales the others by
``1 / (1 - p)``; the kernels' own dropout does it inside the fused kernels (flash and
efficient: PyTorch's Philox generator), the math kernel with a mask drawn from a seed. A
kernel returns the lse of the scores *before* dropout, so the patterns (and the ring's
blocks) mix with the pre-dropout weights ``exp(lse_i - L)``, and the output is
``sum_y exp(s_y - L) Z_y v_y`` with ``Z = mask / (1 - p)``, whose expectation is the output
without dropout. Its gradient with respect to a score is ``P_y (Z_y dO.v_y - dO.out)``: the
kernels' backward with the dropout mask, the *final* out and the final L (Note [Backward
with the final out and lse] in :mod:`ringsim.gpu.kernels.backward`), exactly as without
dropout.

The backward must see each call's mask again. A :class:`Dropout` records, call by call, the
random state each forward call used (the fused kernels' Philox seed and offset, the math
kernel's seed), and the backward replays them in the same order; so the backward must make
the same calls with the same shapes: with dropout the step executor runs the gathered-rows
path in both passes, and both split a call that is too large by
:func:`~ringsim.gpu.kernels.choice.blocks_per_call` of q, k, v alone. The states come from
torch's generators (the device's default generator, and the CPU's for the math kernel's
seeds), so ``torch.manual_seed`` makes a run reproducible. The simulated ring's virtual
ranks run in threads, in no fixed order: each draws its math seeds from a generator of its
own (:meth:`Dropout.seeded`), seeded in rank order; the fused kernels there draw from the
device's generator in the order the threads reach it, so their masks are not reproducible
there (each backward still replays its own forward's).

Kernels: flash and efficient take dropout; cuDNN does not here (its dropout crashed in cuDNN
9.11-9.13, pytorch/pytorch#163903, and rounds p to a multiple of 1/16 in some kernels,
pytorch/pytorch#174245); nor do flash_cpu (PyTorch: "Currently do not support dropout > 0")
and FlexAttention (not wired).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .choice import accumulator_dtype


@dataclass(eq=False)
class Dropout:
    """Dropout with probability ``p`` for one forward pass and its backward (Note
    [Dropout]): :meth:`record` each call's random state in the forward, :meth:`rewind` and
    :meth:`replay` them in the backward."""

    p: float
    states: list[Any] = field(default_factory=list)
    cursor: int = 0
    #: where the math kernel's seeds come from (None: torch's CPU generator)
    generator: torch.Generator | None = None

    @classmethod
    def seeded(cls, p: float) -> Dropout:
        """A record whose math seeds come from a generator of its own, seeded now from
        torch's CPU generator (a virtual rank's, Note [Dropout])."""
        return cls(p, generator=torch.Generator().manual_seed(new_seed()))

    def new_seed(self) -> int:
        """A seed for the next math call's mask."""
        return new_seed(self.generator)

    def record(self, state: Any) -> None:
        self.states.append(state)

    def rewind(self) -> None:
        """Start the replay again (a backward pass, or a second one with retain_graph)."""
        self.cursor = 0

    def replay(self) -> Any:
        """The state of the next call, in the forward's order."""
        if self.cursor >= len(self.states):
            raise RuntimeError(
                f"dropout: the backward made more kernel calls than the forward "
                f"({len(self.states)}): their masks cannot match"
            )
        state = self.states[self.cursor]
        self.cursor += 1
        return state


def new_seed(generator: torch.Generator | None = None) -> int:
    """A seed for the math kernel's mask, drawn from ``generator`` (default: torch's CPU
    generator)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def active(dropout: Dropout | None) -> Dropout | None:
    """``dropout`` if it drops anything (p > 0), else None: the one test every caller makes."""
    return dropout if dropout is not None and dropout.p > 0 else None


def keep_scale(q: torch.Tensor, k: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """The math kernel's ``mask / (1 - p)`` for blocks ``q (B, H, M, D)``, ``k (B, H, L, D)``:
    ``(B, H, M, L)`` drawn from ``seed``, in the scores' dtype, 0 where dropped."""
    shape = (*q.shape[:-1], k.shape[-2])
    gen = torch.Generator(device=q.device).manual_seed(seed)
    kept = torch.rand(shape, generator=gen, device=q.device) >= p
    return kept.to(accumulator_dtype(q.dtype)) / (1.0 - p)
