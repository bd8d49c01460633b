"""The step executor's mixing kernel (:mod:`ringsim.gpu.executor.mix_triton`) on the CPU, run
by Triton's interpreter (``TRITON_INTERPRET=1``), against the dense-mask definition: on one
device (one step) and over the simulated ring (a running state carried from step to step).

Needs torch and Triton (the ``torch`` and ``triton`` extras of the project's set-up);
skipped otherwise, and on a machine with CUDA, where ``test_gpu_cuda.py`` checks the
compiled kernel (a process that has imported the module compiled cannot interpret it).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ringsim.cases import Case, fixed_cases, random_case  # noqa: E402
from ringsim.config import make_config  # noqa: E402
from ringsim.gpu import Kernel, dilated_attention, simulated_ring_dilated_attention  # noqa: E402
from ringsim.gpu.executor import Part  # noqa: E402
from ringsim.gpu.executor import forward as executor  # noqa: E402
from ringsim.gpu.executor.merge import mix_reason  # noqa: E402
from ringsim.gpu.executor.schedule import Schedule  # noqa: E402
from ringsim.reference import dense_dilated_attention  # noqa: E402
from ringsim.tolerance import max_abs_error, tolerance  # noqa: E402

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA: test_gpu_cuda.py checks it"),
]


def aligned_cases():
    """The parity cases whose every pair is aligned (the ones the mix path takes)."""
    rng = np.random.default_rng(5)
    pool = fixed_cases(1) + [random_case(rng, 1, max_shard=48) for _ in range(200)]
    chosen = []
    for case in pool:
        q, _, _ = case.inputs(seed=0)
        config = make_config(case.segment_lengths, case.dilation_rates, **case.kwargs())
        if config.is_aligned(q.shape[1]):
            chosen.append(case)
    return chosen[:24]


def residue_cases():
    """Aligned cases the residue programs run with several rates (rows R / r apart in the
    parts), causal and not, both modes."""
    return [
        Case(1, 64, 4, 8, (16, 32, 64), (1, 2, 4), True),
        Case(2, 48, 4, 4, (12, 24), (1, 3), False, mode="grouped"),
    ]


def run(case, seed, dtype=torch.float32):
    q, k, v = (torch.from_numpy(x).to(dtype) for x in case.inputs(seed=seed))
    return dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs(), return_lse=True
    )


def reference(case, seed):
    q, k, v = case.inputs(seed=seed)
    return dense_dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs()
    )


def forward_failures(cases) -> list[str]:
    """float32 out and lse of ``cases`` on one device against the dense-mask definition: a
    line for each case that misses the bound."""
    failures = []
    for i, case in enumerate(cases):
        out, lse = run(case, seed=i)
        ref_out, ref_lse = reference(case, seed=i)
        err = max(max_abs_error(out.double().numpy(), ref_out), max_abs_error(lse.numpy(), ref_lse))
        if err > tolerance("float32"):
            failures.append(f"{case.describe()}: {err:.2e}")
    return failures


def test_cases_are_aligned_and_varied():
    cases = aligned_cases()
    assert len(cases) >= 12
    assert any(c.is_causal for c in cases) and any(not c.is_causal for c in cases)
    assert any(max(c.dilation_rates) > 1 for c in cases)


def test_mix_is_used_only_where_it_can_run(interpreted, monkeypatch):
    q = torch.zeros(1, 8, 2, 4)
    assert mix_reason(q) is None
    assert "float32" in mix_reason(q.double())
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in mix_reason(q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # debugging some other kernel: not enough
    monkeypatch.setattr("ringsim.gpu.executor.merge.INTERPRET_ON_CPU", False)
    assert "CUDA" in mix_reason(q)


def record_programs(module, monkeypatch, residue: bool) -> list:
    """The residue shape of every launch (None: the general kernel), into the list returned;
    the general kernel only unless ``residue``."""
    if not residue:
        general_only(module, monkeypatch)
    shapes, shape_of = [], module.residue_shape
    monkeypatch.setattr(
        module, "residue_shape", lambda *a: shapes.append(shape_of(*a)) or shapes[-1]
    )
    return shapes


@pytest.mark.parametrize("residue", [True, False], ids=["residue", "general"])
@pytest.mark.parametrize("schedule", ["strided", "gathered"])
def test_mixed_forward_matches_definition(interpreted, monkeypatch, schedule, residue):
    monkeypatch.setattr(executor, "schedule", lambda *a, **k: Schedule(schedule))
    calls = []
    mix = interpreted.mix_
    monkeypatch.setattr(interpreted, "mix_", lambda *a: calls.append(1) or mix(*a))
    shapes = record_programs(interpreted, monkeypatch, residue)
    failures = forward_failures(aligned_cases())
    assert not failures, "\n".join(failures)
    assert len(calls) == len(aligned_cases())  # every case took the mixing path
    residues = [shape for shape in shapes if shape is not None]
    if residue:  # both programs ran: residue ones (R > 1 among them), and general ones
        assert None in shapes and any(stride > 1 for stride, _ in residues), shapes
    else:
        assert not residues


def test_rows_no_pair_selects_are_zero_and_minus_inf(interpreted):
    # r = 2 and 4: head 0 selects even positions only; odd ones have no key at all
    q, k, v = (torch.randn(1, 16, 2, 4) for _ in range(3))
    out, lse = dilated_attention(q, k, v, (8, 16), (2, 4), return_lse=True)
    assert torch.isneginf(lse[0, 0, 1::2]).all() and (out[0, 1::2, 0] == 0).all()
    assert torch.isfinite(lse[0, 0, 0::2]).all() and not torch.isnan(out).any()


def test_nan_propagates_as_in_the_accumulating_path(interpreted, monkeypatch):
    q, k, v = (torch.randn(1, 16, 4, 8) for _ in range(3))
    v[0, 5, 1] = float("nan")
    mixed = dilated_attention(q, k, v, (4, 8, 16), (1, 2, 4), is_causal=True)
    monkeypatch.delenv("TRITON_INTERPRET")
    accumulated = dilated_attention(q, k, v, (4, 8, 16), (1, 2, 4), is_causal=True)
    assert torch.isnan(mixed).any()
    assert torch.equal(torch.isnan(mixed), torch.isnan(accumulated))
    ok = ~torch.isnan(mixed)
    assert torch.allclose(mixed[ok], accumulated[ok], atol=1e-6)


def test_large_lse_gaps_do_not_overflow(interpreted):
    """Scores of hundreds: exp(lse) overflows float32, the shifted weights do not."""
    q, k, v = (torch.randn(1, 32, 4, 8) for _ in range(3))
    q[0, ::3] *= 60.0
    out, lse = dilated_attention(q, k, v, (8, 16, 32), (1, 2, 4), return_lse=True)
    ref_out, ref_lse = dense_dilated_attention(
        *(x.double().numpy() for x in (q, k, v)), (8, 16, 32), (1, 2, 4)
    )
    assert lse.max() > 100
    assert max_abs_error(out.double().numpy(), ref_out) <= tolerance("float32") * 10
    assert max_abs_error(lse.numpy(), ref_lse) <= tolerance("float32") * 100


def test_plus_inf_lse_reads_as_an_empty_row(interpreted):
    """Flash kernels mark a row with no key by lse = +inf; the mix reads it as -inf."""
    out_block = torch.randn(1, 1, 4, 4)
    lse_block = torch.tensor([[[0.5, float("inf"), 0.5, float("inf")]]])
    part = Part(0, 4, 1, (0,), (0,), out_block, lse_block)
    out, lse = torch.empty(1, 4, 1, 4), torch.empty(1, 4, 1)
    interpreted.mix_([part], (4,), (1,), out, lse)
    assert torch.isneginf(lse[0, 1::2, 0]).all() and (out[0, 1::2] == 0).all()
    assert torch.allclose(out[0, 0::2, 0], out_block[0, 0, 0::2])


def test_each_head_is_read_at_its_own_offset(interpreted, monkeypatch):
    """A mutant table that gives every head offset 0 is caught by the parity above."""
    table = interpreted._table

    def offsets_zero(parts, *args):
        for part in parts:
            part.offsets = (0,) * len(part.offsets)
        return table(parts, *args)

    monkeypatch.setattr(interpreted, "_table", offsets_zero)
    case = next(c for c in aligned_cases() if max(c.dilation_rates) > 1 and c.num_heads > 1)
    out, _ = run(case, seed=3)
    ref_out, _ = reference(case, seed=3)
    assert max_abs_error(out.double().numpy(), ref_out) > tolerance("float32")


def test_mix_refuses_parts_of_another_dtype(interpreted):
    part = Part(0, 4, 1, (0,), (0,), torch.zeros(1, 1, 4, 4).double(), torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="parts need"):
        interpreted.mix_([part], (4,), (1,), torch.empty(1, 4, 1, 4), torch.empty(1, 4, 1))


def test_kernel_choice_does_not_change_the_mix(interpreted):
    q, k, v = (torch.randn(2, 32, 4, 8) for _ in range(3))
    args = ((8, 16, 32), (1, 2, 4))
    math = dilated_attention(q, k, v, *args, kernel=Kernel.MATH, is_causal=True)
    flash = dilated_attention(q, k, v, *args, kernel=Kernel.FLASH_CPU, is_causal=True)
    assert torch.allclose(math, flash, atol=1e-5)


#: Defects re-introduced into the kernel's source: each must fail :func:`checks_pass`.
MIX_MUTANTS = {  # name: (function, old, new)
    "acc not rescaled when the max grows": (
        "_mix_kernel", "acc = acc * keep[:, None] + ", "acc = acc + "),
    "total not rescaled when the max grows": (
        "_mix_kernel", "total = total * keep + weight", "total += weight"),
    "+inf lse read as a real score": (
        "_mix_kernel", 'pair_lse == float("inf")', "pair_lse != pair_lse"),
    "every row taken, selected or not": ("_locate", "p % RATE == tl.load(entry + 2)", "p >= 0"),
    "every position reads the first row": (
        "_part_rows", "row = (p % WIDTH) // RATE", "row = p % 1"),
    "no guard while every lse is -inf": (
        "_mix_kernel", 'tl.where(grown == float("-inf"), 0.0, grown)', "grown"),
    "heads no group covers read at offset 0": ("_table", "[[0, 0, -1, 0,", "[[0, 0, 0, 0,"),
    "residue: +inf lse read as a real score": (
        "_residue_mix_kernel",
        'pair_lse = tl.where(pair_lse == float("inf"), float("-inf"), pair_lse)  # flash',
        "pair_lse = pair_lse  # flash"),
    "residue: rows one apart, not R / r": (
        "_residue_mix_kernel", "rows = (t * ((STRIDE // RATES[i]) * out_step))",
        "rows = (t * out_step)"),
    "residue: every pair read from its block's first row": (
        "_residue_pair", "_part_rows(entry, first,", "_part_rows(entry, first - first % WIDTH,"),
    "residue: lse written one row apart": (
        "_residue_mix_kernel", "lse_at + t * (STRIDE * sl1)", "lse_at + t * sl1"),
}  # fmt: skip


def residue_only(function: str) -> bool:
    """Whether a mutated function runs only in the residue programs (Note [Residue
    programs]): its mutant is checked with them, any other with the general kernel."""
    return function.startswith("_residue")


def general_only(module, monkeypatch) -> None:
    """The general kernel everywhere: no residue programs."""
    monkeypatch.setattr(module, "residue_shape", lambda *args: None)


def checks_pass(mix_module, monkeypatch, residue: bool = True) -> bool:
    """The parity of the first aligned cases and the +inf rule, with ``mix_module`` (its
    general kernel only, unless ``residue``)."""
    monkeypatch.setattr("ringsim.gpu.executor.mix_triton.mix_", mix_module.mix_)
    if not residue:
        general_only(mix_module, monkeypatch)
    several = [c for c in aligned_cases() if len(c.segment_lengths) > 1]
    for i, case in enumerate(several[:6] + aligned_cases()[:4] + residue_cases()):
        out, lse = run(case, seed=i)
        ref_out, ref_lse = reference(case, seed=i)
        err = max(max_abs_error(out.double().numpy(), ref_out), max_abs_error(lse.numpy(), ref_lse))
        if not err <= tolerance("float32"):
            return False
    q, k, v = (torch.randn(1, 16, 2, 4) for _ in range(3))
    out, lse = dilated_attention(q, k, v, (8, 16), (2, 4), return_lse=True)
    empty_ok = torch.isneginf(lse[0, 0, 1::2]).all() and (out[0, 1::2, 0] == 0).all()
    part = Part(0, 4, 1, (0,), (0,), torch.ones(1, 1, 4, 4), torch.full((1, 1, 4), 9e9))
    part.lse[0, 0, 1] = float("inf")
    out, lse = torch.empty(1, 4, 1, 4), torch.empty(1, 4, 1)
    mix_module.mix_([part], (4,), (1,), out, lse)
    return bool(empty_ok and torch.isneginf(lse[0, 1, 0]) and not torch.isnan(out).any())


def load_mutant(source: str, name: str, tmp_path):
    """The kernel module with its relative imports made absolute, from ``source``."""
    source = source.replace("from .", "from ringsim.gpu.executor.")
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("residue", [True, False], ids=["residue", "general"])
def test_unmutated_copy_passes(interpreted, monkeypatch, tmp_path, residue):
    source = Path(interpreted.__file__).read_text()
    assert checks_pass(load_mutant(source, f"mix_copy_{residue}", tmp_path), monkeypatch, residue)


def mutate(source: str, function: str, old: str, new: str) -> str:
    """``source`` with ``old`` replaced by ``new`` inside ``function`` only, where it must occur
    once (the mixing and summing kernels share lines)."""
    start = source.index(f"def {function}(")
    following = re.search(r"\n(@|def |class )", source[start + 1 :])
    end = len(source) if following is None else start + 1 + following.start()
    body = source[start:end]
    assert body.count(old) == 1, f"mutant {old!r} no longer applies to {function}"
    return source[:start] + body.replace(old, new) + source[end:]


@pytest.mark.parametrize("name", MIX_MUTANTS)
def test_kernel_mutant_is_killed(interpreted, monkeypatch, tmp_path, name):
    function, old, new = MIX_MUTANTS[name]
    source = mutate(Path(interpreted.__file__).read_text(), function, old, new)
    label = f"mix_mutant_{sorted(MIX_MUTANTS).index(name)}"
    mutant = load_mutant(source, label, tmp_path)
    assert not checks_pass(mutant, monkeypatch, residue_only(function)), (
        f"the suite does not kill: {name}"
    )


def aligned_ring_cases():
    """Ring cases the mixing path takes: aligned for their world size, several with a pair
    whose segments span shards (partials merged across steps)."""
    from ring_support import ring_cases

    chosen = []
    for case in ring_cases([2, 3, 4], per_size=30, seed=23):
        config = make_config(case.segment_lengths, case.dilation_rates, **case.kwargs())
        if config.is_aligned(case.seq_len, case.world_size):
            chosen.append(case)
    return chosen[:16]


def zigzag_cases():
    """Zigzag cases on strided views (Note [Strided pieces]), each with a pair whose
    segments span chunks: pieces, groups and whole pairs merged into one partial."""
    return [
        Case(1, 64, 8, 8, (16, 64), (1, 2), True, layout="zigzag", world_size=2),
        Case(2, 64, 8, 8, (16, 64), (1, 4), False, layout="zigzag", world_size=2),
        Case(1, 64, 12, 8, (4, 32, 64), (1, 2, 4), True, layout="zigzag", world_size=2),
        Case(1, 64, 8, 8, (8, 64), (1, 2), True, mode="grouped", layout="zigzag", world_size=4),
        Case(1, 128, 16, 4, (16, 128), (1, 8), True, layout="zigzag", world_size=4),
    ]


def ring_failures(cases) -> list[str]:
    failures = []
    for i, case in enumerate(cases):
        q, k, v = (torch.from_numpy(x).float() for x in case.inputs(seed=i))
        out, lse = simulated_ring_dilated_attention(
            q, k, v, case.segment_lengths, case.dilation_rates, world_size=case.world_size,
            layout=case.layout, **case.kwargs(), return_lse=True,
        )  # fmt: skip
        ref_out, ref_lse = reference(case, seed=i)
        err = max(max_abs_error(out.double().numpy(), ref_out), max_abs_error(lse.numpy(), ref_lse))
        if err > tolerance("float32"):
            failures.append(f"{case.describe()}: {err:.2e}")
    return failures


def test_ring_cases_span_shards():
    cases = aligned_ring_cases()
    spanning = [
        c for c in cases if max(c.segment_lengths) > c.seq_len // c.world_size and c.is_causal
    ]
    assert len(cases) >= 8 and spanning, [c.describe() for c in cases]


@pytest.mark.parametrize("cases", [aligned_ring_cases, zigzag_cases])
def test_mixed_ring_matches_definition(interpreted, monkeypatch, cases):
    calls = []
    mix = interpreted.mix_
    monkeypatch.setattr(interpreted, "mix_", lambda *a: calls.append(1) or mix(*a))
    assert not ring_failures(cases())
    assert len(calls) >= sum(c.world_size for c in cases())  # one per rank


def test_zigzag_cases_have_pieces():
    from ringsim.gpu.executor.base import strided
    from ringsim.plan import rank_plan

    for case in zigzag_cases():
        config = make_config(case.segment_lengths, case.dilation_rates, **case.kwargs())
        plan = rank_plan(config, case.num_heads, case.seq_len, case.world_size, 0, "zigzag")
        assert strided(config, plan), case.describe()
        assert max(case.segment_lengths) > case.seq_len // (2 * case.world_size)


def test_partials_of_earlier_steps_count(interpreted, monkeypatch):
    """The mutant that drops a pair's earlier steps (its partial overwritten, not merged)."""

    def overwrite(out, lse, block_out, block_lse):
        out.copy_(block_out)
        lse.copy_(block_lse)

    monkeypatch.setattr(executor, "merge_", overwrite)
    assert ring_failures(aligned_ring_cases())
    assert len(ring_failures(zigzag_cases())) == len(zigzag_cases())


def slice_cases():
    """Pairs with fewer heads per pattern group than groups (8 heads, r = 4: 2 heads in each
    of 4 groups), which run as head slices on strided views (h/r calls, no copy), and one
    head per group (r = 8 of 8 heads: the whole pair on one view)."""
    return [
        Case(1, 64, 8, 8, (16, 32), (1, 4), True),
        Case(2, 64, 8, 4, (16, 64), (2, 4), False),
        Case(1, 64, 8, 8, (16, 64), (1, 8), True),
    ]


def record_views(monkeypatch) -> list[int]:
    """How many head sets each call of ``Executor.views`` returned (0: none), into the list
    returned."""
    from ringsim.gpu.executor.base import Executor

    found, views = [], Executor.views

    def recorded(self, *args, **kwargs):
        sets = views(self, *args, **kwargs)
        found.append(0 if sets is None else len(sets))
        return sets

    monkeypatch.setattr(Executor, "views", recorded)
    return found


def test_head_slices_on_views_match_definition(interpreted, monkeypatch):
    """The forward of pairs gathered as head slices or one view (Note in
    :mod:`ringsim.gpu.executor.schedule`) against the dense-mask definition."""
    monkeypatch.setattr(executor, "schedule", lambda *a, **k: Schedule("gathered"))
    found = record_views(monkeypatch)
    failures = forward_failures(slice_cases())
    assert not failures, "\n".join(failures)
    assert 2 in found and 1 in found, found  # two head slices, and one whole view
