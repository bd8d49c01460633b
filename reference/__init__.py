"""The NumPy reference of ring dilated attention, float64 by default, written to be read.

- :func:`dense_dilated_attention`, :func:`pattern_mask`: the definition (spec §3, §4), the oracle.
- :func:`dilated_attention`: single-process dilated attention, select / attend / scatter / merge.
- :mod:`.merge`: the naive and the stable LSE merge side by side.
- :func:`block_attention`: one block of queries against one block of keys, ``(out, lse)``.
- :func:`ring_dilated_attention_shard`: one rank of the ring, over any communicator.
- :func:`ring_dilated_attention`: global arrays over the in-process simulated cluster.
- :func:`dilated_attention_backward`, :func:`ring_dilated_attention_shard_backward`,
  :func:`ring_dilated_attention_backward`: the exact gradients, single-process, per rank and
  over the simulated cluster; :mod:`.backward` derives them step by step.
"""

from .backward import (
    block_attention_backward,
    dilated_attention_backward,
    dilated_attention_backward_chain,
    mix_backward,
)
from .block import block_attention
from .dense import dense_dilated_attention, pattern_mask
from .dilated import dilated_attention
from .merge import merge_naive, merge_stable
from .ring import ring_dilated_attention_shard
from .ring_backward import ring_dilated_attention_shard_backward
from .simulate import ring_dilated_attention, ring_dilated_attention_backward

__all__ = [
    "block_attention",
    "block_attention_backward",
    "dense_dilated_attention",
    "dilated_attention",
    "dilated_attention_backward",
    "dilated_attention_backward_chain",
    "merge_naive",
    "merge_stable",
    "mix_backward",
    "pattern_mask",
    "ring_dilated_attention",
    "ring_dilated_attention_backward",
    "ring_dilated_attention_shard",
    "ring_dilated_attention_shard_backward",
]
