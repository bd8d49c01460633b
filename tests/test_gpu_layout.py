"""The gathered layout (:mod:`ringsim.gpu.executor.layout`): a pair's rows of every head as
one ``(b*S, m, H, d)`` tensor, by ``index_select`` or, where the heads lie at equal steps in
memory, as one strided view (:func:`pair_view`). The view must address exactly the rows the
index gathers, in the same order, and exist only where it can.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ringsim.config import make_config  # noqa: E402
from ringsim.gpu.executor.layout import (  # noqa: E402
    _pair_index,
    gather_pair,
    pair_heads,
    pair_view,
    scatter_add_pair,
)


def pair_groups(segments, rates, h, pair, mode="longnet", heads=None):
    config = make_config(segments, rates, mode=mode)
    groups = tuple(g for g in config.pattern_groups(h) if g.pair == pair)
    if heads is not None:  # a head chunk (Note [Direct gradients])
        groups = tuple(g for g in groups if set(g.heads) <= set(heads))
    return groups


def by_index(x, groups, rows=None, length=None):
    b, n, h, *rest = x.shape
    index, blocks = _pair_index(x, groups, rows, length)
    heads = sum(len(g.heads) for g in groups)
    flat = x.reshape(b * n * h, *rest)
    return flat.index_select(0, index).view(b * blocks, -1, heads, *rest)


# (b, n, h, segments, rates, pair, mode, heads, a view?)
CASES = [
    (1, 64, 4, (16, 32), (1, 4), 1, "longnet", None, True),  # one head per group
    (2, 64, 4, (16, 32), (1, 4), 1, "longnet", None, True),  # batch merges with segments
    (1, 64, 4, (16, 32), (1, 4), 0, "longnet", None, True),  # r = 1, every head
    (1, 64, 4, (16, 64), (1, 8), 1, "longnet", None, True),  # r > h: groups of 0 or 1 head
    (1, 64, 16, (16, 32), (1, 16), 1, "longnet", range(4, 8), True),  # a head chunk
    (1, 64, 4, (16, 32), (1, 2), 1, "longnet", None, False),  # two heads per group
    (2, 48, 4, (12, 24), (1, 3), 1, "grouped", None, True),  # two heads, any step
    (1, 64, 8, (16, 32), (1, 4), 1, "grouped", None, True),  # heads 4..7 at offsets 0..3
    (1, 64, 12, (16, 32), (1, 4), 1, "grouped", None, False),  # heads 6..11: 2 at offset 2
]


@pytest.mark.parametrize("case", CASES)
def test_pair_view_is_the_gather(case):
    b, n, h, segments, rates, pair, mode, heads, viewable = case
    x = torch.randn(b, n, h, 8, dtype=torch.float64)
    groups = pair_groups(segments, rates, h, pair, mode, heads)
    view = pair_view(x, groups)
    if not viewable:
        assert view is None
        return
    assert view is not None and view.data_ptr() >= x.data_ptr()
    torch.testing.assert_close(view, by_index(x, groups), rtol=0, atol=0)
    assert torch.equal(gather_pair(x, groups, strided=True), view)
    # without strided, only a contiguous view is returned as is; else a copy
    plain = gather_pair(x, groups)
    assert torch.equal(plain, view)
    assert plain.is_contiguous()


def test_pair_view_of_rows_and_of_a_transposed_lse():
    """A zigzag chunk's rows (a range of positions, with a local width), and a (b, c, h)
    view of a (b, h, c) lse, as the backward reads it."""
    x = torch.randn(1, 64, 4, 8, dtype=torch.float64)
    groups = pair_groups((16, 64), (1, 4), 4, 1)
    rows = range(32, 64)
    torch.testing.assert_close(
        pair_view(x, groups, rows, 32), by_index(x, groups, rows, 32), rtol=0, atol=0
    )
    lse = torch.randn(1, 4, 64, dtype=torch.float64).transpose(1, 2)[..., None]
    torch.testing.assert_close(pair_view(lse, groups), by_index(lse, groups), rtol=0, atol=0)
    batched = torch.randn(2, 4, 64, dtype=torch.float64).transpose(1, 2)[..., None]
    assert pair_view(batched, groups) is None  # the batch does not merge with the segments
    # grouped heads 2, 3 at r = 3: head 3 (offset 0) comes first, a step back in this lse
    grouped = pair_groups((12, 24), (1, 3), 4, 1, "grouped")
    assert pair_heads(grouped)[0] == (3, 2)
    lse = torch.randn(1, 4, 48, dtype=torch.float64).transpose(1, 2)[..., None]
    assert pair_view(lse, grouped) is None
    assert torch.equal(gather_pair(lse, grouped, strided=True), by_index(lse, grouped))


@pytest.mark.parametrize("case", [c for c in CASES if c[-1]])
def test_scatter_add_through_the_view(case):
    b, n, h, segments, rates, pair, mode, heads, _ = case
    groups = pair_groups(segments, rates, h, pair, mode, heads)
    total = torch.randn(b, n, h, 8, dtype=torch.float64)
    expected = total.clone()
    grad = torch.randn_like(by_index(total, groups))
    index, _ = _pair_index(expected, groups, None, None)
    expected.view(-1, 8).index_add_(0, index, grad.reshape(-1, 8))
    scatter_add_pair(total, grad, groups)
    torch.testing.assert_close(total, expected, rtol=0, atol=0)
