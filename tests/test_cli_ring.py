"""The ``ringsim`` CLI on the ring: ``demo``, ``verify``, ``trace``, and the progress bar.

One test needs ``mpiexec`` (the project's MPI extra); it is skipped with the reason
:func:`ringsim.launch.mpi_available` gives when MPI cannot be launched.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringsim.cases import Case
from ringsim.cli import main
from ringsim.cli.progress import Progress
from ringsim.launch import mpi_available
from ringsim.trace import TraceAction

DEFAULT_CASE = Case(1, 24, 4, 8, (8, 24), (1, 3), False, "longnet", 4)  # demo's defaults


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_rows(out: str, prefix: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.strip().startswith(prefix)]


# --- demo ----------------------------------------------------------------------------------


def test_demo_passes_and_prints_the_step_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "demo")
    assert code == 0, out + err
    assert out.splitlines()[-1] == "PASS", out
    assert "step rank  sent" in out, out  # Trace.table()'s header
    for heading in ("Configuration", "Heads and their patterns", "Sub-rings", "peak bytes"):
        assert heading in out, out
    assert err == ""


def test_demo_causal_shows_skipped_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "demo", "--causal")
    assert code == 0, out + err
    assert ":skip" in out and "causal" in out, out
    assert out.splitlines()[-1] == "PASS", out


def test_demo_zigzag_shows_the_layout_and_balanced_work(capsys) -> None:
    args = ("--causal", "--world-size", "4", "--seq-len", "24", "--segment-lengths", "24",
            "--dilation-rates", "1")  # fmt: skip
    code, out, err = run_cli(capsys, "demo", *args, "--layout", "zigzag")
    assert code == 0, out + err
    assert "rank 0 0-2+21-23" in out, out  # chunk 0, then chunk 7
    work = [row.split()[3] for row in table_rows(out, "") if row[:1].isdigit() and "+" in row]
    assert work == ["1.00"] * 4, out  # each rank's work / the mean
    code, out, err = run_cli(capsys, "demo", *args)
    assert code == 0, out + err
    assert "1.72" in out, out  # contiguous: the last rank does 1.72x the mean


def test_demo_refuses_a_zigzag_that_does_not_cut(capsys) -> None:
    args = ("--world-size", "4", "--seq-len", "12", "--segment-lengths", "12")
    code, out, err = run_cli(capsys, "demo", *args, "--dilation-rates", "1", "--layout", "zigzag")
    assert code == 2, out + err
    assert "seq_len % 8" in err, err


def test_demo_reports_fail_with_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ringsim.cli.commands as commands

    real = commands.run_case

    def wrong(case, seed, dtype):  # a ring that returns a corrupted out
        qkv, out, lse, trace = real(case, seed, dtype)
        return qkv, out + 1e-3, lse, trace

    monkeypatch.setattr(commands, "run_case", wrong)
    code, out, _ = run_cli(capsys, "demo")
    assert code == 1 and out.splitlines()[-1] == "FAIL", out


# --- verify --------------------------------------------------------------------------------


def test_verify_without_mpi_passes_every_path(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "verify", "--no-mpi", "--world-sizes", "1,2,3", "--cases", "3")
    assert code == 0, out + err
    paths = ["reference (1 process)"] + [f"simulated ring P={p}" for p in (1, 2, 3)]
    for path in paths:
        rows = table_rows(out, path)
        assert len(rows) == 1 and rows[0].endswith("PASS"), out
        assert " 9 " in rows[0], rows[0]  # 3 random + 6 fixed cases
    assert "mpiexec" not in out
    assert "\r" not in err  # no terminal: no bar frames, only the summary line
    assert err.startswith("verify: "), err


def test_verify_zigzag_names_the_layout_in_each_ring_row(capsys) -> None:
    code, out, err = run_cli(capsys, "verify", "--no-mpi", "--world-sizes", "2,3", "--cases", "2",
                             "--layout", "zigzag")  # fmt: skip
    assert code == 0, out + err
    for p in (2, 3):
        rows = table_rows(out, f"simulated ring P={p} zigzag")
        assert len(rows) == 1 and rows[0].endswith("PASS"), out


def test_verify_fails_with_exit_1_when_a_path_is_wrong(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ringsim.cli.verify as verify

    real = verify.run_simulated

    def wrong(*args):  # a ring whose out is 0.1% off
        out, lse = real(*args)
        return out * 1.001, lse

    monkeypatch.setattr(verify, "run_simulated", wrong)
    code, out, _ = run_cli(capsys, "verify", "--no-mpi", "--world-sizes", "2", "--cases", "1")
    assert code == 1, out
    assert table_rows(out, "simulated ring P=2")[0].endswith("FAIL"), out
    assert table_rows(out, "reference (1 process)")[0].endswith("PASS"), out
    assert out.splitlines()[-1].startswith("FAIL"), out


def test_verify_shows_why_mpi_rows_are_skipped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ringsim.launch.mpi_available", lambda: "no mpiexec in this test")
    code, out, _ = run_cli(capsys, "verify", "--world-sizes", "1,2", "--cases", "1")
    assert code == 0, out
    for p in (1, 2):
        rows = table_rows(out, f"mpiexec ring P={p}")
        assert rows and rows[0].endswith("skipped: no mpiexec in this test"), out


@pytest.mark.mpi
def test_verify_with_mpi_runs_the_mpiexec_paths(capsys: pytest.CaptureFixture[str]) -> None:
    from ringsim.launch import mpi_available

    reason = mpi_available()
    if reason is not None:
        pytest.skip(reason)
    code, out, err = run_cli(capsys, "verify", "--world-sizes", "1,2", "--cases", "2")
    assert code == 0, out + err
    for p in (1, 2):
        rows = table_rows(out, f"mpiexec ring P={p}")
        assert len(rows) == 1 and rows[0].endswith("PASS"), out


def test_verify_draws_a_bar_when_forced(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        capsys, "verify", "--no-mpi", "--world-sizes", "1", "--cases", "0", "--progress"
    )
    assert code == 0, out
    assert "\r" in err and err.endswith("\n"), err
    assert "verify [" + "#" * 24 + "] 12/12" in err, err  # 6 fixed cases on 2 paths


# --- trace ---------------------------------------------------------------------------------


def test_trace_prints_every_step_and_event(capsys: pytest.CaptureFixture[str]) -> None:
    from ringsim.cli.commands import run_case

    code, out, err = run_cli(capsys, "trace", "--world-size", "3", "--causal")
    assert code == 0, out + err
    case = Case(1, 24, 4, 8, (8, 24), (1, 3), True, "longnet", 3)
    _, _, _, trace = run_case(case, 0, "float64")
    assert trace.num_steps == 3
    for step in range(trace.num_steps):
        assert f"step {step + 1} of {trace.num_steps}" in out, out
    words = [line.split()[1] for line in out.splitlines() if line[:8].strip().isdigit()]
    for action in (TraceAction.SEND, TraceAction.RECV, TraceAction.COMPUTE, TraceAction.SKIP):
        assert words.count(action.value) == len(trace.select(action)), (action, out)
    assert err == ""


def test_trace_step_pauses_between_steps_on_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("\nq\n"))  # Enter once, then quit
    code, out, _ = run_cli(capsys, "trace", "--world-size", "4", "--step")
    assert code == 0, out
    assert out.count("press Enter for the next step, q to quit") == 2, out
    assert "step 2 of 4" in out and "step 3 of 4" not in out, out  # steps count from 1
    assert "stopped after step 2" in out, out


def test_trace_step_without_a_terminal_does_not_wait() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ringsim.cli", "trace", "--world-size", "3", "--step"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "CI": "true"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step 3 of 3" in done.stdout and "press Enter" not in done.stdout, done.stdout
    assert "not a terminal" in done.stderr, done.stderr


# --- bad input, help, the console script ---------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["demo", "--segment-lengths", "8,0"], "--segment-lengths"),
        (["demo", "--world-size", "5", "--seq-len", "24"], "--world-size"),
        (["trace", "--world-size", "5", "--seq-len", "24"], "--world-size"),
        (["trace", "--batch", "0"], "--batch"),
        (["demo", "--mode", "grouped", "--num-heads", "1"], "--num-heads"),
        (["demo", "--softmax-scale", "inf"], "--softmax-scale"),
    ],
)
def test_bad_input_exits_2_naming_the_option(
    capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, out + err
    assert err.startswith("ringsim: error: ") and named in err, err
    assert out == ""  # validation comes before anything runs


def test_bad_world_sizes_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--world-sizes", "2,0"])
    assert exit_info.value.code == 2
    assert "--world-sizes" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "verify", "trace"])
def test_help_gives_an_example(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"\n  ringsim {command}" in out, out


def test_console_script_runs_the_causal_demo() -> None:
    script = Path(sys.executable).parent / "ringsim"  # the venv's console script
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "ringsim.cli"]
    done = subprocess.run(
        [*command, "demo", "--causal"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "PASS" and ":skip" in done.stdout, done.stdout


# --- the progress bar ----------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    stream = io.StringIO()
    with Progress(3, "work", stream=stream) as bar:
        for _ in range(3):
            bar.advance()
    assert stream.getvalue() == ""
    summary = io.StringIO()
    with Progress(2, "work", stream=summary, summary=True) as bar:
        bar.advance(5)  # capped at total
    assert summary.getvalue().startswith("work: 2/2 in ") and summary.getvalue().count("\n") == 1


@pytest.mark.parametrize("stream", [FakeTerminal(), io.StringIO()], ids=["terminal", "forced"])
def test_progress_draws_on_a_terminal_or_when_forced(stream: io.StringIO) -> None:
    force = None if stream.isatty() else True
    with Progress(4, "work", stream=stream, force=force, width=8, interval=0.0) as bar:
        bar.advance(2)
        bar.advance(2, label="done")
    text = stream.getvalue()
    assert text.startswith("\rwork [........] 0/4") and text.endswith("\n"), repr(text)
    assert "work [####....] 2/4" in text and "done [########] 4/4" in text, repr(text)
    with pytest.raises(ValueError, match="total"):
        Progress(-1)


@pytest.mark.skipif(mpi_available() is not None, reason=str(mpi_available()))
def test_verify_counts_the_mpi_rows_case_by_case(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "verify", "--world-sizes", "1", "--cases", "0",
                             "--progress")  # fmt: skip
    assert code == 0, out
    assert "verify [" + "#" * 24 + "] 18/18" in err, err  # 6 fixed cases on 3 paths
