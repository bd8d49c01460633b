"""Random dilated-attention configurations for property tests, and the ``Case`` they draw.

A case is a :class:`ringsim.cases.Case`: one configuration plus the seed of its inputs;
arrays stay small (seq_len <= 70, head_dim <= 8) so the dense O(n^2) oracle answers in milliseconds.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from ringsim.cases import Case


def case(
    segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...], seq_len: int, **fields: Any
) -> Case:
    """A single-process :class:`ringsim.cases.Case`, with small defaults for the rest."""
    defaults = {"num_heads": 2, "head_dim": 4, "batch": 1}
    return Case(
        seq_len=seq_len,
        segment_lengths=segment_lengths,
        dilation_rates=dilation_rates,
        **{**defaults, **fields},
    )


@st.composite
def configs(draw: st.DrawFn, max_seq_len: int = 70) -> Case:
    """Any legal configuration: 1-4 pairs, any seq_len, ragged segments, w > n, r > w, ...

    Small values are drawn often so that short segments (r > w, offsets past a ragged last
    segment, rows with no key) come up as often as long ones (w > n).
    """
    num_pairs = draw(st.integers(1, 4))
    seq_len = draw(st.integers(1, max_seq_len))
    length = st.one_of(st.integers(1, 8), st.integers(1, max_seq_len + 16))
    rate = st.one_of(st.integers(1, 3), st.integers(1, 10))
    segment_lengths = tuple(draw(st.lists(length, min_size=num_pairs, max_size=num_pairs)))
    dilation_rates = tuple(draw(st.lists(rate, min_size=num_pairs, max_size=num_pairs)))
    mode = draw(st.sampled_from(["longnet", "grouped"]))
    min_heads = num_pairs if mode == "grouped" else 1  # grouped: one head per pair at least
    num_heads = draw(st.integers(min_heads, min_heads + 4))
    return Case(
        segment_lengths=segment_lengths,
        dilation_rates=dilation_rates,
        seq_len=seq_len,
        num_heads=num_heads,
        head_dim=draw(st.integers(1, 8)),
        batch=draw(st.integers(1, 2)),
        is_causal=draw(st.booleans()),
        mode=mode,
        softmax_scale=draw(st.one_of(st.none(), st.floats(0.1, 1.5))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
