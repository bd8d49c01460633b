"""Ring dilated attention over MPI (mpi4py), one function called on every rank (LongNet mode).

An independent, third-party style implementation (it does not import ringsim). Rank j of
P = ``MPI.COMM_WORLD.size`` holds the contiguous shard of global positions [j*c, (j+1)*c) of
q, k, v, arrays ``(batch, c, num_heads, head_dim)``, so the sequence length is n = c * P. The
K/V shards travel around the ring P - 1 times (``Sendrecv``: send to rank + 1, receive from
rank - 1). For each block held, own first, every pattern attends the local queries to the
block's keys using the global positions of both, and merges the partial result into a running
(out, lse) per pattern; at the end the patterns of each head are mixed by their log-sum-exps.
Internals are float64; out is returned in the dtype of q, lse ``(batch, num_heads, c)`` float64.

Check it on 4 ranks with::

    mpiexec -n 4 python -m mpi4py -m ringsim.conform examples/mpi_ring.py:ring_attention \\
        --kind shard --returns out,lse
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI


def _mask(qpos, kpos, w, r, num_heads, n, is_causal):
    """(num_heads, cq, ck) mask of pattern (w, r, head mod r) between global positions."""
    w = min(w, n)
    offsets = (np.arange(num_heads) % r)[:, None]
    qsel = (qpos % w % r)[None, :] == offsets  # (h, cq)
    ksel = (kpos % w % r)[None, :] == offsets  # (h, ck)
    mask = (qpos[:, None] // w == kpos[None, :] // w) & qsel[:, :, None] & ksel[:, None, :]
    if is_causal:
        mask &= kpos[None, :] <= qpos[:, None]
    return mask


def _attend(scores, mask, v):
    """Masked softmax of scores (b, h, x, y) applied to v (b, y, h, d); empty rows give 0, -inf."""
    s = np.where(mask, scores, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    tot = p.sum(axis=-1)
    safe = np.where(tot > 0, tot, 1.0)
    out = np.einsum("bhxy,byhd->bxhd", p, v) / safe.transpose(0, 2, 1)[..., None]
    return out, np.where(tot > 0, m[..., 0] + np.log(safe), -np.inf)


def _merge(outs, lses):
    """Stable merge of partial results: outs (p, b, x, h, d), lses (p, b, h, x)."""
    m = lses.max(axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    wts = np.exp(lses - m)  # (p, b, h, x)
    tot = wts.sum(axis=0)
    safe = np.where(tot > 0, tot, 1.0)
    out = np.einsum("pbhx,pbxhd->bxhd", wts, outs) / safe.transpose(0, 2, 1)[..., None]
    return out, np.where(tot > 0, m + np.log(safe), -np.inf)


def ring_attention(q, k, v, segment_lengths, dilation_rates, *, is_causal=False):
    """This rank's shard of dilated attention: out ``(b, c, h, d)``, lse ``(b, h, c)``."""
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    b, c, h, d = q.shape
    n = c * size
    scale = 1.0 / np.sqrt(d)
    q64 = np.asarray(q, dtype=np.float64)
    qpos = rank * c + np.arange(c)
    pairs = list(zip(segment_lengths, dilation_rates))
    run_out = [np.zeros((b, c, h, d)) for _ in pairs]
    run_lse = [np.full((b, h, c), -np.inf) for _ in pairs]

    kv = np.ascontiguousarray(np.stack([k, v]), dtype=np.float64)  # the block held: own first
    recv = np.empty_like(kv)
    for step in range(size):
        source = (rank - step) % size  # the rank whose shard this block is
        kpos = source * c + np.arange(c)
        scores = scale * np.einsum("bxhd,byhd->bhxy", q64, kv[0])
        for i, (w, r) in enumerate(pairs):
            mask = _mask(qpos, kpos, w, r, h, n, is_causal)
            o, lse = _attend(scores, mask, kv[1])
            run_out[i], run_lse[i] = _merge(np.stack([run_out[i], o]), np.stack([run_lse[i], lse]))
        if step < size - 1:
            comm.Sendrecv(kv, dest=(rank + 1) % size, recvbuf=recv, source=(rank - 1) % size)
            kv, recv = recv, kv

    out, lse = _merge(np.stack(run_out), np.stack(run_lse))
    return out.astype(q.dtype, copy=False), lse
