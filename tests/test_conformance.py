"""The conformance suite on one device: right functions pass, every mutant and peer convention
wrapped as someone else's function fails with its own diagnosis, options do what they say,
and misbehaving functions (raise, wrong shape or dtype, NaN, hang) fail with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import conform_targets as targets
import pytest

from ringsim.conformance import Options, assert_conforms, check
from ringsim.conformance.conventions import CONVENTIONS
from ringsim.conformance.mutants import MUTANTS

ROOT = Path(__file__).resolve().parents[1]
TARGETS = Path(targets.__file__)
BOTH = {"returns": "out,lse", "modes": ("longnet", "grouped")}


def test_the_reference_passes_every_case_in_both_modes():
    report = check(targets.correct, **BOTH, cases=10)
    assert report.ok, report.text()
    assert {r.case.mode for r in report.results} == {"longnet", "grouped"}
    assert {r.case.is_causal for r in report.results} == {False, True}
    assert report.line().startswith("PASS conform conform_targets:correct kind=single")
    assert report.diagnosis.failing == 0


@pytest.mark.parametrize("name", sorted({**MUTANTS, **CONVENTIONS}))
def test_every_mutant_fails_with_its_own_diagnosis(name):
    report = check(targets.mutated(name), **BOTH, scale=True, cases=10)
    assert not report.ok
    diagnosis = report.diagnosis
    assert diagnosis.name == name, report.text()
    assert diagnosis.matched >= 1 and diagnosis.matched <= diagnosis.failing
    assert f"on {diagnosis.matched}/{diagnosis.failing} failing cases" in diagnosis.line()


def test_the_diagnosis_reads_as_a_sentence():
    report = check(targets.mutated("offset_from_position_zero"), **BOTH)
    line = report.diagnosis.line()
    assert line.startswith("diagnosis: your output equals the definition with offsets counted")
    assert "(pitfall 2)" in line
    line = check(targets.mutated("torchscale-head-blocks"), **BOTH).diagnosis.line()
    assert "(torchscale's dense_to_sparse)" in line


def test_out_only_and_declared_returns_must_agree():
    assert check(targets.out_only, cases=3).ok
    report = check(targets.pair, cases=2)  # returns (out, lse) but declared out
    assert not report.ok and "returns='out' expects out alone" in report.results[0].problem
    report = check(targets.out_only, returns="out,lse", cases=2)
    assert "expects (out, lse)" in report.results[0].problem


def test_keywords_are_passed_only_when_declared():
    seen = []

    def plain(q, k, v, segment_lengths, dilation_rates):  # no keyword arguments at all
        seen.append(True)
        return targets.out_only(q, k, v, segment_lengths, dilation_rates)

    report = check(plain, causal=False, cases=4)
    assert report.ok, report.text()
    assert all(not r.case.is_causal and r.case.mode == "longnet" for r in report.results)
    assert all(r.case.softmax_scale is None for r in report.results) and seen


def test_a_function_that_ignores_the_scale_fails_with_scale():
    def ignores(q, k, v, segment_lengths, dilation_rates, *, is_causal, softmax_scale=None):
        return targets.out_only(q, k, v, segment_lengths, dilation_rates, is_causal=is_causal)

    assert check(ignores, cases=2).ok  # no softmax_scale passed, default inputs
    assert not check(ignores, scale=True, cases=2).ok


@pytest.mark.parametrize(
    ("fn", "problem"),
    [
        (targets.raises, "raised RuntimeError: my kernel is not built"),
        (targets.wrong_shape, "out has shape"),
        (targets.wrong_dtype, "out has dtype float32, expected float64"),
    ],
)
def test_misbehaving_functions_fail_with_the_reason(fn, problem):
    report = check(fn, cases=1)
    assert not report.ok
    assert all(problem in r.problem for r in report.results), report.text()
    assert "no known wrong variant" in report.diagnosis.line() or report.diagnosis.failing == 0


def test_nan_is_an_infinite_error_on_the_rows_that_hold_it():
    report = check(targets.nan_rows, cases=0)
    wrong = report.failed[0]
    assert wrong.out_error == float("inf")
    assert wrong.rows[-1] == wrong.case.seq_len - 1


def test_a_function_that_hangs_fails_its_case_and_stops():
    targets.RELEASE.clear()
    try:
        report = check(targets.hangs, timeout=0.5, cases=3)
    finally:
        targets.RELEASE.set()
    assert not report.ok and len(report.results) == 1
    assert "did not return within 0.5 s" in report.results[0].problem
    assert report.not_run > 0 and "not_run=" in report.line()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"dtype": "bfloat16"}, "dtype:"),
        ({"grad": True}, "grad:"),
        ({"modes": "longnet,causal"}, "modes:"),
        ({"kind": "ring"}, "kind:"),
        ({"returns": "lse"}, "returns:"),
        ({"layout": "nbhd"}, "layout:"),
        ({"timeout": 0}, "timeout:"),
        ({"device": "cuda"}, "device:"),
        ({"layout_shard": "zigzag"}, "layout_shard:"),
        ({"case": 10_000}, "case:"),
    ],
)
def test_bad_options_are_named_before_the_function_runs(options, named):
    called = []
    with pytest.raises(ValueError, match=f"^{named}"):
        check(lambda *a, **k: called.append(1), **options)
    assert not called


def test_reproduce_lines_run_the_one_case():
    report = check(targets.mutated("ragged_tail_dropped"), **BOTH, cases=4)
    first = report.failed[0]
    assert first.repro == (
        "ringsim conform conform_targets:attention --returns out,lse "
        f"--modes longnet,grouped --cases 4 --case {first.index}"
    ) or first.repro.startswith("ringsim.conformance.check(fn, ")
    again = check(targets.mutated("ragged_tail_dropped"), **BOTH, cases=4, case=first.index)
    assert [r.case for r in again.results] == [first.case]
    assert again.results[0].out_error == first.out_error


def test_json_report_is_strict_json(tmp_path):
    report = check(targets.nan_rows, cases=1)
    data = json.loads(report.dumps(), parse_constant=pytest.fail)  # no NaN/Infinity tokens
    assert data["ok"] is False and data["line"] == report.line()
    assert data["cases"][0]["out_error"] == "inf"
    assert data["options"] == Options(cases=1).__dict__ | {"modes": ["longnet"]}


def test_assert_conforms_raises_with_the_report():
    assert assert_conforms(targets.correct, returns="out,lse", cases=1).ok
    with pytest.raises(AssertionError, match="diagnosis: your output equals"):
        assert_conforms(targets.mutated("unnormalised_merge"), returns="out,lse", cases=2)


# --- torch ------------------------------------------------------------------------------------


def test_torch_layout_and_gradients():
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "examples"))
    import torch_module

    for dtype in ("float64", "float32", "bfloat16"):
        report = check(torch_module.attention, backend="torch", layout="bhnd", grad=True,
                       dtype=dtype, cases=4)  # fmt: skip
        assert report.ok, report.text()
        assert all(r.grad_errors is not None for r in report.results)
    wrong_layout = check(torch_module.attention, backend="torch", cases=1)  # bnhd declared
    assert not wrong_layout.ok


def test_gradients_with_detached_mixing_weights_are_diagnosed():
    pytest.importorskip("torch")
    assert check(targets.torch_reference, backend="torch", grad=True, cases=3).ok
    report = check(targets.torch_detached_weights, backend="torch", grad=True, cases=3)
    assert not report.ok
    assert all(r.out_error <= r.tolerance for r in report.results)  # the forward is right
    assert report.diagnosis.name == "detached_mixing_weights", report.text()
    assert "gradients" in report.failed[0].where()


# --- the command line and the examples ---------------------------------------------------


def conform(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ringsim.cli", "conform", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_examples_pass_and_fail_with_a_diagnosis(tmp_path):
    good = conform("examples/numpy_dilated.py:dilated_attention", "--returns", "out,lse",
                   "--modes", "longnet,grouped", "--json", str(tmp_path / "r.json"))  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.splitlines()[-1].startswith("PASS conform examples/numpy_dilated.py")
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    bad = conform("examples/numpy_dilated.py:dilated_attention_offsets_from_zero",
                  "--returns", "out,lse")  # fmt: skip
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = bad.stdout.splitlines()
    assert lines[-1].startswith("FAIL conform")
    assert "offsets counted from position 0" in lines[-2] and "(pitfall 2)" in lines[-2]
    repro = next(line.strip() for line in lines if line.strip().startswith("ringsim conform"))
    one = conform(*repro.split()[2:])
    assert one.returncode == 1 and "cases=1 failed=1" in one.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["examples/numpy_dilated.py:missing"], "has no missing"),
        (["no_such_module:fn"], "cannot import no_such_module"),
        (["examples/numpy_dilated.py"], "expected MODULE:FUNCTION"),
        (["examples/numpy_dilated.py:dilated_attention", "--grad"], "grad:"),
        (["examples/numpy_dilated.py:dilated_attention", "--cases", "-1"], "must be >= 0"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, message):
    done = conform(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_grouped_query_attention_is_checked_when_declared():
    report = check(targets.correct, **BOTH, gqa=True, cases=6)
    assert report.ok, report.text()
    assert any(r.case.num_kv_heads < r.case.num_heads for r in report.results)
    assert "kv_heads=" in report.results[0].case.describe()
    assert not check(targets.kv_heads_modulo, **BOTH, gqa=True, cases=6).ok
    sys.path.insert(0, str(ROOT / "examples"))
    import numpy_dilated  # written for k, v with q's heads

    report = check(numpy_dilated.dilated_attention, gqa=True, cases=2)
    assert not report.ok and any("raised" in (r.problem or "") for r in report.results)


# --- what a review found -----------------------------------------------------------------


def test_a_function_that_changes_its_inputs_fails():
    report = check(targets.zeroes_its_inputs, cases=1)
    assert not report.ok
    assert all("modified its inputs in place (q, k, v)" in r.problem for r in report.results)


def test_sys_exit_in_the_function_is_a_failure():
    report = check(targets.exits, cases=0)
    assert not report.ok and "called sys.exit(0)" in report.results[0].problem


def test_every_other_case_passes_views_that_are_not_contiguous():
    report = check(targets.needs_contiguous, cases=2)
    odd = [r for r in report.results if r.index % 2]
    even = [r for r in report.results if not r.index % 2]
    assert odd and all("must be contiguous" in r.problem for r in odd)
    assert even and all(r.ok for r in even)
    pytest.importorskip("torch")
    grads = check(targets.torch_reference, backend="torch", grad=True, cases=2)
    assert grads.ok, grads.text()  # gradients reach the inputs through the views


def test_a_float32_lse_for_float64_inputs_is_refused_with_the_reason():
    report = check(targets.float32_lse, returns="out,lse", cases=0)
    assert "lse has dtype float32, expected float64" in report.results[0].problem


def test_large_scores_at_the_default_scale_kill_the_naive_merge_without_scale():
    report = check(targets.correct, returns="out,lse", cases=0)
    assert any("large q" in r.case.describe() for r in report.results) and report.ok
    wrong = check(targets.mutated("naive_merge"), returns="out,lse", cases=0)
    assert "high dynamic range, large q" in [r.case.label for r in wrong.failed]
    assert wrong.diagnosis.names == ("naive_merge",)


def test_ties_in_the_diagnosis_are_all_named():
    from ringsim.conformance.diagnosis import summarise

    tie = summarise([("merge_nan_on_empty", "naive_merge")] * 2)
    assert tie.names == ("merge_nan_on_empty", "naive_merge") and tie.matched == 2
    assert "(pitfall 6), or with" in tie.line() and "(pitfall 8), on 2/2" in tie.line()


def test_reproduce_lines_name_only_what_imports_back():
    class Attention:
        def forward(self, q, k, v, segment_lengths, dilation_rates, **kwargs):
            return targets.out_only(q, k, v, segment_lengths, dilation_rates, **kwargs)

    from ringsim.conformance.judge import target_name

    assert target_name(Attention().forward) is None
    assert target_name(targets.correct) == "conform_targets:correct"
    assert Options(modes=["longnet", "grouped"]).argv() == ["--modes", "longnet,grouped"]


def test_a_bad_torch_device_is_named():
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"^device: not a torch device"):
        check(targets.correct, backend="torch", device="bogus")


def test_cli_import_errors_json_paths_and_hangs(tmp_path):
    (tmp_path / "helpers.py").write_text("def helper():\n    return 1\n")
    (tmp_path / "user.py").write_text(
        "from helpers import helper\nfrom conform_targets import out_only as attention\n"
    )
    (tmp_path / "broken.py").write_text("def f(:\n")
    env_root = str(ROOT / "tests")
    ok = conform(str(tmp_path / "user.py") + ":attention", "--cases", "0", cwd=Path(env_root))
    assert ok.returncode == 0, ok.stdout + ok.stderr  # the file's folder is on the path
    broken = conform(str(tmp_path / "broken.py") + ":f")
    assert (
        broken.returncode == 2
        and "cannot import" in broken.stderr
        and "SyntaxError" in broken.stderr
    )
    bad_json = conform("tests/conform_targets.py:out_only", "--json", "/nonexistent/r.json")
    assert bad_json.returncode == 2 and "json: cannot write" in bad_json.stderr
    assert "PASS" not in bad_json.stdout
    hung = conform("tests/conform_targets.py:hangs", "--timeout", "1", "--cases", "0")
    assert hung.returncode == 1, hung.stdout + hung.stderr  # not a crash at exit
    assert "not_run=" in hung.stdout.splitlines()[-1]


def test_key_padding_masks_are_checked_when_declared():
    assert check(targets.correct, **BOTH, key_padding=True, gqa=True, cases=6).ok
    report = check(targets.ignores_padding, **BOTH, key_padding=True, cases=4)
    assert not report.ok and report.diagnosis.names == ()
    with pytest.raises(ValueError, match=r"^key_padding: the bf16/fp16 bound"):
        check(targets.correct, backend="torch", dtype="bfloat16", key_padding=True)
