"""Helpers of the module tests: float64 inputs, the NumPy definition of a module's attention,
and the multihead module computed by hand."""

from __future__ import annotations

import numpy as np
import torch

from ringsim.reference import dense_dilated_attention


def randn(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape))  # float64


def reference(q, k, v, segs, rates, **kwargs) -> np.ndarray:
    arrays = (x.detach().numpy() for x in (q, k, v))
    return dense_dilated_attention(*arrays, segs, rates, **kwargs)[0]


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random biases and LayerNorm parameters, so the hand computation can tell them apart."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def by_hand(module, query, key, value, is_causal: bool) -> torch.Tensor:
    """projections -> heads -> the NumPy definition -> LayerNorm -> out_proj, float64."""
    if not module.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    b, n, e = query.shape

    def proj(weight, bias, x):
        y = x @ weight.detach().T
        return y if bias is None else y + bias.detach()

    q, k, v = (
        proj(w, bias, x).reshape(b, n, -1, module.head_dim)  # k, v: num_kv_heads heads
        for w, bias, x in zip(
            module.projection_weights(), module.projection_biases(), (query, key, value)
        )
    )
    c = module.attention.config
    out = reference(
        q, k, v, c.segment_lengths, c.dilation_rates, is_causal=is_causal, mode=c.mode.value
    )
    out = torch.from_numpy(out).reshape(b, n, e)
    norm = module.sub_layer_norm
    if norm is not None:
        mean, var = out.mean(-1, keepdim=True), out.var(-1, unbiased=False, keepdim=True)
        out = (out - mean) / torch.sqrt(var + norm.eps) * norm.weight.detach() + norm.bias.detach()
    out = proj(module.out_proj.weight, module.out_proj.bias, out)
    return out if module.batch_first else out.transpose(0, 1)
