"""The NumPy reference of ring dilated attention, float64 by default, written to be read.

- :func:`dense_dilated_attention`, :func:`pattern_mask`: the definition (SPEC 3-4), the oracle.
- :func:`dilated_attention`: single-process dilated attention, select / attend / scatter / merge.
- :mod:`.merge`: the naive and the stable LSE merge side by side.
- :func:`block_attention`: one block of queries against one block of keys, ``(out, lse)``.
- :func:`ring_dilated_attention_shard`: one rank of the ring, over any communicator.
- :func:`ring_dilated_attention`: global arrays over the in-process simulated cluster.
"""

from .block import block_attention
from .dense import dense_dilated_attention, pattern_mask
from .dilated import dilated_attention
from .merge import merge_naive, merge_stable
from .ring import ring_dilated_attention_shard
from .simulate import ring_dilated_attention

__all__ = [
    "block_attention",
    "dense_dilated_attention",
    "dilated_attention",
    "merge_naive",
    "merge_stable",
    "pattern_mask",
    "ring_dilated_attention",
    "ring_dilated_attention_shard",
]
