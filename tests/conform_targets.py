"""Third-party functions for the conformance tests: right ones, the mutants wrapped as someone
else's code, and functions that misbehave (raise, wrong shape or dtype, NaN, hang).

The ring functions run on the ranks of ``mpiexec`` (ringsim's own per-rank ring over
mpi4py) or ``torchrun`` (ringsim.gpu's ring over torch.distributed); the conformance suite
imports this file by path on every rank.
"""

from __future__ import annotations

import threading

import numpy as np

from ringsim.conformance.conventions import CONVENTIONS
from ringsim.conformance.mutants import MUTANTS
from ringsim.conformance.patching import applied
from ringsim.conformance.ring_mutants import RING_MUTANTS
from ringsim.reference import dilated_attention, ring_dilated_attention_shard


def correct(q, k, v, segment_lengths, dilation_rates, **kwargs):
    """(out, lse) of the reference: what a right implementation returns."""
    return dilated_attention(q, k, v, segment_lengths, dilation_rates, **kwargs, return_lse=True)


def out_only(q, k, v, segment_lengths, dilation_rates, **kwargs):
    return correct(q, k, v, segment_lengths, dilation_rates, **kwargs)[0]


def mutated(name: str):
    """The reference with one mutant (or peer convention) in place, as a user's function."""
    mutant = {**MUTANTS, **CONVENTIONS}[name]

    def attention(q, k, v, segment_lengths, dilation_rates, **kwargs):
        with applied(mutant):
            return correct(q, k, v, segment_lengths, dilation_rates, **kwargs)

    return attention


# --- misbehaving functions --------------------------------------------------------------------


def raises(q, k, v, segment_lengths, dilation_rates, **kwargs):
    raise RuntimeError("my kernel is not built")


def wrong_shape(q, k, v, segment_lengths, dilation_rates, **kwargs):
    return out_only(q, k, v, segment_lengths, dilation_rates, **kwargs)[:, :-1]


def wrong_dtype(q, k, v, segment_lengths, dilation_rates, **kwargs):
    return out_only(q, k, v, segment_lengths, dilation_rates, **kwargs).astype(np.float32)


def nan_rows(q, k, v, segment_lengths, dilation_rates, **kwargs):
    out = out_only(q, k, v, segment_lengths, dilation_rates, **kwargs).copy()
    out[:, -1] = np.nan
    return out


def pair(q, k, v, segment_lengths, dilation_rates, **kwargs):
    """Returns (out, lse) where out alone was declared."""
    return correct(q, k, v, segment_lengths, dilation_rates, **kwargs)


RELEASE = threading.Event()  # set by the test that hangs, to let the thread end


def hangs(q, k, v, segment_lengths, dilation_rates, **kwargs):
    RELEASE.wait(60)
    return out_only(q, k, v, segment_lengths, dilation_rates, **kwargs)


# --- one rank of a ring -------------------------------------------------------------------


def mpi_ring(q, k, v, segment_lengths, dilation_rates, *, layout="contiguous", timeout=20.0,
             **kwargs):  # fmt: skip
    """ringsim's per-rank ring over mpi4py's COMM_WORLD, as a user's ring."""
    from ringsim.comm import MPICommunicator

    return ring_dilated_attention_shard(
        q, k, v, segment_lengths, dilation_rates, comm=MPICommunicator(timeout=timeout),
        **kwargs, layout=layout, return_lse=True,
    )  # fmt: skip


def _mutated_ring(name: str):
    def ring(q, k, v, segment_lengths, dilation_rates, **kwargs):
        with applied(RING_MUTANTS[name]):
            return mpi_ring(q, k, v, segment_lengths, dilation_rates, **kwargs)

    return ring


ring_shard_relative = _mutated_ring("shard-relative-dilation")
ring_triangle_every_step = _mutated_ring("triangle-every-step")
ring_late_chunk_first = _mutated_ring("late-chunk-first")


def ring_raises_on_rank_one(q, k, v, segment_lengths, dilation_rates, **kwargs):
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 1:
        raise RuntimeError("rank 1 lost its kernel")
    return mpi_ring(q, k, v, segment_lengths, dilation_rates, **kwargs, timeout=2.0)


def ring_sleeps_on_rank_one(q, k, v, segment_lengths, dilation_rates, **kwargs):
    """Rank 1 never joins the ring (for the per-case time limit)."""
    import time

    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 1:
        time.sleep(60)
    return mpi_ring(q, k, v, segment_lengths, dilation_rates, **kwargs)


def torch_ring(q, k, v, segment_lengths, dilation_rates, **kwargs):
    """ringsim.gpu's ring over the default torch.distributed group, as a user's ring."""
    from ringsim.gpu import ring_dilated_attention

    return ring_dilated_attention(q, k, v, segment_lengths, dilation_rates, **kwargs,
                                  return_lse=True)  # fmt: skip


def _torch_reference(backward_mutant: str | None):
    """The reference as a torch function with a hand-written backward: the chain-rule
    gradients, with ``backward_mutant`` in place while they are computed."""
    import torch

    from ringsim.conformance.diagnosis import chain_gradients
    from ringsim.conformance.mutants import BACKWARD_MUTANTS
    from ringsim.conformance.patching import Mutant

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, case):
            ctx.save_for_backward(q, k, v)
            ctx.case = case
            arrays = [x.detach().numpy() for x in (q, k, v)]
            out, _ = correct(*arrays, case.segment_lengths, case.dilation_rates, **case.kwargs())
            return torch.from_numpy(out)

        @staticmethod
        def backward(ctx, dout):
            arrays = [x.detach().numpy() for x in ctx.saved_tensors]
            none = Mutant(None, "none", lambda patcher: None)
            with applied(BACKWARD_MUTANTS[backward_mutant] if backward_mutant else none):
                grads = chain_gradients(ctx.case, *arrays, dout.numpy())
            return (*(torch.from_numpy(g) for g in grads), None)

    def attention(q, k, v, segment_lengths, dilation_rates, **kwargs):
        from ringsim.cases import Case

        b, n, h, d = q.shape
        case = Case(b, n, h, d, tuple(segment_lengths), tuple(dilation_rates), **kwargs)
        return Attention.apply(q, k, v, case)

    return attention


torch_reference = _torch_reference(None)
torch_detached_weights = _torch_reference("detached_mixing_weights")


def torch_single(q, k, v, segment_lengths, dilation_rates, **kwargs):
    """ringsim.gpu's single-device path, as a user's function (any device)."""
    from ringsim.gpu import dilated_attention as gpu_dilated_attention

    return gpu_dilated_attention(q, k, v, segment_lengths, dilation_rates, **kwargs,
                                 return_lse=True)  # fmt: skip


def kv_heads_modulo(q, k, v, segment_lengths, dilation_rates, **kwargs):
    """Grouped-query attention with the wrong K/V head: query head h reads h % H_kv."""
    reps = q.shape[2] // k.shape[2]
    k, v = (np.tile(x, (1, 1, reps, 1)) for x in (k, v))
    return correct(q, k, v, segment_lengths, dilation_rates, **kwargs)


def zeroes_its_inputs(q, k, v, segment_lengths, dilation_rates, **kwargs):
    """Zeroes q, k, v in place and returns zeros: right for the inputs it leaves behind."""
    for x in (q, k, v):
        x[...] = 0
    return np.zeros_like(q)


def exits(q, k, v, segment_lengths, dilation_rates, **kwargs):
    raise SystemExit(0)


def needs_contiguous(q, k, v, segment_lengths, dilation_rates, **kwargs):
    if not all(x.flags.c_contiguous for x in (q, k, v)):
        raise ValueError("q, k, v must be contiguous")
    return out_only(q, k, v, segment_lengths, dilation_rates, **kwargs)


def float32_lse(q, k, v, segment_lengths, dilation_rates, **kwargs):
    out, lse = correct(q, k, v, segment_lengths, dilation_rates, **kwargs)
    return out, lse.astype(np.float32)


def ignores_padding(q, k, v, segment_lengths, dilation_rates, *, key_padding_mask, **kwargs):
    """Takes key_padding_mask and forgets it."""
    return correct(q, k, v, segment_lengths, dilation_rates, **kwargs)
