"""Multihead ring dilated attention with the interface of ``nn.MultiheadAttention`` (spec §8).

``query -> in-projection -> heads -> dilated attention -> [sub-LayerNorm] -> out_proj``.
The parameters are ``nn.MultiheadAttention``'s, by name and shape (``in_proj_weight``
``(3E, E)`` and ``in_proj_bias`` ``(3E)``, or ``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight`` when kdim or vdim differ from E; ``out_proj``), so a state dict loads
either way. The optional sub-LayerNorm and the gain of the value and output projections are
MAGNETO's (Wang et al. 2022, "Foundation Transformers", as torchscale's
``inner_attn_ln``); MAGNETO puts no LayerNorm on q or k (pitfall 16).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..executor import check_dropout_p, check_key_mask
from ..kernels import Kernel
from .modules import (
    RingDilatedAttention,
    check_bool,
    check_device,
    check_dtype,
)
from .weights import check_attn_mask, dilated_attention_weights, is_causal_mask

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")
    return int(value)


def check_gain(gamma_init: Any) -> float:
    if isinstance(gamma_init, bool) or not isinstance(gamma_init, numbers.Real):
        raise TypeError(f"gamma_init: expected a positive float, got {gamma_init!r}")
    if not (math.isfinite(gamma_init) and gamma_init > 0):
        raise ValueError(f"gamma_init: must be finite and > 0, got {gamma_init}")
    return float(gamma_init)


class RingMultiheadDilatedAttention(nn.Module):
    """Self-attention over one sequence, ``nn.MultiheadAttention``'s interface (spec §8).

    Args:
        embed_dim, num_heads: ``embed_dim % num_heads == 0``; head_dim is the quotient.
        segment_lengths, dilation_rates, dropout, mode, softmax_scale, kernel, group,
            layout, enable_memory_pool: as :class:`~ringsim.gpu.nn.modules.RingDilatedAttention`
            (``self.attention.memory_pool``; with a group,
            inputs and output are this rank's shards along the sequence, in ``layout``).
        bias: biases in the in-projection (``in_proj_bias``) and ``out_proj``.
        layer_norm: MAGNETO's sub-LayerNorm ``(embed_dim)`` on the attention output, before
            the output projection (``self.sub_layer_norm``; None when False, the default,
            as ``nn.MultiheadAttention`` has none).
        gamma_init: the Xavier gain of the value projection's and ``out_proj``'s weights
            (MAGNETO's gamma, applied whether or not ``layer_norm``); q and k get gain 1.
        batch_first: True: tensors are ``(batch, seq, embed_dim)``; False (the default, as
            ``nn.MultiheadAttention``'s): ``(seq, batch, embed_dim)``.
        kdim, vdim: the features of key and value (default embed_dim), as
            ``nn.MultiheadAttention``'s: other values make separate ``q_proj_weight``,
            ``k_proj_weight``, ``v_proj_weight``.
        num_kv_heads: grouped-query attention (default num_heads): K and V are projected to
            this many heads, a divisor of num_heads (1: multi-query), each read by
            ``num_heads / num_kv_heads`` query heads; the projections are separate
            (``k_proj_weight`` ``(num_kv_heads * head_dim, kdim)``) and ``in_proj_bias`` is
            ``(embed_dim + 2 * num_kv_heads * head_dim)``. On a ring the messages carry K/V
            heads, ``num_kv_heads / num_heads`` of the bytes.
        add_bias_kv, add_zero_attn: must be False: an extra key appended to the sequence has
            no position in the dilated pattern (``NotImplementedError``).
        device, dtype: of the parameters.

    ``nn.TransformerEncoderLayer``'s fast path would run dense attention with these
    weights: ``_qkv_same_embed_dim`` is False so that it is never taken.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths,
        dilation_rates,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = False,
        gamma_init: float = 1.0,
        batch_first: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        num_kv_heads: int | None = None,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        mode: str = "longnet",
        softmax_scale: float | None = None,
        kernel: Kernel | str | None = None,
        group: ProcessGroup | str | None = None,
        layout: str = "contiguous",
        enable_memory_pool: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.num_heads = check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim: must be divisible by num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        self.head_dim = embed_dim // num_heads
        self.batch_first = check_bool("batch_first", batch_first)
        self.gamma_init = check_gain(gamma_init)
        check_bool("bias", bias)
        check_bool("layer_norm", layer_norm)
        for name, value in (("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn)):
            if check_bool(name, value):
                raise NotImplementedError(
                    f"{name}: an extra key appended to the sequence has no position in the "
                    f"dilated pattern; pass {name}=False"
                )
        self.kdim = embed_dim if kdim is None else check_positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else check_positive_int("vdim", vdim)
        self.num_kv_heads = self._check_kv_heads(num_kv_heads)
        #: read by nn.TransformerEncoderLayer: False keeps its dense fast path away
        self._qkv_same_embed_dim = False
        device, dtype = check_device(device), check_dtype(dtype)
        self.attention = RingDilatedAttention(
            segment_lengths,
            dilation_rates,
            dropout=dropout,
            mode=mode,
            softmax_scale=softmax_scale,
            kernel=kernel,
            group=group,
            layout=layout,
            enable_memory_pool=enable_memory_pool,
        )
        self.attention.config.head_groups(num_heads)  # grouped mode: >= one head per pair

        factory = {"device": device, "dtype": dtype}

        def weight(*shape) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, **factory))

        e, e_kv = embed_dim, self.num_kv_heads * self.head_dim
        if self.kdim == e and self.vdim == e and e_kv == e:  # one fused in-projection, as torch's
            self.in_proj_weight = weight(3 * e, e)
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = weight(e, e)
            self.k_proj_weight = weight(e_kv, self.kdim)
            self.v_proj_weight = weight(e_kv, self.vdim)
        if bias:
            self.in_proj_bias = weight(e + 2 * e_kv)
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(e, e, bias=bias, **factory)
        self.sub_layer_norm = nn.LayerNorm(e, **factory) if layer_norm else None
        self.reset_parameters()

    def _check_kv_heads(self, num_kv_heads: Any) -> int:
        if num_kv_heads is None:
            return self.num_heads
        kv = check_positive_int("num_kv_heads", num_kv_heads)
        if self.num_heads % kv:
            raise ValueError(f"num_kv_heads: must divide num_heads={self.num_heads}, got {kv}")
        return kv

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k and v projection weights ``(E, E)``, ``(E_kv, kdim)``, ``(E_kv, vdim)``
        (views of ``in_proj_weight`` when kdim, vdim and ``E_kv = num_kv_heads * head_dim``
        are E)."""
        if self.in_proj_weight is not None:
            return tuple(self.in_proj_weight.chunk(3))  # type: ignore[return-value]
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def projection_biases(self) -> tuple[torch.Tensor | None, ...]:
        """The q, k and v projection biases ``(E)``, ``(E_kv)``, ``(E_kv)`` (views of
        ``in_proj_bias``), or Nones."""
        if self.in_proj_bias is None:
            return (None, None, None)
        e_kv = self.num_kv_heads * self.head_dim
        return tuple(self.in_proj_bias.split([self.embed_dim, e_kv, e_kv]))

    def reset_parameters(self) -> None:
        """Xavier-uniform weights (gain 1 for q and k, ``gamma_init`` for v and out_proj),
        each projection on its own ``(E, in)`` block; zero biases."""
        with torch.no_grad():
            for w, gain in zip(self.projection_weights(), (1.0, 1.0, self.gamma_init)):
                nn.init.xavier_uniform_(w, gain=gain)
            nn.init.xavier_uniform_(self.out_proj.weight, gain=self.gamma_init)
            for b in (self.in_proj_bias, self.out_proj.bias):
                if b is not None:
                    nn.init.zeros_(b)
        if self.sub_layer_norm is not None:
            self.sub_layer_norm.reset_parameters()

    @property
    def dropout(self) -> float:
        """The attention module's dropout probability (see its forward)."""
        return self.attention.dropout

    @property
    def last_kernel(self) -> Kernel | None:
        """The attention kernel of the last successful forward."""
        return self.attention.last_kernel

    def _check_inputs(self, query, key, value) -> None:
        layout = "(batch, seq, embed_dim)" if self.batch_first else "(seq, batch, embed_dim)"
        features = (("query", query, self.embed_dim), ("key", key, self.kdim),
                    ("value", value, self.vdim))  # fmt: skip
        for name, x, dim in features:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 3 or x.shape[-1] != dim:
                raise ValueError(
                    f"{name}: expected a 3-d tensor {layout} with {dim} features, "
                    f"got shape {tuple(x.shape)}"
                )
        for name, x in (("key", key), ("value", value)):
            if x.shape[:2] != query.shape[:2]:
                raise ValueError(
                    f"{name}: batch and sequence must equal query's (one sequence, spec §1), "
                    f"got shape {tuple(x.shape)} and {tuple(query.shape)}"
                )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend; the argument order is ``nn.MultiheadAttention.forward``'s.

        Args:
            query, key, value: ``(batch, seq, embed_dim)`` (``(seq, batch, embed_dim)`` if
                not batch_first), one shape, the parameters' dtype and device.
            key_padding_mask: ``(batch, seq)`` (with a group: this rank's shard of it), bool
                True = padding or float added to each key's scores, as
                ``nn.MultiheadAttention`` takes it: a padded position is never a key of any
                pattern; a row left with no key gives 0 (before ``out_proj``).
            attn_mask: None; or a causal mask as ``nn.MultiheadAttention`` takes it
                (``(seq, seq)``: bool True above the diagonal, or float ``-inf`` there and 0
                elsewhere, as ``nn.Transformer.generate_square_subsequent_mask`` makes it),
                which is causal masking by global position (``is_causal=True``) on every
                path; or any other ``(seq, seq)`` or ``(batch * heads, seq, seq)`` mask,
                bool True = never attend or float added to the score of a (query, key)
                pair, applied exactly where a pattern attends the pair. Such a mask runs the
                dense weights (:func:`~ringsim.gpu.nn.weights.dilated_attention_weights`,
                O(heads x seq²) time and memory, as ``nn.MultiheadAttention``'s own masked
                path) on one device; with a group it raises ``NotImplementedError``.
                Telling a mask from the causal one reads it (one host sync); under
                ``torch.compile`` pass ``is_causal=True`` with a causal mask (as
                ``nn.Transformer`` layers do when told ``is_causal``): the hint is then
                trusted, as ``nn.MultiheadAttention`` trusts it; eagerly it is checked.
            need_weights: also return the attention weights, as ``nn.MultiheadAttention``
                does (its default, True): the exact dilated weights W with ``out = W @ v``
                per head (:func:`~ringsim.gpu.nn.weights.dilated_attention_weights`), formed
                densely: ``(batch, heads, seq, seq)``, O(heads x seq²) time and memory. Pass
                False for long sequences (``nn.TransformerEncoderLayer`` does); with a group
                (a ring) True raises, as a rank holds only its rows. In training with
                dropout the weights are dropped (as ``nn.MultiheadAttention`` returns them)
                and the output is those weights times v.
            average_attn_weights: average the weights over heads: ``(batch, seq, seq)``.
            is_causal: causal masking by global position (unlike ``nn.MultiheadAttention``,
                no ``attn_mask`` is needed); with an ``attn_mask``, the hint that it is the
                causal mask (above).
        Returns:
            ``(out, weights)``, out shaped like query, weights None unless need_weights.
        """
        if check_bool("need_weights", need_weights) and self.attention.group is not None:
            raise NotImplementedError(
                "need_weights: a ring rank holds its own rows only, and the weights span the "
                "whole sequence; pass need_weights=False, or run without a group"
            )
        check_bool("average_attn_weights", average_attn_weights)
        self._check_inputs(query, key, value)
        b, n = query.shape[:2] if self.batch_first else query.shape[1::-1]
        if key_padding_mask is not None:
            check_key_mask(key_padding_mask, b, n, query.device)
        pair_mask = None  # a general attn_mask: the dense path
        if attn_mask is not None:
            if is_causal and torch.compiler.is_compiling():
                pass  # the hint is trusted, as nn.MultiheadAttention trusts it
            elif is_causal_mask(attn_mask, n):
                is_causal = True
            elif check_bool("is_causal", is_causal):
                raise ValueError(
                    "attn_mask: is_causal=True says attn_mask is the causal mask, but it is not; "
                    "pass the causal mask, or is_causal=False to apply this one"
                )
            else:
                ring = self.attention.group is not None
                pair_mask = check_attn_mask(attn_mask, b, self.num_heads, n, query.device, ring)
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        heads = [(b, n, h, self.head_dim) for h in (self.num_heads, *[self.num_kv_heads] * 2)]
        weights, biases = self.projection_weights(), self.projection_biases()
        q, k, v = (
            F.linear(x, w, bias).reshape(shape)  # (b, n, h, d); k, v: num_kv_heads heads
            for x, w, bias, shape in zip((query, key, value), weights, biases, heads)
        )
        attn = None
        p = self.attention.dropout_p
        # the dense weights: for them, for a mask of pairs, and for dropped weights returned
        dense = pair_mask is not None or (need_weights and p > 0)
        if need_weights or dense:
            c = self.attention.config
            attn = dilated_attention_weights(q, k, c.segment_lengths, c.dilation_rates,
                                             is_causal=is_causal, mode=c.mode.value,
                                             softmax_scale=c.softmax_scale,
                                             key_padding_mask=key_padding_mask,
                                             attn_mask=pair_mask)  # fmt: skip
            if p > 0:
                check_dropout_p(p)
                attn = F.dropout(attn, p)  # the weights returned are the ones applied
        if not dense:
            out = self.attention(q, k, v, is_causal, key_padding_mask)
        else:  # the exact weights times v: the one path that applies any mask to each pair
            values = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)
            out = (attn @ values.transpose(1, 2)).transpose(1, 2)  # (b, n, h, d)
            self.attention.last_kernel = Kernel.MATH
        out = out.reshape(b, n, self.embed_dim)
        if self.sub_layer_norm is not None:
            out = self.sub_layer_norm(out)  # MAGNETO's sub-LN, before the output projection
        out = self.out_proj(out)
        if attn is not None and need_weights:
            attn = attn.mean(dim=1) if average_attn_weights else attn
        else:
            attn = None
        return (out if self.batch_first else out.transpose(0, 1)), attn
