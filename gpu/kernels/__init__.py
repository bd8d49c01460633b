"""Attention kernels that return ``(out, lse)`` (:mod:`.forward`) and their backward given the
final out and lse (:mod:`.backward`), each behind one small adapter and a capability check.

The lowest layer of :mod:`ringsim.gpu`: it imports nothing else of the package.
"""

from .backward import attend_backward, backward_kernel
from .forward import (
    HALF,
    PREFERENCE,
    Kernel,
    accumulator_dtype,
    as_kernel,
    attend,
    capability,
    choose_kernel,
    compiled_flex,
    math_attention,
)

__all__ = [
    "HALF",
    "PREFERENCE",
    "Kernel",
    "accumulator_dtype",
    "as_kernel",
    "attend",
    "attend_backward",
    "backward_kernel",
    "capability",
    "choose_kernel",
    "compiled_flex",
    "math_attention",
]
