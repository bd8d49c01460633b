"""What :mod:`ringsim.gpu.harness.bench` compares ours with, and how it counts FLOPs.

Every builder does its set-up (gathers, transposes, block masks) outside the timed region
and returns a closure that runs only what is timed; the closures of the comparison rows
return ``out (b, n, h, d)`` so the benchmark can check that they compute the same function.

- pre-gathered: the same kernel on the already-gathered blocks of every pair, exactly the
  calls ``dilated_attention`` makes (:func:`ringsim.batches.row_batches`), without its
  gathers, scatters and merges: the floor of our overhead.
- dense: the same kernel on the full ``n x n`` problem (causal or not).
- naive: what a user typically writes (torchscale's ``DilatedAttention`` shape): for each
  pair, view the sequence as segments, slice ``[:, :, offset::r, offset::r]`` (rows and, in
  longnet mode, the heads with ``h mod r == offset``), one kernel call per offset with the
  lse (the same adapter, since SDPA does not return it), scatter into a zero
  ``(b, n, h, d)`` per pair, then mix as torchscale does: ``softmax`` over the pairs' lse,
  weights cast to q's dtype, ``out += o_i * w_i``. Needs ``n % w' == 0`` for every pair.
- flex: one FlexAttention call per pair over the whole sequence, its ``BlockMask`` built
  from the block structure (segment and causal, not the O(n^2) mask), the dilation in its
  ``mask_mod`` (same segment, both selected, causal), then the same mixing. It visits every
  128x128 block of a segment and masks inside: its time shows what block sparsity gives.
  The pair's ``(w', r, causal)`` is read from a tensor so one compiled graph serves all
  pairs of one length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ringsim.batches import row_batches
from ringsim.config import DilatedConfig
from ringsim.plan import pair_groups

from ..kernels import Kernel, attend, compiled_flex


def useful_flops(config: DilatedConfig, b: int, n: int, h: int, d: int) -> int:
    """FLOPs of the selected (query, key) pairs only: ``4 d`` per pair (QK^T and PV), summed
    over every kernel call of every pattern; causal counts ``m (m + 1) / 2`` per segment."""
    pairs = 0
    for groups in pair_groups(config, h):
        for batch in row_batches(groups, n):
            heads, segments, m = batch.shape
            pairs += heads * segments * (m * (m + 1) // 2 if config.is_causal else m * m)
    return 4 * b * d * pairs


def dense_flops(b: int, n: int, h: int, d: int, causal: bool) -> int:
    """FLOPs of full attention: ``4 b h d`` per (query, key) pair."""
    return 4 * b * h * d * (n * (n + 1) // 2 if causal else n * n)


def gathered_blocks(q, k, v, config: DilatedConfig) -> list[tuple[torch.Tensor, ...]]:
    """The ``(q, k, v)`` blocks of every kernel call of ``dilated_attention``, gathered into
    new contiguous ``(B, H, m, d)`` tensors."""
    b, n, h, d = q.shape
    blocks = []
    for groups in pair_groups(config, h):
        for batch in row_batches(groups, n):
            nh, segments, m = batch.shape
            rows = torch.as_tensor(batch.rows.reshape(nh, segments * m), device=q.device)
            heads = torch.as_tensor(batch.heads, device=q.device)[:, None]

            def gather(x, rows=rows, heads=heads, nh=nh, segments=segments, m=m):
                x = x[:, rows, heads].reshape(b, nh, segments, m, d)  # (b, H, S, m, d)
                return x.transpose(1, 2).reshape(b * segments, nh, m, d).contiguous()

            blocks.append((gather(q), gather(k), gather(v)))
    return blocks


def pregathered(q, k, v, config: DilatedConfig, kernel: Kernel) -> Callable[[], None]:
    """The kernel calls of ``dilated_attention`` on blocks gathered beforehand."""
    blocks = gathered_blocks(q, k, v, config)
    scale, causal = config.scale(q.shape[-1]), config.is_causal

    def run() -> None:
        for qb, kb, vb in blocks:
            attend(qb, kb, vb, causal=causal, scale=scale, kernel=kernel)

    return run


def dense_heads(n: int, h: int, dense_max: int) -> int:
    """Heads of the dense anchor at length ``n``: every head up to ``dense_max``, past it as
    few as keep its work that of ``dense_max`` (``h (dense_max / n)^2``, at least 1): a dense
    call at 1M tokens on 16 heads takes 15 s, and the throughput per head is flat once the
    grid fills the GPU."""
    return h if n <= dense_max else max(1, h * dense_max**2 // n**2)


def dense(q, k, v, config: DilatedConfig, kernel: Kernel) -> Callable[[], torch.Tensor]:
    """Full attention of the whole sequence with ``kernel``."""
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (b, h, n, d)
    scale, causal = config.scale(q.shape[-1]), config.is_causal
    return lambda: attend(qt, kt, vt, causal=causal, scale=scale, kernel=kernel)[0]


def torchscale_mix(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """``outs[i] (b, n, h, d)``, ``lses[i] (b, h, n)``: softmax of the lse over the pairs as
    weights, cast to the outputs' dtype (as torchscale does). A row that no pair selects gets
    NaN here; the benchmark's first pair has r = 1, so none is empty."""
    weights = torch.softmax(torch.stack(lses), dim=0).transpose(2, 3)[..., None]  # (k,b,n,h,1)
    out = outs[0] * weights[0].to(outs[0].dtype)
    for o, w in zip(outs[1:], weights[1:]):
        out += o * w.to(o.dtype)
    return out


def naive(q, k, v, config: DilatedConfig, kernel: Kernel) -> Callable[[], torch.Tensor]:
    """The typical hand-written longnet-mode version (module docstring)."""
    b, n, h, d = q.shape
    scale, causal = config.scale(d), config.is_causal
    widths = config.effective_segment_lengths(n)
    if any(n % w for w in widths) or config.mode.value != "longnet":
        raise ValueError("naive baseline: longnet mode with every w' dividing n only")

    def run() -> torch.Tensor:
        outs, lses = [], []
        for w, r in zip(widths, config.dilation_rates):
            out = torch.zeros_like(q)
            lse = torch.full((b, h, n), -math.inf, device=q.device)
            out_view, lse_view = out.view(b, n // w, w, h, d), lse.view(b, h, n // w, w)
            for off in range(min(r, h)):
                pick = [x.view(b, n // w, w, h, d)[:, :, off::r, off::r] for x in (q, k, v)]
                _, segs, m, heads, _ = pick[0].shape
                blocks = [x.reshape(b * segs, m, heads, d).transpose(1, 2) for x in pick]
                o, l_ = attend(*blocks, causal=causal, scale=scale, kernel=kernel)
                out_view[:, :, off::r, off::r] = o.transpose(1, 2).reshape(b, segs, m, heads, d)
                lse_view[:, off::r, :, off::r] = l_.reshape(b, segs, heads, m).transpose(1, 2)
            outs.append(out)
            lses.append(lse)
        return torchscale_mix(outs, lses)

    return run


def _block_lists(n: int, w: int, r: int, causal: bool, block: int, device):
    """For each 128-row query block: candidate kv blocks ``(Q, W)`` and which are valid and
    which are full (no mask needed: r = 1, one segment, not cut by the causal edge)."""
    nb = -(-n // block)
    q_start = torch.arange(nb, device=device) * block
    q_last = torch.clamp(q_start + block, max=n) - 1
    seg_lo = (q_start // w) * w  # first segment the query block touches
    seg_hi = torch.clamp((q_last // w + 1) * w, max=n) - 1  # last row of its last segment
    kv_lo, kv_hi = seg_lo // block, seg_hi // block
    if causal:
        kv_hi = torch.minimum(kv_hi, q_last // block)
    width = int((kv_hi - kv_lo).max()) + 1
    cand = kv_lo[:, None] + torch.arange(width, device=device)[None, :]
    valid = cand <= kv_hi[:, None]
    k_start, k_last = cand * block, torch.clamp(cand * block + block, max=n) - 1
    one_segment = (q_start // w == q_last // w)[:, None] & (k_start // w == q_start[:, None] // w)
    one_segment &= k_last // w == k_start // w
    full = valid & one_segment & (r == 1)
    if causal:
        full &= k_last <= q_start[:, None]
    return cand.clamp(max=nb - 1), valid, full


def _compact(cand: torch.Tensor, keep: torch.Tensor, width: int):
    """``(1, 1, Q)`` counts and ``(1, 1, Q, width)`` indices, kept blocks first."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    indices = torch.gather(cand, 1, order)
    pad = width - indices.shape[1]
    indices = torch.nn.functional.pad(indices, (0, pad))
    return keep.sum(1).to(torch.int32)[None, None], indices.to(torch.int32)[None, None]


def flex(q, k, v, config: DilatedConfig, compiled: bool) -> Callable[[], torch.Tensor]:
    """One FlexAttention call per pair with a dilated block mask (module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    n, d = q.shape[1], q.shape[3]
    block, device = 128, q.device
    params = torch.zeros(3, dtype=torch.int32, device=device)  # (w', r, causal) of the pair

    def mask_mod(b_, h_, q_idx, kv_idx):
        w, r = params[0], params[1]
        q_seg, k_seg = q_idx // w, kv_idx // w
        selected = ((q_idx - q_seg * w) % r == h_ % r) & ((kv_idx - k_seg * w) % r == h_ % r)
        return (q_seg == k_seg) & selected & ((params[2] == 0) | (kv_idx <= q_idx))

    widths = config.effective_segment_lengths(n)
    lists = [
        _block_lists(n, w, r, config.is_causal, block, device)
        for w, r in zip(widths, config.dilation_rates)
    ]
    width = -(-n // block)  # BlockMask wants one column per kv block (and one shape: one compile)
    masks, pair_params = [], []
    for (cand, valid, full), w, r in zip(lists, widths, config.dilation_rates):
        partial = _compact(cand, valid & ~full, width)
        whole = _compact(cand, full, width)
        masks.append(
            BlockMask.from_kv_blocks(
                *partial, *whole, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(n, n)
            )
        )
        pair_params.append(torch.tensor([w, r, int(config.is_causal)], dtype=torch.int32))
    pair_params = [p.to(device) for p in pair_params]
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (b, h, n, d)
    call = compiled_flex() if compiled else flex_attention
    scale = config.scale(d)

    def run() -> torch.Tensor:
        outs, lses = [], []
        for mask, p in zip(masks, pair_params):
            params.copy_(p)
            out, lse = call(qt, kt, vt, block_mask=mask, scale=scale, return_lse=True)
            outs.append(out.transpose(1, 2))
            lses.append(lse.float())
        return torchscale_mix(outs, lses)

    return run
