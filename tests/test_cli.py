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
