"""The ring over torch.distributed (NCCL on GPUs, gloo on CPUs) or any ringsim communicator,
forward and backward on one rank (:mod:`.rank`), its communicator (:mod:`.comm`), autograd
(:mod:`.autograd`), and the two entry points: one rank of a process group
(:mod:`.distributed`) and the simulated ring on one device (:mod:`.simulate`). It imports the
step executor and the kernels, never the modules above it.
"""

from .comm import TorchDistCommunicator, communicator
from .distributed import ring_dilated_attention
from .rank import ring_backward, ring_forward
from .simulate import simulated_ring_dilated_attention

__all__ = [
    "TorchDistCommunicator",
    "communicator",
    "ring_backward",
    "ring_dilated_attention",
    "ring_forward",
    "simulated_ring_dilated_attention",
]
