"""The backward's direct gradients (Note [Direct gradients] in
:mod:`ringsim.gpu.executor.direct`): block gradients kept as parts, summed by the Triton kernel
:func:`~ringsim.gpu.executor.mix_triton.sum_` head chunk by head chunk on one device, and with
merged pairs' float32 partials on the simulated ring, run here by Triton's interpreter on the
CPU and compared with the dense-mask gradient.

Needs torch and Triton; skipped otherwise, and on a machine with CUDA (``test_gpu_cuda.py``
checks the compiled kernel there).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from grad_oracle import dense_gradients  # noqa: E402
from test_gpu_mix import (  # noqa: E402
    aligned_cases,
    aligned_ring_cases,
    general_only,
    load_mutant,
    mutate,
    record_programs,
    record_views,
    residue_cases,
    residue_only,
    slice_cases,
    zigzag_cases,
)

from ringsim.config import Pattern, PatternGroup  # noqa: E402
from ringsim.gpu import dilated_attention, simulated_ring_dilated_attention  # noqa: E402
from ringsim.gpu.executor import Part, backward  # noqa: E402
from ringsim.gpu.executor.direct import chunk_groups, head_chunks  # noqa: E402
from ringsim.gpu.executor.schedule import Schedule  # noqa: E402
from ringsim.tolerance import max_abs_error, tolerance  # noqa: E402

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA: test_gpu_cuda.py checks it"),
]


def test_head_chunks_are_as_few_as_the_budget_allows():
    assert head_chunks(16, 100, 100) == (range(16),)
    assert head_chunks(16, 101, 100) == (range(0, 8), range(8, 16))
    assert head_chunks(16, 580, 100) == tuple(range(i, i + 2) for i in range(0, 16, 2))
    assert head_chunks(16, 10**9, 1) == tuple(range(i, i + 1) for i in range(16))
    assert head_chunks(6, 10**9, 1) == (range(0, 3), range(3, 6))  # halved while h allows


def test_chunk_groups_keep_each_groups_heads_in_the_chunk():
    groups = tuple(PatternGroup(0, Pattern(8, 4, o), (o, o + 4, o + 8, o + 12)) for o in range(4))
    chunk = chunk_groups(groups, range(4, 8))
    assert [g.heads for g in chunk] == [(4,), (5,), (6,), (7,)]
    assert [g.pattern.offset for g in chunk] == [0, 1, 2, 3]
    assert chunk_groups(groups, range(0, 16)) == groups


def failures_of(cases, attention) -> list[str]:
    """float32 gradients of ``cases`` through ``attention(case, q, k, v)`` against the
    dense-mask gradient: a line for each case that misses the bound."""
    failures = []
    for i, case in enumerate(cases):
        q, k, v = (torch.from_numpy(x).float().requires_grad_() for x in case.inputs(seed=i))
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(i))
        grads = torch.autograd.grad(attention(case, q, k, v), (q, k, v), dout)
        want = dense_gradients(case, *(x.detach().double().numpy() for x in (q, k, v, dout)))
        errors = [max_abs_error(g.double().numpy(), w) for g, w in zip(grads, want)]
        if max(errors) > 10 * tolerance("float32"):
            failures.append(f"{case.describe()}: {errors}")
    return failures


def one_device(case, q, k, v):
    return dilated_attention(q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs())


def simulated_ring(case, q, k, v):
    return simulated_ring_dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, world_size=case.world_size,
        layout=case.layout, **case.kwargs(),
    )  # fmt: skip


def gradient_failures(cases, monkeypatch, sum_module=None, residue=True) -> list[str]:
    """:func:`failures_of` on one device, with the heads in as many chunks as they allow (a
    zero budget) and ``sum_module``'s kernel (its general kernel only, unless ``residue``)."""
    monkeypatch.setattr(backward, "PARTS_BUDGET", 0)
    if sum_module is not None:
        monkeypatch.setattr("ringsim.gpu.executor.mix_triton.sum_", sum_module.sum_)
        if not residue:
            general_only(sum_module, monkeypatch)
    return failures_of(cases, one_device)


@pytest.mark.parametrize("residue", [True, False], ids=["residue", "general"])
@pytest.mark.parametrize("schedule", ["strided", "gathered"])
def test_direct_gradients_match_definition(interpreted, monkeypatch, schedule, residue):
    monkeypatch.setattr(backward, "schedule", lambda *a, **k: Schedule(schedule))
    calls = []
    sum_ = interpreted.sum_
    monkeypatch.setattr(interpreted, "sum_", lambda *a: calls.append(a[-1].shape[2]) or sum_(*a))
    shapes = record_programs(interpreted, monkeypatch, residue)
    cases = aligned_cases()
    assert not gradient_failures(cases, monkeypatch)
    assert len(calls) >= 3 * len(cases) and 1 in calls  # three sums per chunk; 1-head chunks
    assert {c.mode for c in cases} == {"longnet", "grouped"}
    assert any(shape is not None for shape in shapes) == residue


def test_head_chunk_parts_are_freed_before_the_next_chunk(interpreted, monkeypatch):
    """A head chunk's parts are gone once its sums are written: a loop variable that kept
    one gradient's list alive held a third of them into the next chunk (248 of 1008 MiB at
    the peak, 128K tokens on an H200)."""
    import weakref

    from ringsim.gpu.executor.backward import BackwardExecutor

    chunks: list[list] = []  # per chunk: weak references to its parts' tensors
    run = BackwardExecutor._direct_batch

    def recorded(self, batch, groups, heads, parts):
        if not chunks or chunks[-1][0] != heads:
            chunks.append([heads, []])
            alive = [ref for _, refs in chunks[:-1] for ref in refs if ref() is not None]
            assert not alive, f"{len(alive)} parts of an earlier chunk still held"
        before = [len(mine) for mine in parts]
        run(self, batch, groups, heads, parts)
        for mine, start in zip(parts, before):
            chunks[-1][1].extend(weakref.ref(part.out) for part in mine[start:])

    monkeypatch.setattr(BackwardExecutor, "_direct_batch", recorded)
    assert not gradient_failures(aligned_cases()[:2], monkeypatch)
    assert len(chunks) > 2 and all(refs for _, refs in chunks)


def test_sum_covers_unselected_positions_with_zero(interpreted):
    """Positions no part covers get 0 (not what was in out), in out's dtype."""
    part = Part(0, 4, 2, (0,), (1,), torch.ones(1, 1, 2, 4), None)
    out = torch.full((1, 4, 1, 4), 7.0)
    interpreted.sum_([part], (4,), (2,), out)
    assert (out[0, 1::2] == 1).all() and (out[0, 0::2] == 0).all()


def test_sum_refuses_parts_of_another_dtype(interpreted):
    part = Part(0, 4, 1, (0,), (0,), torch.ones(1, 1, 4, 4, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="parts need"):
        interpreted.sum_([part], (4,), (1,), torch.empty(1, 4, 1, 4))


#: Defects re-introduced into the sum kernel's source: each must fail the gradient check.
SUM_MUTANTS = {  # name: (function, old, new)
    "parts overwrite instead of adding": (
        "_sum_kernel", "acc += tl.load(out + at[:, None]", "acc = tl.load(out + at[:, None]"),
    "every position reads the first row": (
        "_part_rows", "row = (p % WIDTH) // RATE", "row = p % 1"),
    "every row taken, selected or not": ("_locate", "p % RATE == tl.load(entry + 2)", "p >= 0"),
    "residue: parts overwrite instead of adding": (
        "_residue_sum_kernel", "acc += tl.load(out + at + rows", "acc = tl.load(out + at + rows"),
    "residue: rows one apart, not R / r": (
        "_residue_sum_kernel", "rows = (t * ((STRIDE // RATES[i]) * out_step))",
        "rows = (t * out_step)"),
}  # fmt: skip


@pytest.mark.parametrize("name", SUM_MUTANTS)
def test_sum_mutant_is_killed(interpreted, monkeypatch, tmp_path, name):
    function, old, new = SUM_MUTANTS[name]
    source = mutate(Path(interpreted.__file__).read_text(), function, old, new)
    mutant = load_mutant(source, f"sum_mutant_{sorted(SUM_MUTANTS).index(name)}", tmp_path)
    cases = [c for c in aligned_cases() if len(c.segment_lengths) > 1][:4] + residue_cases()
    failures = gradient_failures(cases, monkeypatch, mutant, residue_only(function))
    assert failures, f"the suite does not kill: {name}"


@pytest.mark.parametrize("schedule", ["strided", "gathered"])
@pytest.mark.parametrize("cases", [aligned_ring_cases, zigzag_cases])
def test_direct_ring_gradients_match_definition(interpreted, monkeypatch, cases, schedule):
    """Note [Direct gradients] on a ring: single-batch pairs as parts, merged pairs (across
    steps, across a zigzag shard's chunks) in float32 partials, dK/dV that come home added
    into them; three sums per rank."""
    monkeypatch.setattr(backward, "schedule", lambda *a, **k: Schedule(schedule))
    calls = []
    sum_ = interpreted.sum_
    monkeypatch.setattr(interpreted, "sum_", lambda *a: calls.append(1) or sum_(*a))
    assert not failures_of(cases(), simulated_ring)
    assert len(calls) == 3 * sum(c.world_size for c in cases())


RING_MUTANTS = {  # name: (method of BackwardExecutor, replacement)
    "dK/dV that come home are dropped": ("add_home", lambda self, grads, transfer: None),
    "merged pairs left out of the sums": ("finish", None),
}


@pytest.mark.parametrize("name", RING_MUTANTS)
def test_direct_ring_mutant_is_killed(interpreted, monkeypatch, name):
    method, replacement = RING_MUTANTS[name]
    if replacement is None:  # the partials forgotten before the sums
        finish = backward.BackwardExecutor.finish

        def replacement(self):
            if self.direct:
                self.grads.partials = {}
            return finish(self)

    monkeypatch.setattr(backward.BackwardExecutor, method, replacement)
    cases = aligned_ring_cases()[:4] + zigzag_cases()[:1]
    assert failures_of(cases, simulated_ring), f"the suite does not kill: {name}"


@pytest.mark.parametrize("schedule", ["strided", "gathered"])
def test_direct_gradients_through_lse(interpreted, monkeypatch, schedule):
    """A loss that reads lse: its gradient reaches every call, a gathered one too (whose call
    once left dlse out)."""
    monkeypatch.setattr(backward, "schedule", lambda *a, **k: Schedule(schedule))
    failures = []
    for i, case in enumerate(aligned_cases()[:6]):
        q, k, v = (torch.from_numpy(x).float().requires_grad_() for x in case.inputs(seed=i))
        out, lse = dilated_attention(q, k, v, case.segment_lengths, case.dilation_rates,
                                     **case.kwargs(), return_lse=True, kernel="math")  # fmt: skip
        generator = torch.Generator().manual_seed(i)
        dout, dlse = torch.randn(out.shape, generator=generator), torch.randn(lse.shape)
        dlse = torch.where(torch.isfinite(lse), dlse, 0.0)  # rows no pair selects: no gradient
        grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
        x = (t.detach().double().numpy() for t in (q, k, v, dout))
        want = dense_gradients(case, *x, dlse=dlse.double().numpy())
        errors = [max_abs_error(g.double().numpy(), w) for g, w in zip(grads, want)]
        if max(errors) > 10 * tolerance("float32"):
            failures.append(f"{case.describe()}: {errors}")
    assert not failures


@pytest.mark.parametrize("budget", [0, None], ids=["head chunks", "one chunk"])
def test_direct_gradients_of_head_slices_match_definition(interpreted, monkeypatch, budget):
    """The backward of pairs gathered as head slices or one view, in head chunks (where a
    chunk can make one head per group) and not, against the dense-mask gradient."""
    monkeypatch.setattr(backward, "schedule", lambda *a, **k: Schedule("gathered"))
    found = record_views(monkeypatch)
    if budget is None:
        assert not failures_of(slice_cases(), one_device)
        assert 2 in found, found
    else:
        assert not gradient_failures(slice_cases(), monkeypatch)
    assert 1 in found, found
