"""The conformance suite on the ranks of a user's ring: under mpiexec (P = 2, 3, 4, both
layouts), under torchrun with gloo, ring mutants diagnosed, a rank that raises, and a ring
that hangs stopped by the per-case time limit."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from ringsim.conformance import Options
from ringsim.conformance.calls import Outcome
from ringsim.conformance.diagnosis import OUTPUT_INVISIBLE, summarise
from ringsim.conformance.judge import judge
from ringsim.conformance.options import inputs_seed, select_cases
from ringsim.conformance.patching import applied
from ringsim.conformance.ring_mutants import RING_MUTANTS
from ringsim.launch import mpi_available, mpiexec_command, run_job
from ringsim.reference.simulate import run_case

ROOT = Path(__file__).resolve().parents[1]
TARGETS = str(ROOT / "tests" / "conform_targets.py")
EXAMPLES = ROOT / "examples"

needs_mpi = pytest.mark.skipif(mpi_available() is not None, reason=str(mpi_available()))


def under_mpiexec(nprocs: int, target: str, *args: str) -> subprocess.CompletedProcess:
    command = mpiexec_command(nprocs, "ringsim.conform", [target, "--kind", "shard", *args])
    return run_job(command, timeout=240)


def last_line(done: subprocess.CompletedProcess) -> str:
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_an_mpi4py_ring_passes_at_every_world_size(world_size):
    example = under_mpiexec(world_size, f"{EXAMPLES}/mpi_ring.py:ring_attention",
                            "--returns", "out,lse", "--cases", "6")  # fmt: skip
    assert example.returncode == 0, example.stdout + example.stderr
    line = last_line(example)
    assert line.startswith("PASS conform") and f"world_size={world_size}" in line, line
    assert example.stdout.count("PASS conform") == 1  # rank 0 alone reports
    ours = under_mpiexec(world_size, f"{TARGETS}:mpi_ring", "--returns", "out,lse",
                         "--modes", "longnet,grouped", "--layout-shard", "zigzag")  # fmt: skip
    assert ours.returncode == 0, ours.stdout + ours.stderr


@needs_mpi
@pytest.mark.mpi
def test_a_ring_with_grouped_query_attention():
    done = under_mpiexec(3, f"{TARGETS}:mpi_ring", "--returns", "out,lse", "--gqa",
                         "--modes", "longnet,grouped", "--cases", "4")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kv_heads=" in done.stdout and last_line(done).startswith("PASS conform")


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize(
    ("target", "layout", "pitfall"),
    [
        ("ring_shard_relative", "contiguous", "(pitfall 1)"),
        ("ring_triangle_every_step", "contiguous", "(pitfall 5)"),
        ("ring_late_chunk_first", "zigzag", "(pitfall 19)"),
    ],
)
def test_ring_mutants_are_diagnosed(target, layout, pitfall):
    done = under_mpiexec(3 if layout == "contiguous" else 2, f"{TARGETS}:{target}",
                         "--returns", "out,lse", "--layout-shard", layout,
                         "--modes", "longnet,grouped", "--cases", "4")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("FAIL conform"), lines[-1]
    assert lines[-2].startswith("diagnosis: your output equals") and pitfall in lines[-2]
    repro = next(x.strip() for x in lines if x.strip().startswith("mpiexec -n"))
    assert "--kind shard" in repro and "--case " in repro


@needs_mpi
@pytest.mark.mpi
def test_a_rank_that_raises_fails_the_case_naming_it():
    done = under_mpiexec(3, f"{TARGETS}:ring_raises_on_rank_one", "--returns", "out,lse",
                         "--cases", "0", "--case", "0")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rank 1: raised RuntimeError: rank 1 lost its kernel" in done.stdout
    assert last_line(done).startswith("FAIL conform")


@needs_mpi
@pytest.mark.mpi
def test_a_hanging_ring_is_stopped_by_the_time_limit():
    done = under_mpiexec(3, f"{TARGETS}:ring_sleeps_on_rank_one", "--timeout", "2",
                         "--cases", "0", "--case", "0")  # fmt: skip
    assert done.returncode != 0
    assert "case 0 did not finish within 2 s" in done.stderr, done.stderr
    assert "PASS" not in done.stdout


def under_torchrun(nprocs: int, target: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nprocs}", "-m", "ringsim.conform", target,
               "--kind", "shard", "--backend", "torch", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
@pytest.mark.parametrize("world_size", [2, 3])
def test_torch_rings_pass_under_gloo(world_size):
    example = under_torchrun(world_size, f"{EXAMPLES}/torch_ring.py:ring_attention",
                             "--returns", "out,lse", "--cases", "4")  # fmt: skip
    assert example.returncode == 0, example.stdout + example.stderr
    assert last_line(example).startswith("PASS conform")
    assert f"world_size={world_size}" in last_line(example)
    if world_size == 2:  # ringsim.gpu's ring, gradients included, zigzag
        ours = under_torchrun(2, f"{TARGETS}:torch_ring", "--returns", "out,lse", "--grad",
                              "--modes", "longnet,grouped", "--layout-shard", "zigzag",
                              "--cases", "3")  # fmt: skip
        assert ours.returncode == 0, ours.stdout + ours.stderr
        assert "grad err" in ours.stdout


@pytest.mark.parametrize("name", sorted(set(RING_MUTANTS) - OUTPUT_INVISIBLE))
def test_every_ring_mutant_as_a_users_ring_is_diagnosed(name):
    """The simulated ring with the mutant in place plays the user's ring at P = 3; its
    joined output, judged as the shard kind judges one, is diagnosed as that mutant."""
    layout = "zigzag" if name == "late-chunk-first" else "contiguous"
    options = Options(kind="shard", returns="out,lse", modes=("longnet", "grouped"),
                      layout_shard=layout, cases=3)  # fmt: skip
    matches = []
    for index, case in select_cases(options, world_size=3):
        seed = inputs_seed(options, index, case)
        q, k, v = case.inputs(seed)
        with applied(RING_MUTANTS[name]):
            out, lse, _ = run_case(case, q, k, v, timeout=10.0)
        result = judge(options, index, case, seed, "", (q, k, v), None, Outcome(out, lse), None)
        if not result.ok:
            matches.append(result.matches)
    assert matches, f"{name} passed every case"
    assert summarise(matches).name == name, matches


@needs_mpi
@pytest.mark.mpi
def test_a_ring_with_key_padding():
    done = under_mpiexec(3, f"{TARGETS}:mpi_ring", "--returns", "out,lse", "--key-padding",
                         "--layout-shard", "zigzag", "--cases", "4")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert last_line(done).startswith("PASS conform")
