"""The nn modules (spec §8): :class:`RingDilatedAttention`, :class:`RingMultiheadDilatedAttention`
and the seed's names for them. The top layer of the library: it imports the single-device
path and the ring."""

from .modules import RingDilatedAttention
from .multihead import RingMultiheadDilatedAttention
from .seed import RingDilatedAttentionHybrid, RingMultiheadDilatedAttentionHybrid

__all__ = [
    "RingDilatedAttention",
    "RingDilatedAttentionHybrid",
    "RingMultiheadDilatedAttention",
    "RingMultiheadDilatedAttentionHybrid",
]
