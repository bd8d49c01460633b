"""The torch backend of ring dilated attention, in layers that import only downwards:

- :mod:`.kernels`: attention kernels that return the LSE, and their backward;
- :mod:`.executor`: the step executor, which runs one rank's batches of one step, and the
  single-device path, which is that executor at P = 1;
- :mod:`.ring`: the ring over torch.distributed or the simulated cluster, forward and
  backward;
- :mod:`.nn`: the modules and the seed's names for them;
- :mod:`.harness` (apart, imported by nothing above): the device check, the benchmarks, the
  multi-process parity check and the profile.

Importing this package imports torch but never probes a GPU.
"""

from ringsim.extras import require

require("torch", "ringsim.gpu")  # one line naming the extra, not a ModuleNotFoundError

from .executor import dilated_attention  # noqa: E402
from .kernels import Kernel, choose_kernel  # noqa: E402
from .nn import (  # noqa: E402
    RingDilatedAttention,
    RingDilatedAttentionHybrid,
    RingMultiheadDilatedAttention,
    RingMultiheadDilatedAttentionHybrid,
)
from .ring import ring_dilated_attention, simulated_ring_dilated_attention  # noqa: E402

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
