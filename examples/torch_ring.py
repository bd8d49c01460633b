"""Ring dilated attention over ``torch.distributed`` (LongNet mode, forward only).

An independent, third-party style implementation (it does not import ringsim). The caller has
initialised the default process group (gloo on CPU works). Rank j of P holds the contiguous
shard of global positions [j*c, (j+1)*c) of q, k, v, tensors ``(batch, c, num_heads,
head_dim)``, so the sequence length is n = c * P. The K/V shards travel around the ring P - 1
times (``batch_isend_irecv``: send to rank + 1, receive from rank - 1, into a separate buffer).
For each block held, own first, every pattern attends the local queries to the block's keys
using the global positions of both and merges into a running (out, lse) per pattern; at the
end the patterns of each head are mixed by their log-sum-exps. Computed in float64; out is
returned in the dtype of q, lse ``(batch, num_heads, c)`` in float64.

Check it on 2 processes (gloo) with::

    torchrun --standalone --nproc-per-node 2 -m ringsim.conform \\
        examples/torch_ring.py:ring_attention --kind shard --backend torch --returns out,lse
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _mask(qpos, kpos, w, r, num_heads, n, is_causal):
    """(num_heads, cq, ck) mask of pattern (w, r, head mod r) between global positions."""
    w = min(w, n)
    offsets = (torch.arange(num_heads, device=qpos.device) % r)[:, None]
    qsel = (qpos % w % r)[None, :] == offsets  # (h, cq)
    ksel = (kpos % w % r)[None, :] == offsets  # (h, ck)
    mask = (qpos[:, None] // w == kpos[None, :] // w) & qsel[:, :, None] & ksel[:, None, :]
    if is_causal:
        mask &= kpos[None, :] <= qpos[:, None]
    return mask


def _lse_merge(lses):
    """Weights exp(lse_i - L) (p, ...) and L = log sum_i exp(lse_i); all -inf gives 0, -inf."""
    m = lses.amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wts = torch.exp(lses - m)
    tot = wts.sum(dim=0)
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    lse = torch.where(tot > 0, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return wts / safe, lse


def _attend(scores, mask, v):
    """Masked attention of scores (b, h, x, y) to v (b, y, h, d) -> out (b, x, h, d), lse."""
    s = scores.masked_fill(~mask, float("-inf"))
    probs, lse = _lse_merge(s.movedim(-1, 0))  # softmax over keys, safe for empty rows
    return torch.einsum("ybhx,byhd->bxhd", probs, v), lse


def _merge(outs, lses):
    """Merge partial results: outs (p, b, x, h, d), lses (p, b, h, x)."""
    wts, lse = _lse_merge(lses)
    return torch.einsum("pbhx,pbxhd->bxhd", wts, outs), lse


@torch.no_grad()
def ring_attention(q, k, v, segment_lengths, dilation_rates, is_causal=False):
    """This rank's shard of dilated attention: out ``(b, c, h, d)``, lse ``(b, h, c)``."""
    size, rank = dist.get_world_size(), dist.get_rank()
    b, c, h, d = q.shape
    n = c * size
    scale = d**-0.5
    q64 = q.to(torch.float64)
    qpos = rank * c + torch.arange(c, device=q.device)
    pairs = list(zip(segment_lengths, dilation_rates))
    run_out = [q64.new_zeros(b, c, h, d) for _ in pairs]
    run_lse = [q64.new_full((b, h, c), float("-inf")) for _ in pairs]

    kv = torch.stack([k, v]).to(torch.float64).contiguous()  # the block held: own first
    recv = torch.empty_like(kv)
    for step in range(size):
        source = (rank - step) % size  # the rank whose shard this block is
        kpos = source * c + torch.arange(c, device=q.device)
        scores = scale * torch.einsum("bxhd,byhd->bhxy", q64, kv[0])
        for i, (w, r) in enumerate(pairs):
            mask = _mask(qpos, kpos, w, r, h, n, is_causal)
            o, lse = _attend(scores, mask, kv[1])
            run_out[i], run_lse[i] = _merge(
                torch.stack([run_out[i], o]), torch.stack([run_lse[i], lse])
            )
        if step < size - 1:
            ops = [
                dist.P2POp(dist.isend, kv, (rank + 1) % size),
                dist.P2POp(dist.irecv, recv, (rank - 1) % size),
            ]
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            kv, recv = recv, kv

    out, lse = _merge(torch.stack(run_out), torch.stack(run_lse))
    return out.to(q.dtype), lse
