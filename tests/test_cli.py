"""The ``ringsim`` command line: the demo passes, bad arguments exit 2 naming the argument."""

from __future__ import annotations

import pytest

from ringsim.cli import main


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--causal", "--mode", "grouped", "--seq-len", "28", "--num-heads", "5"],
        [
            "--segment-lengths",
            "5,7,40",
            "--dilation-rates",
            "2,3,4",
            "--seq-len",
            "36",
            "--batch",
            "2",
            "--seed",
            "3",
        ],
    ],
    ids=["default", "causal-grouped", "ragged-3-pairs"],
)
def test_demo_passes(capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    code = main(["demo", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "PASS" in captured.out and "FAIL" not in captured.out, captured.out
    assert captured.err == ""


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--segment-lengths", "8,0"], "segment_lengths"),
        (["--dilation-rates", "1"], "dilation_rates"),
        (["--mode", "grouped", "--num-heads", "1"], "num_heads"),
    ],
)
def test_bad_argument_exits_2(
    capsys: pytest.CaptureFixture[str], extra: list[str], named: str
) -> None:
    code = main(["demo", *extra])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert captured.err.startswith("ringsim: error: "), captured.err
    # the library's argument name or its command-line spelling
    assert named in captured.err or "--" + named.replace("_", "-") in captured.err, captured.err


def test_unparsable_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--segment-lengths", "8,x"])
    assert exit_info.value.code == 2
    assert "--segment-lengths" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["demo", "--seed", "-1"], "--seed"),
        (["trace", "--seed", "-1"], "--seed"),
        (["verify", "--seed", "-1"], "--seed"),
        (["plot", "--seed", "-1"], "--seed"),
        (["verify", "--mpi-timeout", "nan"], "--mpi-timeout"),
        (["verify", "--mpi-timeout", "0"], "--mpi-timeout"),
        (["verify", "--mpi-timeout", "-1"], "--mpi-timeout"),
        (["verify", "--mpi-timeout", "inf"], "--mpi-timeout"),
    ],
)
def test_bad_option_values_are_one_usage_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], option: str
) -> None:
    """Seeds are >= 0 and timeouts positive and finite: a usage error naming the option
    (exit 2, no traceback), before anything runs."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "Traceback" not in err, err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("ringsim 0.")


def test_a_default_world_size_that_does_not_divide_is_an_error(capsys):
    """--seq-len 25 silently ran on 1 rank."""
    assert main(["demo", "--seq-len", "25"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ringsim: error: world_size (--world-size): the default 4 does not")
    assert len(err.strip().splitlines()) == 1


def test_a_closed_pipe_ends_quietly():
    import subprocess
    import sys

    with subprocess.Popen([sys.executable, "-m", "ringsim.cli", "demo"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as demo:  # fmt: skip
        demo.stdout.readline()
        demo.stdout.close()  # as `| head -1` does
        err = demo.stderr.read().decode()
        code = demo.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == 0


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    import importlib

    cli = importlib.import_module("ringsim.cli.main")  # the module, not the function

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", interrupted)
    assert cli.main(["demo"]) == 130
    assert capsys.readouterr().err == "\nringsim: interrupted\n"


def test_demo_no_check_skips_the_dense_definition(capsys, monkeypatch):
    import importlib

    commands = importlib.import_module("ringsim.cli.commands")
    monkeypatch.setattr(commands, "DENSE_NOTE_BYTES", 0)  # every check announces its cost
    advances = []

    class Bar(commands.Progress):
        def advance(self, units=1, label=None):
            advances.append(units)
            super().advance(units, label)

    monkeypatch.setattr(commands, "Progress", Bar)
    assert main(["demo"]) == 0
    assert "GiB of n x n scores" in capsys.readouterr().out
    assert advances == [1, 1, 1, 1]  # one per head of the dense check
    assert main(["demo", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "skipped (--no-check)" in out and "PASS" not in out.splitlines()[-1]
