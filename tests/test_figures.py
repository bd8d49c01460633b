"""Figures (:mod:`ringsim.figures`) and ``ringsim plot``: files are written and non-empty, and
what is drawn matches what it depicts (boxes and arrows of the trace, bars, mask panels).

Needs matplotlib (the ``docs`` extra); skipped with the reason where it is absent.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="figures need matplotlib: pip install -e '.[docs]'")

from matplotlib.patches import Rectangle
from matplotlib.text import Annotation

from ringsim import figures
from ringsim.cases import Case
from ringsim.cli import main
from ringsim.reference import ring_dilated_attention
from ringsim.trace import Trace, TraceAction

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(case: Case) -> Trace:
    *_, trace = ring_dilated_attention(
        *case.inputs(seed=1),
        case.segment_lengths,
        case.dilation_rates,
        world_size=case.world_size,
        **case.kwargs(),
        return_trace=True,
    )
    return trace


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_importing_figures_does_not_import_matplotlib() -> None:
    code = (
        "import sys, ringsim, ringsim.figures, ringsim.figures.trace, ringsim.cli.plot; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("causal", [False, True])
def test_trace_figure_draws_every_block_and_message(causal: bool) -> None:
    trace = run(Case(1, 24, 4, 8, (8, 24), (1, 3), causal, "longnet", 4))
    ax = figures.trace_figure(trace).axes[0]
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    blocks = trace.select(TraceAction.COMPUTE) + trace.select(TraceAction.SKIP)
    assert len(boxes) == len(blocks)
    grey = [b for b in boxes if b.get_facecolor()[:3] == pytest.approx((0.784, 0.784, 0.784), 1e-2)]
    assert len(grey) == len(trace.select(TraceAction.SKIP))  # skipped blocks, and only those
    assert (len(grey) > 0) == causal
    sends = trace.select(TraceAction.SEND)
    arrows = [c for c in ax.get_children() if isinstance(c, Annotation)]
    assert len(arrows) == len(sends)
    for arrow, send in zip(arrows, sends):  # each arrow goes from step - 1 to step
        (x0, _), (x1, _) = arrow.xyann, arrow.xy
        assert send.step - 1 < x0 < send.step < x1 < send.step + 1
    labels = Counter(t.get_text() for t in ax.texts if t.get_text().endswith(" B"))
    assert labels == Counter(f"{e.nbytes} B" for e in sends)


def test_mask_figure_panels() -> None:
    longnet = figures.mask_figure((8, 24), (2, 3), 24, 4)
    assert len(longnet.axes) == 4 * 3  # heads x (pairs + all patterns)
    images = [ax.images[0].get_array() for ax in longnet.axes if ax.images]
    assert len(images) == 12 and max(int(a.max()) for a in images) == 2  # a key chosen twice
    grouped = figures.mask_figure((8, 24), (2, 3), 24, 4, mode="grouped", heads=[0, 3])
    unused = [t for ax in grouped.axes for t in ax.texts if t.get_text() == "not used"]
    assert len(grouped.axes) == 2 * 3 and len(unused) == 2


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_traffic_and_scaling_bars_match_the_trace(layout) -> None:
    trace = run(Case(1, 24, 4, 8, (12, 24), (2, 3), True, "longnet", 4, layout=layout))
    busy, left, right = figures.traffic_figure(trace).axes
    assert [p.get_height() for p in busy.patches] == [trace.work(r) for r in range(4)]
    heights = [p.get_height() for p in left.patches]
    sent = [trace.sent_bytes(r) for r in range(4)]
    assert heights == sent + [trace.received_bytes(r) for r in range(4)]
    assert [p.get_height() for p in right.patches] == list(trace.peak_bytes)
    scaling = figures.scaling_figure([1, 2, 4], [300, 200, 100], [0, 50, 75])
    assert len(scaling.axes) == 2
    assert list(scaling.axes[0].lines[0].get_ydata()) == [300, 200, 100]


def test_save_figure_writes_non_empty_files(tmp_path: Path) -> None:
    trace = run(Case(1, 12, 2, 4, (6, 12), (1, 2), False, "longnet", 3))
    for name, figure in {
        "masks": figures.mask_figure((6, 12), (1, 2), 12, 2),
        "trace": figures.trace_figure(trace),
        "traffic": figures.traffic_figure(trace),
        "scaling": figures.scaling_figure([1, 3], [10, 4]),
    }.items():
        path = figures.save_figure(figure, tmp_path / "sub" / f"{name}.png", dpi=60)
        width, height = png_size(path)
        assert width > 100 and height > 100, (name, width, height)
        assert path.stat().st_size > 5000  # a blank image would compress to far less


def test_plot_command_writes_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plot", "--causal", "--out", str(tmp_path), "--dpi", "60"]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["masks.png", "scaling.png", "trace.png", "traffic.png"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size > 5000 and png_size(path) > (100, 100)
    assert "wrote" in capsys.readouterr().out


def test_plot_command_formats_and_selection(tmp_path: Path) -> None:
    assert main(["plot", "trace", "--format", "svg", "--out", str(tmp_path)]) == 0
    (svg,) = tmp_path.iterdir()
    assert svg.name == "trace.svg" and "<svg" in svg.read_text()
    args = ["plot", "scaling", "--seq-len", "12", "--world-sizes", "1,2,3", "--out", str(tmp_path)]
    assert main(args) == 0
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_plot_command_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", "scaling", "--world-sizes", "5"]) == 2
    assert "--world-sizes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", "pictures"])
    assert exit_info.value.code == 2
    assert "unknown figure 'pictures'" in capsys.readouterr().err
