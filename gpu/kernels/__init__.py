"""Attention kernels that return ``(out, lse)`` (:mod:`.forward`) and their backward given the
final out and lse (:mod:`.backward`), each behind one small adapter; which one runs is a
capability check and a measured preference per architecture (:mod:`.choice`).

The lowest layer of :mod:`ringsim.gpu`: it imports nothing else of the package.
"""

from .backward import attend_backward, backward_kernel, block_backward
from .choice import (
    HALF,
    HOPPER_PREFERENCE,
    MAX_BLOCKS,
    MAX_EXTENT,
    PREFERENCE,
    Kernel,
    accumulator_dtype,
    as_kernel,
    block_kernel,
    blocks_per_call,
    capability,
    choose_kernel,
    preference,
    realigned,
    unaligned,
)
from .dropout import Dropout
from .forward import attend, compiled_flex, math_attention

__all__ = [
    "HALF",
    "HOPPER_PREFERENCE",
    "MAX_BLOCKS",
    "MAX_EXTENT",
    "PREFERENCE",
    "Dropout",
    "Kernel",
    "accumulator_dtype",
    "as_kernel",
    "attend",
    "attend_backward",
    "backward_kernel",
    "block_backward",
    "block_kernel",
    "blocks_per_call",
    "capability",
    "choose_kernel",
    "compiled_flex",
    "math_attention",
    "preference",
    "realigned",
    "unaligned",
]
