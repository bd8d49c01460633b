"""The GPU check and benchmark scripts in ``--smoke`` mode (CPU, tiny sizes), and their helpers.

Needs torch (the ``torch`` extra); skipped otherwise. The real runs need a CUDA device:
``python -m ringsim.gpu.harness.check`` and ``python -m ringsim.gpu.harness.bench``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ringsim.config import Pattern, make_config  # noqa: E402
from ringsim.gpu.harness.bench_baselines import _block_lists, useful_flops  # noqa: E402
from ringsim.gpu.harness.check_support import max_abs_err, naive_dilated  # noqa: E402
from ringsim.reference import dense_dilated_attention  # noqa: E402
from ringsim.reference.dense import pattern_mask  # noqa: E402
from ringsim.tolerance import max_abs_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(module: str, out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_check_smoke_passes_and_writes_json(tmp_path):
    result = run_smoke("ringsim.gpu.harness.check", tmp_path)
    report = json.loads((tmp_path / "check_smoke.json").read_text())
    assert {"device", "torch", "cuda", "date"} <= set(report)
    paths = {row["path"] for row in report["rows"]}
    assert paths == {
        "reference",
        "adapter",
        "dilated",
        "ring",
        "grad ref",
        "grad dilated",
        "grad ring",
        *(f"{grad}{what}" for grad in ("", "grad ") for what in ("padding", "padding ring", "gqa")),
    }
    assert all(row["passed"] for row in report["rows"])
    assert {row["world_size"] for row in report["rows"] if row["path"] == "ring"} >= {2, 4, 8}
    assert "flash/bfloat16" in report["not_run"]  # no CUDA here: said, not hidden
    assert "== summary:" in result.stdout


def test_bench_smoke_writes_json_and_markdown(tmp_path):
    run_smoke("ringsim.gpu.harness.bench", tmp_path)
    report = json.loads((tmp_path / "bench_smoke.json").read_text())
    assert {"device", "torch", "cuda", "date"} <= set(report)
    rows = {(r["row"], r["causal"]): r for r in report["rows"]}
    for causal in (False, True):
        assert rows[("ours", causal)]["ms"] > 0 and rows[("ours", causal)]["flops"] > 0
        assert rows[("pre-gathered", causal)]["ms"] > 0
        assert rows[("dense", causal)]["ms"] > 0
        assert rows[("ours padded", causal)]["diff"] < 1e-5  # a mask of no padding: ours
        for name in ("naive", "flex-eager"):  # the comparison rows compute the same function
            assert rows[(name, causal)]["diff"] < 1e-5, rows[(name, causal)]
    assert "| ours |" in (tmp_path / "bench_smoke.md").read_text()


def test_bench_pool_smoke_writes_both_rows(tmp_path):
    run_smoke("ringsim.gpu.harness.bench_pool", tmp_path)
    report = json.loads((tmp_path / "bench_pool_smoke.json").read_text())
    rows = {(r["config"], r["row"]): r for r in report["rows"]}
    for config in ("aligned", "ragged"):
        assert rows[(config, "plain")]["ms"] > 0 and rows[(config, "plain")]["pool_mib"] is None
        assert rows[(config, "pooled")]["buffers_kept"] > 0
    assert "| pooled |" in (tmp_path / "bench_pool_smoke.md").read_text()


def test_bench_pool_ring_smoke_under_torchrun(tmp_path):
    """The ring rows: two gloo processes; the pool also keeps the blocks received."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
         "ringsim.gpu.harness.bench_pool", "--smoke", "--ring", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "bench_pool_ring_smoke.json").read_text())
    rows = {(r["config"], r["row"]): r for r in report["rows"]}
    assert {r["world_size"] for r in report["rows"]} == {2}
    for config in ("aligned", "ragged"):
        assert rows[(config, "plain")]["ms"] > 0 and rows[(config, "plain")]["pool_mib"] is None
        assert rows[(config, "pooled")]["buffers_kept"] > 0


def test_bench_backward_smoke_writes_tables(tmp_path):
    run_smoke("ringsim.gpu.harness.bench_backward", tmp_path)
    report = json.loads((tmp_path / "bench_backward_smoke.json").read_text())
    assert {"device", "torch", "date"} <= set(report)
    rows = {(r[1], r[2]): r for r in report["time"]}
    for causal in (False, True):
        assert rows[(causal, "ours")][4] > 0 and rows[(causal, "pre-gathered")][4] > 0
    ring = {r[1]: r for r in report["ring"]}
    assert set(ring) == {1, 2, 4, 8}
    assert ring[8][3] < 0.2 * ring[1][3]  # backward bytes per virtual rank fall as 1/P
    assert "## ring" in (tmp_path / "bench_backward_smoke.md").read_text()


@pytest.mark.parametrize(
    ("n", "w", "r", "causal"),
    [
        (256, 32, 1, False),
        (256, 32, 1, True),
        (256, 64, 4, True),
        (200, 48, 3, False),
        (200, 7, 2, True),
    ],
)
def test_flex_block_lists_cover_the_mask(n, w, r, causal):
    block = 16
    cand, valid, full = _block_lists(n, w, r, causal, block, torch.device("cpu"))
    union = np.zeros((n, n), dtype=bool)
    for offset in range(r):
        union |= pattern_mask(Pattern(w, r, offset), n, is_causal=causal)
    nb = -(-n // block)
    covered = np.zeros((nb, nb), dtype=bool)
    is_full = np.zeros((nb, nb), dtype=bool)
    for qb in range(nb):
        covered[qb, cand[qb][valid[qb]].numpy()] = True
        is_full[qb, cand[qb][full[qb]].numpy()] = True
    padded = np.zeros((nb * block, nb * block), dtype=bool)
    padded[:n, :n] = union
    blocks = padded.reshape(nb, block, nb, block)
    assert not (blocks.any(axis=(1, 3)) & ~covered).any()  # every allowed pair is visited
    for qb, kb in zip(*np.nonzero(is_full)):  # a full block needs no mask
        assert union[qb * block : (qb + 1) * block, kb * block : (kb + 1) * block].all()


@pytest.mark.parametrize("causal", [False, True])
def test_useful_flops_count_the_mask(causal):
    config = make_config((12, 20, 50), (1, 3, 4), is_causal=causal)
    b, n, h, d = 2, 45, 5, 8
    pairs = sum(
        pattern_mask(p, n, is_causal=causal).sum()
        for patterns in config.head_patterns(h)
        for p in patterns
    )
    assert useful_flops(config, b, n, h, d) == 4 * b * d * pairs


def test_max_abs_err_is_the_tolerance_measure():
    rng = np.random.default_rng(3)
    a, e = rng.standard_normal((2, 50)), rng.standard_normal((2, 50))
    a[0, :3] = e[0, :3] = -np.inf
    a[1, 0] = e[1, 0] = np.nan
    for got in (
        a,
        np.where(np.arange(50) == 7, np.nan, a),
        np.where(np.arange(50) == 9, np.inf, a),
    ):
        assert max_abs_err(torch.from_numpy(got), torch.from_numpy(e)) == max_abs_error(got, e)


@pytest.mark.parametrize("dense", [True, False])
def test_naive_dilated_float64_is_the_definition(dense):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 37, 5, 4)) for _ in range(3))
    for segs, rates, causal, mode in [
        ((10, 37), (3, 2), True, "longnet"),
        ((6, 50), (7, 1), False, "grouped"),
    ]:
        ref = dense_dilated_attention(q, k, v, segs, rates, is_causal=causal, mode=mode)
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        got = naive_dilated(tq, tk, tv, segs, rates, is_causal=causal, mode=mode, dense=dense)
        assert max_abs_error(got[0].numpy(), ref[0]) <= 1e-12
        assert max_abs_error(got[1].numpy(), ref[1]) <= 1e-12


def test_importing_the_scripts_does_not_initialise_cuda():
    code = (
        "import torch, ringsim.gpu.harness.check, ringsim.gpu.harness.bench, "
        "ringsim.gpu.harness.bench_backward, ringsim.gpu.harness.bench_ring; "
        "assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_check_records_an_exception_as_a_failing_row():
    from ringsim.gpu.harness.check_rows import emit

    def explode():
        raise RuntimeError("kernel exploded\nmore detail")

    rows: list = []
    ref = (torch.randn(4, 3), torch.randn(4))
    row, got = emit(rows, ("dilated", "flash", "bfloat16", 1, 4, "A"), explode, ref, (1, 1), "x")
    assert got is None and rows == [row] and not row.passed
    assert row.note == "RuntimeError: kernel exploded"


def test_lse_in_base_2_is_reported_loudly():
    from ringsim.gpu.harness.check_rows import lse_base_note

    ref = torch.randn(3, 50, dtype=torch.float64) + 6
    assert "LSE BASE MISMATCH" in lse_base_note((ref / math.log(2)).float(), ref, 1e-3)
    assert lse_base_note(ref.float() + 0.5, ref, 1e-3) == ""


def test_bench_ring_smoke_writes_every_problem(tmp_path):
    """One CPU process (gloo): every problem, both passes, the bytes against the closed form."""
    result = subprocess.run(
        [sys.executable, "-m", "ringsim.gpu.harness.bench_ring", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "bench_ring_smoke.json").read_text())
    rows = report["rows"]
    assert {r["problem"] for r in rows} == {"a", "b", "c"}
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["ms"] > 0 and r["one_gpu_ms"] > 0 for r in rows)
    assert all(r["bytes_sent"] == r["closed_form_bytes"] for r in rows)
    for key in ("device", "torch", "nccl", "date", "world_size"):
        assert key in report


def test_without_out_results_go_to_a_new_temporary_folder(tmp_path):
    """``check --smoke`` wrote into docs/results/ by default: a dirty tree after a check."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "ringsim.gpu.harness.check", "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    written = list(tmp_path.glob("ringsim-check-*/check_smoke.json"))
    assert len(written) == 1 and str(written[0]) in result.stdout, result.stdout[-2000:]


def test_idle_stretches_count_overlapping_kernels_once():
    """The profile's timeline: kernels on two streams that overlap are one busy stretch, the
    wait before the first kernel is idle, and the longest gaps come first with the kernel
    that ends each."""
    from ringsim.gpu.harness.profile import idle_stretches

    kernels = [(10, 20, "a"), (15, 30, "b"), (40, 50, "c"), (45, 48, "d"), (62, 63, "e")]
    found = idle_stretches(kernels, origin=0, gaps=2)
    assert (found["first_us"], found["span_us"]) == (10, 63)
    assert found["idle_us"] == 63 - (20 + 10 + 1)
    assert [(g["us"], g["at_us"], g["before"]) for g in found["gaps"]] == [
        (12, 50, "e"),
        (10, 30, "c"),
    ]


def test_memory_probe_finds_what_is_live_at_the_peak():
    """``scripts/probe_one_gpu.py memory-peak`` replays the allocator's trace: the peak, the
    allocation that reached it, and the bytes live then by this project's allocating line."""
    import importlib.util

    path = Path(__file__).parents[1] / "scripts" / "probe_one_gpu.py"
    spec = importlib.util.spec_from_file_location("probe_one_gpu", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)

    def at(name, line):
        return [{"filename": "/t/torch/x.py", "line": 1, "name": "op"},
                {"filename": f"/r/gpu/executor/{name}", "line": line, "name": "f"}]  # fmt: skip

    trace = [
        {"action": "alloc", "addr": 1, "size": 10, "frames": at("a.py", 3)},
        {"action": "alloc", "addr": 2, "size": 5, "frames": at("b.py", 4)},
        {"action": "free_requested", "addr": 1, "size": 10},
        {"action": "free_completed", "addr": 1, "size": 10},
        {"action": "alloc", "addr": 3, "size": 7, "frames": []},
    ]
    peak, reached_by, sites = probe.live_at_peak(trace)
    assert peak == 15 and reached_by == "gpu/executor/b.py:4 f"
    assert sites == {"gpu/executor/a.py:3 f": 10, "gpu/executor/b.py:4 f": 5}
