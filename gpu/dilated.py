"""Dilated attention on one device, in torch (SPEC 2-4, 6).

An aligned pair (``w'`` divides n, r divides ``w'``) runs each pattern group on strided
views of q, k, v and of the accumulators (:mod:`ringsim.gpu.strided`): no copies at all.
Otherwise :func:`ringsim.batches.row_batches` groups the selected rows of all the pair's
heads into as few kernel calls as possible: heads whose offsets select equally many rows
per segment share one call, segments become the batch, and a ragged last segment costs
one more call.
Rows are selected by global positions, so ragged segments, r > w and r not dividing w are
exact (no mask is needed: every block is FULL or the square CAUSAL diagonal).

On CUDA, when every pair is aligned, the calls' results are kept and mixed in one Triton
pass (:mod:`ringsim.gpu.aligned`, :func:`~ringsim.gpu.merge.mix_reason` says when).
Otherwise each call's ``(out, lse)`` is merged into float32 accumulators (float64 for
float64 input) at the rows it selected, with the stable LSE merge: rows a pattern does not
select are left alone, which is the same as merging ``(0, -inf)`` (PITFALLS 3, 6).
"""

from __future__ import annotations

import torch

from ringsim.batches import RowBatch, row_batches
from ringsim.config import DilatedConfig, validate
from ringsim.plan import pair_groups

from .aligned import aligned_forward
from .kernels import Kernel, attend, choose_kernel
from .merge import accumulator_dtype, merge_into, mix_reason
from .strided import all_strided, attend_strided, is_strided


def check_tensor(q) -> None:
    """The torch backend takes floating-point torch tensors."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"q: dtype must be floating point, got {q.dtype}")


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def check_differentiable(q, k, v, kernel: Kernel) -> None:
    """Refuse, before any work, a backward pass the kernel cannot run: FlexAttention has no
    backward that takes an external lse (:func:`~ringsim.gpu.kernels_backward.attend_backward`)."""
    if needs_grad(q, k, v) and kernel is Kernel.FLEX:
        raise NotImplementedError(
            "kernel: flex has no backward from an external lse; use flash, cudnn, efficient "
            "or math to train, or run under torch.no_grad()"
        )


def batch_index(batch: RowBatch, offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors of a row batch: rows ``(S*m, H)`` (minus ``offset``, the global position
    of row 0), heads ``(1, H)``; ``x[:, rows, heads]`` is ``(b, S*m, H, ...)``."""
    nh, segments, m = batch.shape
    rows = batch.rows.transpose(1, 2, 0).reshape(segments * m, nh) - offset
    heads = torch.as_tensor(batch.heads, device=device)[None, :]
    return torch.as_tensor(rows, device=device), heads


def batch_blocks(x: torch.Tensor, batch: RowBatch, rows, heads) -> torch.Tensor:
    """``x (b, n, h, *rest)`` -> the batch's rows as blocks ``(b*S, H, m, *rest)``: one gather
    (its transpose is a view, which the kernels take: last dim contiguous)."""
    nh, segments, m = batch.shape
    picked = x[:, rows, heads]  # (b, S*m, H, *rest)
    return picked.reshape(x.shape[0] * segments, m, nh, *x.shape[3:]).transpose(1, 2)


def unblock(x: torch.Tensor, b: int) -> torch.Tensor:
    """Blocks ``(b*S, H, m, *rest)`` -> ``(b, S*m, H, *rest)``, the inverse of batch_blocks."""
    bs, nh, m, *rest = x.shape
    return x.transpose(1, 2).reshape(b, bs // b * m, nh, *rest)


def attend_batch(
    q,
    k,
    v,
    out,
    lse,
    batch: RowBatch,
    *,
    causal: bool,
    scale: float,
    kernel: Kernel,
    offset: int = 0,
) -> None:
    """Attend one row batch and merge it into ``out (b, n, h, d)``, ``lse (b, n, h)``.

    ``offset`` is the global position of row 0 of q/k/v/out (a rank's shard start).
    """
    rows, heads = batch_index(batch, offset, q.device)
    block_out, block_lse = attend(
        *(batch_blocks(x, batch, rows, heads) for x in (q, k, v)),
        causal=causal,
        scale=scale,
        kernel=kernel,
    )
    b = q.shape[0]
    merge_into(out, lse, rows, heads, unblock(block_out, b), unblock(block_lse, b))


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths,
    dilation_rates,
    *,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    kernel: Kernel | str | None = None,
    cuda_graph: bool = False,
):
    """Dilated attention on one device (SPEC 6).

    Args:
        q, k, v: ``(batch, seq_len, num_heads, head_dim)`` floating-point tensors, one dtype
            and device.
        segment_lengths, dilation_rates, is_causal, mode, softmax_scale: as
            :func:`ringsim.reference.dilated_attention`.
        return_lse: also return lse ``(batch, num_heads, seq_len)``, float32 (float64 for
            float64 input), natural log, ``-inf`` on rows with no key.
        kernel: a :class:`~ringsim.gpu.kernels.Kernel` to use; by default the fastest that
            can run (:func:`~ringsim.gpu.kernels.choose_kernel`). Asking for one that cannot
            run raises ``ValueError`` with the reason.
        cuda_graph: replay the forward as a CUDA graph (:mod:`ringsim.gpu.graphs`): one
            launch instead of dozens, for a host too slow to issue them. Forward only,
            CUDA, aligned configurations; otherwise ``ValueError`` says why.
    Returns:
        out ``(batch, seq_len, num_heads, head_dim)`` in q's dtype [, lse].
    """
    config = validate(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        mode=mode,
        softmax_scale=softmax_scale,
    )
    check_tensor(q)
    chosen = choose_kernel(q, kernel)
    if cuda_graph:
        from .graphs import graph_refusal, graphed_forward

        refusal = graph_refusal(q, config, needs_grad(q, k, v))
        if refusal is not None:
            raise ValueError(f"cuda_graph: the graphed forward {refusal}")
        out, lse = graphed_forward(dilated_forward, q, k, v, config, chosen)
        return (out, lse.transpose(1, 2)) if return_lse else out
    check_differentiable(q, k, v, chosen)
    from .autograd import DilatedFunction

    out, lse = DilatedFunction.apply(q, k, v, config, chosen)
    return (out, lse) if return_lse else out


def dilated_forward(q, k, v, config: DilatedConfig, kernel: Kernel):
    """The forward on one device, no autograd: out ``(b, n, h, d)`` in q's dtype and the
    lse accumulator ``(b, n, h)`` (rows, then heads), float32 or float64."""
    b, n, h, d = q.shape
    if all_strided(config, n, h) and mix_reason(q) is None:
        return aligned_forward(q, k, v, config, kernel)
    acc, pairs = accumulator_dtype(q.dtype), pair_groups(config, h)
    # a first pair with r = 1 over every head writes every row and head on first touch:
    # then the accumulators need no initial fill
    covered = (
        all(is_strided(g, n) for g in pairs[0])
        and config.dilation_rates[0] == 1
        and (sorted(x for g in pairs[0] for x in g.heads) == list(range(h)))
    )
    alloc = torch.empty if covered else torch.zeros
    out = alloc(b, n, h, d, dtype=acc, device=q.device)
    lse = alloc(b, n, h, dtype=acc, device=q.device)  # rows, then heads
    if not covered:
        lse.fill_(-torch.inf)
    touched: set[int] = set()  # heads some earlier pair already wrote
    common = dict(causal=config.is_causal, scale=config.scale(d), kernel=kernel)
    for groups in pairs:
        if all(is_strided(g, n) for g in groups):  # aligned: views, no copies
            for g in groups:
                attend_strided(q, k, v, out, lse, g, fresh=touched.isdisjoint(g.heads), **common)
        else:  # ragged: gather the selected rows, one call per row batch
            for batch in row_batches(groups, n):
                attend_batch(q, k, v, out, lse, batch, **common)
        touched.update(h_ for g in groups for h_ in g.heads)
    return out.to(q.dtype), lse
