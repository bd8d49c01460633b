"""RingMultiheadDilatedAttention inside PyTorch's Transformer layers, and under torch.compile.

At one full segment (w = n, r = 1) dilated attention is plain attention, so a model whose
``nn.MultiheadAttention`` modules are swapped for ours (state loaded) must compute what the
stock model computes: encoder and decoder layers and ``nn.Transformer``, in training and
eval, with and without ``no_grad``, with key padding and causal masks; and it must train
the same, step by step. With dilated patterns, ``torch.compile(fullgraph=True)`` runs the
layer without graph breaks or recompiles and gives the eager result.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

from ringsim.gpu import RingMultiheadDilatedAttention  # noqa: E402

E, HEADS, N, BATCH = 16, 4, 10, 3


def swapped(model: torch.nn.Module, segments=(N,), rates=(1,)) -> torch.nn.Module:
    """A copy of ``model`` with every ``nn.MultiheadAttention`` replaced by ours, its state
    loaded, same batch_first."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.MultiheadAttention):
            ours = RingMultiheadDilatedAttention(
                module.embed_dim, module.num_heads, segments, rates,
                batch_first=module.batch_first, dropout=module.dropout,
            ).to(module.out_proj.weight.dtype)  # fmt: skip
            ours.load_state_dict(module.state_dict())
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, ours)
    return model


def inputs(seed: int = 0):
    """x (BATCH, N, E) float64, a padding mask (each batch element keeps its first key) and
    the causal mask, bool (nn.Transformer warns on mixed mask types)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, N, E, generator=g, dtype=torch.float64)
    pad = torch.rand(BATCH, N, generator=g) < 0.3
    pad[:, 0] = False
    causal = torch.ones(N, N, dtype=torch.bool).triu(1)
    return x, pad, causal


def encoder_layer():
    torch.manual_seed(1)
    return torch.nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0,
                                            batch_first=True).double()  # fmt: skip


def decoder_layer():
    torch.manual_seed(2)
    return torch.nn.TransformerDecoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0,
                                            batch_first=True).double()  # fmt: skip


def transformer():
    torch.manual_seed(3)
    model = torch.nn.Transformer(E, HEADS, num_encoder_layers=2, num_decoder_layers=2,
                                 dim_feedforward=32, dropout=0.0, batch_first=True)  # fmt: skip
    return model.double()


def calls(x, pad, causal):
    """Each model and the ways a user calls it: (name, factory, call(model))."""
    y = torch.flip(x, dims=[1])
    return [
        ("encoder", encoder_layer, lambda m: m(x, src_key_padding_mask=pad)),
        ("encoder causal", encoder_layer,
         lambda m: m(x, src_mask=causal, src_key_padding_mask=pad, is_causal=True)),
        ("decoder", decoder_layer,
         lambda m: m(y, x, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=pad,
                     memory_key_padding_mask=pad)),
        ("transformer", transformer,
         lambda m: m(x, y, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=pad,
                     tgt_key_padding_mask=pad, memory_key_padding_mask=pad)),
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["train", "eval", "eval no_grad"])
def test_swapped_models_compute_the_stock_models_output(mode):
    x, pad, causal = inputs()
    for name, factory, call in calls(x, pad, causal):
        stock = factory().train(mode == "train")
        ours = swapped(stock).train(mode == "train")
        with torch.no_grad() if mode == "eval no_grad" else contextlib.nullcontext():
            want, got = call(stock), call(ours)
        assert (got - want).abs().max().item() <= 1e-10, (name, mode)
        if mode == "train":
            got.sum().backward()
            want.sum().backward()
            for (pname, a), (_, b) in zip(ours.named_parameters(), stock.named_parameters()):
                assert (a.grad - b.grad).abs().max().item() <= 1e-10, (name, pname)


def test_a_model_trains_as_with_nn_multihead_attention():
    """Two identical encoders, stock and swapped, trained 8 steps with Adam on one batch
    with padding and causal masks: the same losses and the same weights."""
    torch.manual_seed(4)
    stock = torch.nn.TransformerEncoder(encoder_layer(), num_layers=2,
                                        enable_nested_tensor=False).double()  # fmt: skip
    ours = swapped(stock)
    head = torch.nn.Linear(E, 1).double()
    heads = (head, copy.deepcopy(head))
    models = (stock, ours)
    optimisers = [torch.optim.Adam([*m.parameters(), *h.parameters()], lr=1e-2)
                  for m, h in zip(models, heads)]  # fmt: skip
    losses: tuple[list[float], list[float]] = ([], [])
    x, pad, causal = inputs(seed=10)
    target = x.sum(-1, keepdim=True).tanh()
    for _ in range(8):
        for model, h, opt, record in zip(models, heads, optimisers, losses):
            opt.zero_grad()
            out = h(model(x, mask=causal, src_key_padding_mask=pad, is_causal=True))
            loss = ((out - target)[~pad] ** 2).mean()
            loss.backward()
            opt.step()
            record.append(loss.item())
    assert max(abs(a - b) for a, b in zip(*losses)) <= 1e-9
    assert losses[0][-1] < losses[0][0]  # it did train
    for (name, a), (_, b) in zip(ours.named_parameters(), stock.named_parameters()):
        assert (a - b).abs().max().item() <= 1e-8, name


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_torch_compile_has_no_graph_break_and_no_recompile(training, device):
    """Dilated patterns in an encoder layer: fullgraph=True (a graph break raises), three
    calls with error_on_recompile, the eager output, and no warning from this package
    (CUDA: bf16, the efficient kernel for the padding mask)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    layer = swapped(encoder_layer(), segments=(5, N), rates=(1, 2)).train(training)
    layer = layer.to(device, dtype)
    x, pad, causal = (t.to(device) for t in inputs())
    x = x.to(dtype)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                with contextlib.nullcontext() if training else torch.no_grad():
                    got = compiled(x, src_mask=causal, src_key_padding_mask=pad, is_causal=True)
                    if training:
                        got.sum().backward()
    ours = [str(w.message) for w in caught if "ringsim" in str(w.filename) or "lru_cache" in
            str(w.message)]  # fmt: skip
    assert not ours, ours
    with torch.no_grad():
        want = layer(x, src_mask=causal, src_key_padding_mask=pad, is_causal=True)
    assert (got.detach() - want).abs().max().item() <= (1e-5 if device == "cpu" else 5e-2)
