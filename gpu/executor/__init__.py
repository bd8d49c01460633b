"""The step executor and the single-device path.

One executor runs one rank's batches of one step (:mod:`.forward`, :mod:`.backward`); the
single-device path (:mod:`.single`, its input checks :mod:`.checks` and its operator
:mod:`.operator`) is that executor at P = 1. Below it: the layouts of a
batch's rows (:mod:`.layout`), how its calls are scheduled (:mod:`.schedule`), the merge and
the Triton mixing pass (:mod:`.merge`, :mod:`.mix_triton`, :mod:`.merge_triton`), the device
caches and the CUDA-graph forward (:mod:`.graphs`). It imports :mod:`ringsim.gpu.kernels`
and nothing else of the package.
"""

from .backward import BackwardExecutor
from .checks import (
    check_differentiable,
    check_dropout_p,
    check_key_mask,
    check_tensor,
    key_bias,
    needs_grad,
    prepare,
)
from .forward import ForwardExecutor
from .operator import dilated_backward, dilated_forward
from .part import Part
from .single import dilated_attention

__all__ = [
    "BackwardExecutor",
    "ForwardExecutor",
    "Part",
    "check_differentiable",
    "check_dropout_p",
    "check_key_mask",
    "check_tensor",
    "dilated_attention",
    "dilated_backward",
    "dilated_forward",
    "key_bias",
    "needs_grad",
    "prepare",
]
