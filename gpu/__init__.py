"""The torch backend of ring dilated attention: kernels that return the LSE, the single-device
path, the ring over torch.distributed or the simulated cluster, and the modules.

Importing this package imports torch but never probes a GPU.
"""

from .dilated import dilated_attention
from .kernels import Kernel, choose_kernel
from .modules import RingDilatedAttention, RingDilatedAttentionHybrid
from .multihead import RingMultiheadDilatedAttention, RingMultiheadDilatedAttentionHybrid
from .ring import ring_dilated_attention
from .simulate import simulated_ring_dilated_attention

__all__ = [
    "Kernel",
    "RingDilatedAttention",
    "RingDilatedAttentionHybrid",
    "RingMultiheadDilatedAttention",
    "RingMultiheadDilatedAttentionHybrid",
    "choose_kernel",
    "dilated_attention",
    "ring_dilated_attention",
    "simulated_ring_dilated_attention",
]
