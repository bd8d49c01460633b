"""The modules' arguments, and the seed's aliases with the seed's own usage: every argument
works as documented or raises naming itself (spec §8), the seed's examples run.

Needs torch (the ``torch`` extra); skipped otherwise.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from module_support import by_hand, randn, reference  # noqa: E402

from ringsim.gpu.kernels import Kernel  # noqa: E402
from ringsim.gpu.nn.modules import RingDilatedAttention  # noqa: E402
from ringsim.gpu.nn.multihead import RingMultiheadDilatedAttention  # noqa: E402
from ringsim.gpu.nn.seed import (  # noqa: E402
    RingDilatedAttentionHybrid,
    RingMultiheadDilatedAttentionHybrid,
)
from ringsim.tolerance import max_abs_error, tolerance  # noqa: E402


def att(**kwargs):
    return RingDilatedAttention((4,), (1,), **kwargs)


def hybrid(**kwargs):
    return RingDilatedAttentionHybrid((4,), (1,), **kwargs)


def mha(**kwargs):
    return RingMultiheadDilatedAttention(8, 2, (4,), (1,), batch_first=True, **kwargs)


def call_mha(module=None, shapes=((1, 8, 8),) * 3, **kwargs):
    return (module or mha())(*(torch.randn(s) for s in shapes), **kwargs)


def train_forward(module):
    x = torch.randn(1, 8, 2, 4)
    return module.train()(x, x, x)


NO = NotImplementedError
MASK = torch.zeros(1, 8, dtype=torch.bool)
# (the argument the error names, the error, what raises it)
REJECTED = [
    ("key_padding_mask", ValueError, lambda: call_mha(key_padding_mask=MASK.expand(2, 8))),
    ("key_padding_mask", TypeError, lambda: call_mha(key_padding_mask=MASK.long())),
    ("attn_mask", ValueError, lambda: call_mha(attn_mask=torch.zeros(7, 7, dtype=torch.bool))),
    ("attn_mask", TypeError, lambda: call_mha(attn_mask=MASK.expand(8, 8).long())),
    ("dropout", ValueError, lambda: att(dropout=1.5)),
    ("dropout", ValueError, lambda: mha(dropout=1.0)),
    ("dropout", TypeError, lambda: att(dropout="0.1")),
    ("enable_memory_pool", TypeError, lambda: hybrid(enable_memory_pool="yes")),
    (
        "enable_memory_pool",
        TypeError,
        lambda: RingMultiheadDilatedAttentionHybrid(8, 2, (4,), (1,), enable_memory_pool=1),
    ),
    ("ring_size", ValueError, lambda: hybrid(ring_size=2)),  # no process group here
    (
        "ring_size",
        ValueError,
        lambda: RingMultiheadDilatedAttentionHybrid(8, 2, (4,), (1,), 0.0, ring_size=0),
    ),
    ("embed_dim", ValueError, lambda: RingMultiheadDilatedAttention(10, 3, (4,), (1,))),
    (
        "num_heads",
        ValueError,
        lambda: RingMultiheadDilatedAttention(8, 1, (4, 8), (1, 2), mode="grouped"),
    ),
    ("segment_lengths", ValueError, lambda: RingDilatedAttention((), ())),
    ("dilation_rates", ValueError, lambda: RingDilatedAttention((4,), (0,))),
    ("mode", ValueError, lambda: att(mode="dense")),
    ("softmax_scale", ValueError, lambda: att(softmax_scale=float("nan"))),
    ("kernel", ValueError, lambda: att(kernel="fast")),
    ("kernel", ValueError, lambda: train_forward(att(kernel="flash"))),  # needs CUDA
    ("group", ValueError, lambda: att(group="world")),
    ("gamma_init", ValueError, lambda: mha(gamma_init=0.0)),
    ("use_flash_attention", TypeError, lambda: hybrid(use_flash_attention="yes")),
    ("device", ValueError, lambda: train_forward(hybrid(device="meta"))),
    ("dtype", TypeError, lambda: train_forward(hybrid(dtype=torch.float64))),
    ("query", ValueError, lambda: call_mha(shapes=((8, 8),) * 3)),
    ("key", ValueError, lambda: call_mha(shapes=((1, 8, 8), (1, 4, 8), (1, 8, 8)))),
    ("is_causal", TypeError, lambda: call_mha(is_causal=1)),
]


@pytest.mark.parametrize(("name", "error", "make"), REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_arguments_raise_naming_the_argument(name, error, make):
    with pytest.raises(error, match=rf"^{name}: "):
        make()


def test_dropout_is_the_identity_in_eval_mode(rng):
    q, k, v = (randn(rng, 1, 12, 2, 4) for _ in range(3))
    module = RingDilatedAttention((4, 12), (1, 2), dropout=0.3).eval()
    assert torch.equal(module(q, k, v), RingDilatedAttention((4, 12), (1, 2))(q, k, v))


SEED_ATTENTION = dict(
    segment_lengths=[2048, 4096], dilation_rates=[1, 2], dropout=0.1, device=torch.device("cpu"),
    dtype=torch.float32, ring_size=1, enable_memory_pool=True, use_flash_attention=True,
)  # fmt: skip
SEED_MULTIHEAD = dict(
    embed_dim=768, num_heads=12, segment_lengths=[2048, 4096], dilation_rates=[1, 2],
    layer_norm=True, gamma_init=0.5,
)  # fmt: skip


def test_seed_attention_example_runs(rng):
    module = RingDilatedAttentionHybrid(**SEED_ATTENTION)  # as the seed writes it
    assert module.memory_pool is not None
    q, k, v = (randn(rng, 1, 512, 8, 64).float() for _ in range(3))  # the seed's shape
    dropped = module(q, k, v, is_causal=True)  # training mode, dropout 0.1
    out = module.eval()(q, k, v, is_causal=True)
    assert (dropped - out).abs().max() > 1e-3
    ref = reference(q, k, v, [2048, 4096], [1, 2], is_causal=True)
    assert max_abs_error(out.numpy(), ref) <= tolerance("float32")
    assert module.last_kernel is Kernel.MATH  # on the CPU: flash kernels need CUDA


def test_seed_multihead_example_runs(rng):
    torch.manual_seed(1)
    module = RingMultiheadDilatedAttentionHybrid(**SEED_MULTIHEAD).double()
    x = randn(rng, 2, 64, 768)
    out, weights = module(x, x, x, is_causal=True)
    assert weights is None and out.shape == x.shape
    expected = by_hand(module, x, x, x, is_causal=True)
    assert max_abs_error(out.detach().numpy(), expected.numpy()) <= tolerance("float64")
    math_only = RingMultiheadDilatedAttentionHybrid(**SEED_MULTIHEAD, use_flash_attention=False)
    assert math_only.attention.kernel is Kernel.MATH and module.attention.kernel is None
