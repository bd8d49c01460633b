"""The step executor and the single-device path.

One executor runs one rank's batches of one step (:mod:`.forward`, :mod:`.backward`); the
single-device path (:mod:`.single`) is that executor at P = 1. Below it: the layouts of a
batch's rows (:mod:`.layout`), how its calls are scheduled (:mod:`.schedule`), the merge and
the Triton mixing pass (:mod:`.merge`, :mod:`.mix_triton`, :mod:`.merge_triton`), the device
caches and the CUDA-graph forward (:mod:`.graphs`). It imports :mod:`ringsim.gpu.kernels`
and nothing else of the package.
"""

from .backward import BackwardExecutor
from .forward import ForwardExecutor
from .part import Part
from .single import (
    DilatedFunction,
    check_differentiable,
    check_key_mask,
    check_tensor,
    dilated_attention,
    dilated_backward,
    dilated_forward,
    key_bias,
    needs_grad,
    prepare,
)

__all__ = [
    "BackwardExecutor",
    "DilatedFunction",
    "ForwardExecutor",
    "Part",
    "check_differentiable",
    "check_key_mask",
    "check_tensor",
    "dilated_attention",
    "dilated_backward",
    "dilated_forward",
    "key_bias",
    "needs_grad",
    "prepare",
]
