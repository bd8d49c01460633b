"""The torch modules on the CPU against the dense-mask definition (their arguments and the
seed's aliases: ``test_gpu_seed_modules.py``).

Needs torch (the ``torch`` extra); skipped otherwise. The process-group tests use gloo: one
in-process group of one rank, and two real processes on a free local port (timeout 90 s).
"""

from __future__ import annotations

import datetime
import itertools
import os
import socket
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from module_support import by_hand, randn, randomise, reference  # noqa: E402

import ringsim  # noqa: E402
from ringsim.gpu.kernels import Kernel  # noqa: E402
from ringsim.gpu.nn.modules import RingDilatedAttention  # noqa: E402
from ringsim.gpu.nn.multihead import (  # noqa: E402
    RingMultiheadDilatedAttention,
)
from ringsim.gpu.nn.seed import RingDilatedAttentionHybrid  # noqa: E402
from ringsim.tolerance import max_abs_error, tolerance  # noqa: E402

# (seq_len, segment_lengths, dilation_rates): ragged segments, r not dividing w, r > w
CONFIGS = [(30, (6, 15), (1, 3)), (28, (8, 20), (2, 3)), (10, (3, 7), (5, 2))]
MODES = ["longnet", "grouped"]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_module_matches_definition(rng, config, mode, is_causal):
    n, segs, rates = config
    q, k, v = (randn(rng, 2, n, 4, 8) for _ in range(3))
    kernels = ((None, Kernel.MATH), ("math", Kernel.MATH), ("flash_cpu", Kernel.FLASH_CPU))
    for kernel, ran in kernels:
        module = RingDilatedAttention(segs, rates, mode=mode, kernel=kernel)
        out = module(q, k, v, is_causal=is_causal)
        ref = reference(q, k, v, segs, rates, is_causal=is_causal, mode=mode)
        assert max_abs_error(out.numpy(), ref) <= tolerance("float64"), kernel
        assert module.last_kernel is ran


def test_attention_module_passes_softmax_scale(rng):
    q, k, v = (randn(rng, 1, 12, 2, 4) for _ in range(3))
    out = RingDilatedAttention((4, 12), (1, 2), softmax_scale=0.3)(q, k, v)
    ref = reference(q, k, v, (4, 12), (1, 2), softmax_scale=0.3)
    assert max_abs_error(out.numpy(), ref) <= tolerance("float64")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_multihead_matches_hand_computation(rng, batch_first, layer_norm, mode, is_causal):
    module = RingMultiheadDilatedAttention(
        24, 3, (6, 14), (2, 3), layer_norm=layer_norm, batch_first=batch_first, mode=mode,
        gamma_init=0.7, dtype=torch.float64,
    )  # fmt: skip
    randomise(module, seed=5)
    shape = (2, 21, 24) if batch_first else (21, 2, 24)
    query, key, value = (randn(rng, *shape) for _ in range(3))
    out, weights = module(query, key, value, is_causal=is_causal, need_weights=False)
    assert weights is None and out.shape == shape
    expected = by_hand(module, query, key, value, is_causal)
    assert max_abs_error(out.detach().numpy(), expected.numpy()) <= tolerance("float64")


def test_magneto_sub_layer_norm_sits_before_out_proj(rng):
    with_ln = RingMultiheadDilatedAttention(16, 2, (8,), (2,), layer_norm=True).double()
    without = RingMultiheadDilatedAttention(16, 2, (8,), (2,)).double()  # the default
    norms = [m for m in with_ln.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms == [with_ln.sub_layer_norm] and norms[0].normalized_shape == (16,)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in without.modules())
    without.load_state_dict(with_ln.state_dict(), strict=False)  # same projections
    seen = {}
    with_ln.sub_layer_norm.register_forward_hook(lambda m, i, o: seen.update(ln=o))
    with_ln.out_proj.register_forward_pre_hook(lambda m, i: seen.update(proj_in=i[0]))
    x = randn(rng, 1, 16, 16)
    a, _ = with_ln(x, x, x)  # (seq 1, batch 16): batch_first is False by default
    b, _ = without(x, x, x)
    assert torch.equal(seen["proj_in"], seen["ln"])  # out_proj reads the normalised output
    assert (a - b).abs().max() > 1e-3


def test_gamma_init_is_the_xavier_gain_of_v_and_out_projections():
    stds, names = {}, ("q_proj", "k_proj", "v_proj", "out_proj")
    for gamma in (0.5, 1.0):
        torch.manual_seed(0)
        module = RingMultiheadDilatedAttention(512, 8, (64,), (1,), gamma_init=gamma)
        weights = (*module.projection_weights(), module.out_proj.weight)
        stds[gamma] = {n: w.std().item() for n, w in zip(names, weights)}
        assert torch.all(module.in_proj_bias == 0) and torch.all(module.out_proj.bias == 0)
    xavier = (2 / (512 + 512)) ** 0.5  # xavier std at gain 1
    for name in ("v_proj", "out_proj"):
        assert stds[0.5][name] / stds[1.0][name] == pytest.approx(0.5, rel=0.1)
        assert stds[1.0][name] == pytest.approx(xavier, rel=0.05)
    for name in ("q_proj", "k_proj"):  # gain 1 whatever gamma_init is
        assert stds[0.5][name] == pytest.approx(xavier, rel=0.05)


def module_gradients(rng, kernel: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)  # the projections' initial weights
    module = RingMultiheadDilatedAttention(
        16, 4, (4, 12), (1, 3), kernel=kernel, dtype=torch.float64, batch_first=True
    )
    randomise(module, seed=2)
    x = randn(rng, 2, 12, 16).requires_grad_()
    out, _ = module(x, x, x, is_causal=True)
    out.square().sum().backward()
    return {name: p.grad for name, p in [*module.named_parameters(), ("input", x)]}


def test_gradients_flow_and_agree_across_kernels():
    """Every parameter gets a finite, non-zero gradient, and the fused kernel's backward
    gives the math kernel's gradients (both exact through the mixing, spec §4)."""
    math = module_gradients(np.random.default_rng(7), "math")
    fused = module_gradients(np.random.default_rng(7), "flash_cpu")
    for name, grad in math.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().max() > 0, name
        assert max_abs_error(fused[name].numpy(), grad.numpy()) <= 10 * tolerance("float64"), name


@pytest.fixture
def world_of_one():
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_group_path_in_a_world_of_one(rng, world_of_one):
    q, k, v = (randn(rng, 1, 16, 2, 4) for _ in range(3))
    ref = reference(q, k, v, (4, 16), (2, 4), is_causal=True)
    for group in ("default", dist.group.WORLD):
        module = RingDilatedAttention((4, 16), (2, 4), group=group)
        assert max_abs_error(module(q, k, v, is_causal=True).numpy(), ref) <= 1e-10
    assert RingDilatedAttentionHybrid((4,), (1,), ring_size=1).group is None
    assert RingDilatedAttentionHybrid((4,), (1,), ring_size=1, group="default").group == "default"
    with pytest.raises(
        ValueError, match=r"^ring_size: must equal the process group's world size 1"
    ):
        RingDilatedAttentionHybrid((4,), (1,), ring_size=2)


LAYOUTS = ("contiguous", "zigzag")


def test_a_layout_without_a_group_is_refused():
    with pytest.raises(ValueError, match=r"^layout: 'zigzag' says which positions"):
        RingDilatedAttention((4,), (1,), layout="zigzag")
    with pytest.raises(ValueError, match=r"^layout: expected one of"):
        RingMultiheadDilatedAttention(8, 2, (4,), (1,), group="default", layout="striped")


def two_rank_main(rank: int, port: int) -> None:
    """One rank: the multihead module over the group on shards vs on the whole sequence."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)  # every rank draws the same, keeps its shard
    for mode, is_causal, layout in itertools.product(MODES, (False, True), LAYOUTS):
        torch.manual_seed(4)
        ring = RingMultiheadDilatedAttention(
            24, 3, (8, 24), (1, 3), mode=mode, group="default", dtype=torch.float64,
            layout=layout, batch_first=True,
        )  # fmt: skip
        whole = RingMultiheadDilatedAttention(
            24, 3, (8, 24), (1, 3), mode=mode, batch_first=True
        ).double()
        whole.load_state_dict(ring.state_dict())
        x = torch.randn(2, 24, 24, generator=gen, dtype=torch.float64)
        mine = ringsim.shard(x, rank, 2, layout=layout)  # segment [8, 16) crosses shards
        with torch.no_grad():  # gradients over gloo: test_gpu_ring's distcheck runs
            out, _ = ring(mine, mine, mine, is_causal=is_causal, need_weights=False)
            whole_out = whole(x, x, x, is_causal=is_causal)[0]
        expected = ringsim.shard(whole_out, rank, 2, layout=layout)
        err = (out - expected).abs().max().item()
        assert err <= 1e-10, f"rank {rank} {mode} causal={is_causal} {layout}: {err:.2e}"
    dist.barrier()
    dist.destroy_process_group()


def test_multihead_over_two_gloo_processes_matches_one_device():
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.spawn(two_rank_main, args=(port,), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    while not context.join(timeout=1):  # raises with the rank's traceback if one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("two gloo ranks did not finish within 90 s")


# --- nn.MultiheadAttention's state and defaults (the drop-in issue, item 1) -----------------


@pytest.mark.parametrize("dims", [{}, {"kdim": 6, "vdim": 10}])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_loads_both_ways_with_nn_multihead_attention(dims, bias):
    ours = RingMultiheadDilatedAttention(16, 4, (8,), (1,), bias=bias, **dims)
    theirs = torch.nn.MultiheadAttention(16, 4, bias=bias, **dims)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict())  # strict, both ways
    theirs.load_state_dict(ours.state_dict())
    assert ours.batch_first is theirs.batch_first is False
    assert ours.sub_layer_norm is None  # layer_norm=False by default, as theirs has none


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dims", [{}, {"kdim": 6, "vdim": 10}])
def test_one_full_segment_equals_nn_multihead_attention(rng, batch_first, is_causal, dims):
    """w = (n,), r = (1,) is plain attention: the output is nn.MultiheadAttention's."""
    n, e = 12, 16
    theirs = torch.nn.MultiheadAttention(e, 4, batch_first=batch_first, **dims).double()
    randomise(theirs, seed=4)
    ours = RingMultiheadDilatedAttention(e, 4, (n,), (1,), batch_first=batch_first, **dims)
    ours.double().load_state_dict(theirs.state_dict())

    def shape(features):
        return (2, n, features) if batch_first else (n, 2, features)

    query = randn(rng, *shape(e))
    key = randn(rng, *shape(dims.get("kdim", e)))
    value = randn(rng, *shape(dims.get("vdim", e)))
    mask = torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)
    with torch.no_grad():
        want, _ = theirs(query, key, value, need_weights=False,
                         attn_mask=mask if is_causal else None, is_causal=is_causal)  # fmt: skip
        got, _ = ours(query, key, value, is_causal=is_causal)
    assert (got - want).abs().max().item() <= 1e-10


def test_works_in_a_transformer_encoder_layer_in_eval_under_no_grad(rng):
    """The layer's fast path reads in_proj_bias and would run dense attention with these
    weights: it must not be taken (w = (6,) differs from dense attention here)."""
    layer = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0,
                                             batch_first=True).double().eval()  # fmt: skip
    dense_out = None
    x = randn(rng, 2, 12, 16)
    with torch.no_grad():
        dense_out = layer(x)
        layer.self_attn = RingMultiheadDilatedAttention(16, 4, (6,), (1,), batch_first=True)
        layer.self_attn.double().load_state_dict(torch.nn.MultiheadAttention(16, 4).state_dict())
        out = layer(x)
        attended, _ = layer.self_attn(x, x, x)
        expected = layer.norm2(
            (h := layer.norm1(x + attended)) + layer.linear2(layer.activation(layer.linear1(h)))
        )
    assert (out - expected).abs().max().item() <= 1e-10
    assert (out - dense_out).abs().max().item() > 1e-3


def test_extra_keys_are_refused_with_a_reason():
    for name in ("add_bias_kv", "add_zero_attn"):
        with pytest.raises(NotImplementedError, match=f"^{name}: an extra key"):
            RingMultiheadDilatedAttention(8, 2, (4,), (1,), **{name: True})


@pytest.mark.parametrize("average", [True, False])
def test_need_weights_are_nn_multihead_attentions_at_one_full_segment(rng, average):
    """need_weights=True (the default, as torch's): at w = n, r = 1 the weights are
    nn.MultiheadAttention's, averaged or per head."""
    n, e = 10, 16
    theirs = torch.nn.MultiheadAttention(e, 4, batch_first=True).double()
    randomise(theirs, seed=5)
    ours = RingMultiheadDilatedAttention(e, 4, (n,), (1,), batch_first=True).double()
    ours.load_state_dict(theirs.state_dict())
    x = randn(rng, 2, n, e)
    want_out, want = theirs(x, x, x, average_attn_weights=average)
    got_out, got = ours(x, x, x, average_attn_weights=average)
    assert got.shape == want.shape == ((2, n, n) if average else (2, 4, n, n))
    assert (got - want).abs().max().item() <= 1e-10
    assert (got_out - want_out).abs().max().item() <= 1e-10


def test_need_weights_times_v_is_the_output_for_dilated_patterns(rng):
    """For any patterns, W @ v per head is the attention output (before the output
    projection), rows of W sum to 1 or are 0 (a row with no key), and gradients flow."""
    from ringsim.gpu.nn.weights import dilated_attention_weights

    q, k, v = (randn(rng, 2, 14, 6, 3) for _ in range(3))
    q.requires_grad_(True)
    segs, rates = (4, 6, 14), (6, 3, 2)  # r > w: rows with no key
    weights = dilated_attention_weights(q, k, segs, rates, is_causal=True)
    out = torch.einsum("bhxy,byhd->bxhd", weights, v)
    want = reference(q.detach(), k, v, segs, rates, is_causal=True)
    assert max_abs_error(out.detach().numpy(), want) <= 1e-10
    sums = weights.sum(-1)
    assert ((sums - 1).abs() < 1e-12).logical_or(sums == 0).all() and (sums == 0).any()
    weights.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_need_weights_on_a_ring_is_refused(world_of_one):
    module = RingMultiheadDilatedAttention(8, 2, (4,), (1,), batch_first=True, group="default")
    x = torch.randn(1, 8, 8)
    assert module(x, x, x, need_weights=False)[1] is None
    with pytest.raises(NotImplementedError, match="need_weights: a ring rank"):
        module(x, x, x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_multihead_is_projection_then_the_definition(rng, mode, kv_heads):
    """num_kv_heads: K and V projected to fewer heads, each read by its block of query
    heads; the output is the projections, then the definition with grouped-query attention,
    then out_proj; the weights times v are the attention output; the state loads back."""
    e, h, d, n = 24, 6, 4, 15
    module = RingMultiheadDilatedAttention(e, h, (5, 15), (2, 3), num_kv_heads=kv_heads,
                                           mode=mode, batch_first=True).double()  # fmt: skip
    randomise(module, seed=7)
    assert module.k_proj_weight.shape == (kv_heads * d, e) and module.in_proj_weight is None
    assert module.in_proj_bias.shape == (e + 2 * kv_heads * d,)
    x = randn(rng, 2, n, e)
    out, weights = module(x, x, x, is_causal=True, average_attn_weights=False)
    assert max_abs_error(out.detach().numpy(), by_hand(module, x, x, x, True).numpy()) <= 1e-10
    assert weights.shape == (2, h, n, n)
    again = RingMultiheadDilatedAttention(e, h, (5, 15), (2, 3), num_kv_heads=kv_heads,
                                          mode=mode, batch_first=True).double()  # fmt: skip
    again.load_state_dict(module.state_dict())
    assert torch.equal(again(x, x, x, is_causal=True, need_weights=False)[0], out)


def test_num_kv_heads_is_checked():
    with pytest.raises(ValueError, match="num_kv_heads: must divide num_heads=6, got 4"):
        RingMultiheadDilatedAttention(24, 6, (4,), (1,), num_kv_heads=4)
    same = RingMultiheadDilatedAttention(24, 6, (4,), (1,), num_kv_heads=6)
    assert same.in_proj_weight is not None  # equal heads: nn.MultiheadAttention's state


def test_a_causal_attn_mask_is_causal_masking(rng):
    """nn.Transformer's causal masks (float -inf, or bool True, above the diagonal) mean
    is_causal=True, on the kernels' path; inside nn.TransformerEncoderLayer with src_mask
    too."""
    n, e = 12, 16
    module = RingMultiheadDilatedAttention(e, 4, (6, 12), (1, 2), batch_first=True).double()
    x = randn(rng, 2, n, e)
    want = module(x, x, x, is_causal=True, need_weights=False)[0]
    float_mask = torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)
    bool_mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    for mask in (float_mask, bool_mask):
        got = module(x, x, x, attn_mask=mask, need_weights=False)[0]
        assert torch.equal(got, want)
    layer = torch.nn.TransformerEncoderLayer(e, 4, dim_feedforward=32, dropout=0.0,
                                             batch_first=True).double()  # fmt: skip
    layer.self_attn = module
    with torch.no_grad():
        masked = layer(x, src_mask=float_mask, is_causal=True)
        by_flag = layer.norm2(layer.norm1(x + want) + layer._ff_block(layer.norm1(x + want)))
    assert (masked - by_flag).abs().max().item() <= 1e-12


def masks_of(rng, b, h, n):
    """A bool key padding mask (batch 0 keeps its first key) and attn masks of each kind
    nn.MultiheadAttention takes: 2-d and 3-d, bool and float."""
    pad = torch.from_numpy(rng.random((b, n)) < 0.3)
    pad[:, 0] = False  # nn.MultiheadAttention gives NaN on a row with no key
    pairs = torch.from_numpy(rng.random((n, n)) < 0.3).fill_diagonal_(False)
    per_head = torch.from_numpy(rng.random((b * h, n, n)) < 0.3)
    per_head[:, :, 0] = False
    floats = torch.from_numpy(rng.standard_normal((n, n)))
    return pad, [pairs, per_head, floats, floats.masked_fill(pairs, -torch.inf)]


@pytest.mark.parametrize("batch_first", [False, True])
def test_masks_at_one_full_segment_equal_nn_multihead_attention(rng, batch_first):
    """w = (n,), r = (1,): key_padding_mask (bool and float) and every kind of attn_mask
    give nn.MultiheadAttention's output and weights, forward and backward."""
    n, e, h = 10, 16, 4
    theirs = torch.nn.MultiheadAttention(e, h, batch_first=batch_first).double()
    randomise(theirs, seed=6)
    ours = RingMultiheadDilatedAttention(e, h, (n,), (1,), batch_first=batch_first).double()
    ours.load_state_dict(theirs.state_dict())
    x = randn(rng, 2, n, e) if batch_first else randn(rng, n, 2, e)
    pad, attn_masks = masks_of(rng, 2, h, n)
    float_pad = torch.zeros(pad.shape, dtype=torch.float64).masked_fill(pad, -torch.inf)
    for kpm in (None, pad, float_pad):
        for mask in (None, *attn_masks):
            with warnings.catch_warnings():  # torch: "mismatched key_padding_mask and ..."
                warnings.simplefilter("ignore", UserWarning)
                want = theirs(x, x, x, key_padding_mask=kpm, attn_mask=mask)
            got = ours(x, x, x, key_padding_mask=kpm, attn_mask=mask)
            for a, b in zip(got, want):
                assert (a - b).abs().max().item() <= 1e-10, (kpm is None, mask is None)
    xg = x.clone().requires_grad_()
    ours(xg, xg, xg, key_padding_mask=pad, attn_mask=attn_masks[1])[0].sum().backward()
    xt = x.clone().requires_grad_()
    theirs(xt, xt, xt, key_padding_mask=pad, attn_mask=attn_masks[1])[0].sum().backward()
    assert (xg.grad - xt.grad).abs().max().item() <= 1e-10


def test_an_attn_mask_of_key_columns_equals_the_key_padding_path(rng):
    """With dilated patterns, an attn_mask that masks whole key columns (the dense path)
    equals key_padding_mask (the kernels' gathered-rows path): two implementations."""
    n, e = 14, 24
    module = RingMultiheadDilatedAttention(e, 6, (4, 7, 14), (1, 2, 7), batch_first=True)
    module.double()
    x = randn(rng, 3, n, e)
    pad = torch.from_numpy(rng.random((3, n)) < 0.3)
    pad[0] = True  # rows with no key: 0
    columns = pad[:, None, :].expand(3, n, n).repeat_interleave(6, dim=0)  # (b*h, n, n)
    after = torch.ones(n, n, dtype=torch.bool).triu(1)
    for causal in (False, True):
        by_pad = module(x, x, x, key_padding_mask=pad, need_weights=False, is_causal=causal)[0]
        mask = columns | after if causal else columns  # a mask holds the causal part itself
        by_mask = module(x, x, x, attn_mask=mask, need_weights=False)[0]
        assert module.last_kernel.value == "math"
        assert (by_pad - by_mask).abs().max().item() <= 1e-12


def test_is_causal_with_a_mask_that_is_not_causal_is_refused(rng):
    """nn.MultiheadAttention takes is_causal as a hint that attn_mask is causal; eagerly it is
    checked here, and a wrong hint named."""
    module = RingMultiheadDilatedAttention(8, 2, (4,), (1,), batch_first=True)
    x = torch.randn(1, 8, 8)
    with pytest.raises(ValueError, match="attn_mask: is_causal=True says"):
        module(x, x, x, attn_mask=torch.zeros(8, 8, dtype=torch.bool), is_causal=True)


def test_grouped_query_on_a_ring_module(world_of_one, rng):
    """num_kv_heads with a group: the ring sends K/V heads; the output is the one device's."""
    kwargs = dict(num_kv_heads=2, batch_first=True)
    ring = RingMultiheadDilatedAttention(24, 6, (5, 15), (2, 3), group="default", **kwargs)
    alone = RingMultiheadDilatedAttention(24, 6, (5, 15), (2, 3), **kwargs).double()
    ring.double().load_state_dict(alone.state_dict())
    x = randn(rng, 2, 15, 24)
    want = alone(x, x, x, is_causal=True, need_weights=False)[0]
    got = ring(x, x, x, is_causal=True, need_weights=False)[0]
    assert (got - want).abs().max().item() <= 1e-12


def test_masks_on_a_ring_module(world_of_one):
    """With a group: key_padding_mask is the rank's shard; a general attn_mask is refused,
    a causal one is causal masking."""
    module = RingMultiheadDilatedAttention(8, 2, (4,), (1,), batch_first=True, group="default")
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    module.double()
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 2:] = True
    alone = RingMultiheadDilatedAttention(8, 2, (4,), (1,), batch_first=True).double()
    alone.load_state_dict(module.state_dict())
    want = alone(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    got = module(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    assert (got - want).abs().max().item() <= 1e-12
    with pytest.raises(NotImplementedError, match="attn_mask: a ring applies a causal mask"):
        module(x, x, x, attn_mask=torch.zeros(8, 8, dtype=torch.bool), need_weights=False)


@pytest.mark.parametrize("kind", ["bool 2-d", "float 2-d", "bool per head", "float per head"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_an_attn_mask_matches_the_definition_with_a_pair_bias(rng, kind, is_causal):
    """A general attn_mask on dilated patterns (the dense weights) against the NumPy
    definition with the same bias on each pair (spec §1), with key padding too."""
    from ringsim.gpu.nn.weights import dilated_attention_weights
    from ringsim.reference import dense_dilated_attention

    b, n, h, d = 2, 14, 6, 4
    q, k, v = (randn(rng, b, n, h, d) for _ in range(3))
    segs, rates = (4, 7, 14), (1, 2, 7)
    shape = (n, n) if "2-d" in kind else (b * h, n, n)
    if kind.startswith("bool"):
        mask = torch.from_numpy(rng.random(shape) < 0.3)
        bias = torch.zeros(shape, dtype=torch.float64).masked_fill(mask, -torch.inf)
    else:
        mask = bias = torch.from_numpy(rng.standard_normal(shape))
    pad = torch.from_numpy(rng.random((b, n)) < 0.2)
    weights = dilated_attention_weights(q, k, segs, rates, is_causal=is_causal,
                                        key_padding_mask=pad, attn_mask=mask)  # fmt: skip
    got = torch.einsum("bhxy,byhd->bxhd", weights, v)
    pair = bias.numpy() if bias.dim() == 2 else bias.numpy().reshape(b, h, n, n)
    want, _ = dense_dilated_attention(q.numpy(), k.numpy(), v.numpy(), segs, rates,
                                      is_causal=is_causal, key_padding_mask=pad.numpy(),
                                      attn_bias=pair)  # fmt: skip
    assert max_abs_error(got.numpy(), want) <= 1e-12
