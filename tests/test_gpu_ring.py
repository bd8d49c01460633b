"""The torch ring: on the simulated cluster (P = 1..8) and as real gloo processes (P = 2..4).

Needs torch (the ``torch`` extra, installed by the project's set-up); skipped otherwise.
The gloo runs start their own processes on free local ports, each bounded by a timeout.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ring_support import WORLD_SIZES, ring_cases, run_ring  # noqa: E402

from ringsim.cases import Case  # noqa: E402
from ringsim.comm import CommError, SimulatedCluster  # noqa: E402
from ringsim.gpu import ring_dilated_attention, simulated_ring_dilated_attention  # noqa: E402
from ringsim.reference.parity import check_case  # noqa: E402


def torch_ring(case: Case, q, k, v, dtype=torch.float64, kernel=None):
    tensors = [torch.from_numpy(x).to(dtype) for x in (q, k, v)]
    out, lse, trace = simulated_ring_dilated_attention(
        *tensors,
        case.segment_lengths,
        case.dilation_rates,
        world_size=case.world_size,
        **case.kwargs(),
        return_lse=True,
        return_trace=True,
        kernel=kernel,
        layout=case.layout,
    )
    return out.double().numpy(), lse.double().numpy(), trace


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("kernel", ["math", "flash_cpu"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_simulated_torch_ring_matches_definition(world_size, kernel, layout):
    failures = []
    for i, case in enumerate(ring_cases([world_size], per_size=8, seed=17, layout=layout)):
        q, k, v = case.inputs(seed=i)
        out, lse, _ = torch_ring(case, q, k, v, kernel=kernel)
        report = check_case(case, out, lse, q, k, v)
        if not report.ok:
            failures.append(report.line())
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("segs", "rates", "strided"),
    [
        ((4, 8), (1, 2), True),  # every segment inside a chunk: nothing travels
        ((8,), (2,), True),
        ((16, 64), (1, 2), True),  # the whole sequence: blocks of two pieces
        ((4, 32, 64), (1, 2, 4), True),  # half the sequence too (whole chunks)
        ((24, 64), (1, 2), False),  # 24 does not divide n: the general path
        ((6,), (1,), False),
    ],
)
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize(("batch", "mode"), [(1, "longnet"), (2, "longnet"), (1, "grouped")])
def test_zigzag_strided_path_matches_definition(segs, rates, strided, world_size, batch, mode):
    """Note [Strided pieces]: zigzag configurations aligned on chunks run on strided views,
    a segment longer than a chunk as pieces; forward and gradients match the definition,
    causal and not, one batch entry or two (views of the accumulators either way), every
    head on every pair or one head group per pair."""
    from ringsim.config import make_config
    from ringsim.gpu.executor.base import strided as uses_strided
    from ringsim.plan import rank_plan
    from ringsim.reference.parity import check_gradients

    n = 64
    for causal in (False, True):
        config = make_config(segs, rates, is_causal=causal, mode=mode)
        plan = rank_plan(config, 4 * len(segs), n, world_size, 0, "zigzag")
        # at P = 1 zigzag is the contiguous layout: strided when aligned
        want = strided if world_size > 1 else config.is_aligned(n)
        assert uses_strided(config, plan) is want
        heads = 4 * len(segs)
        case = Case(batch, n, heads, 8, segs, rates, causal, mode, world_size, layout="zigzag")
        q, k, v = case.inputs(seed=3)
        dout = case.upstream(seed=3)
        tensors = [torch.from_numpy(x).requires_grad_() for x in (q, k, v)]
        out, lse = simulated_ring_dilated_attention(
            *tensors, segs, rates, world_size=world_size, is_causal=causal, layout="zigzag",
            mode=mode, return_lse=True,
        )  # fmt: skip
        out.backward(torch.from_numpy(dout))
        report = check_case(case, out.detach().numpy(), lse.detach().numpy(), q, k, v)
        assert report.ok, report.line()
        grads = [x.grad.numpy() for x in tensors]
        grad_report = check_gradients(case, grads, q, k, v, dout)
        assert grad_report.ok, grad_report.line()


def test_a_piece_that_overwrites_instead_of_merging_is_caught(monkeypatch):
    """Note [Strided pieces]: each piece's result merges into its chunk of the running
    result; the mutant that overwrites it loses the other pieces' keys."""
    from ringsim.gpu.executor import forward as executor

    def overwrite(out, lse, block_out, block_lse):
        out.copy_(block_out)
        lse.copy_(block_lse)

    monkeypatch.setattr(executor, "merge_", overwrite)
    case = Case(1, 64, 4, 8, (16, 64), (1, 2), True, "longnet", 2, layout="zigzag")
    q, k, v = case.inputs(seed=1)
    out, lse, _ = torch_ring(case, q, k, v)
    assert not check_case(case, out, lse, q, k, v).ok


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_torch_ring_float32_within_spec(layout):
    for i, case in enumerate(ring_cases([3, 4], per_size=4, seed=2, layout=layout)):
        q, k, v = case.inputs(seed=i, dtype=np.float32)
        out, lse, _ = torch_ring(case, q, k, v, dtype=torch.float32)
        report = check_case(case, out.astype(np.float32), lse.astype(np.float32), q, k, v)
        assert report.ok, report.line()


@pytest.mark.parametrize(
    "case",
    ring_cases([2, 3, 5], per_size=3, seed=8) + ring_cases([2, 4], per_size=2, layout="zigzag"),
    ids=lambda c: c.describe(),
)
def test_torch_trace_equals_numpy_trace(case):
    """Both backends run one plan: the same messages, bytes and block actions."""
    q, k, v = case.inputs(seed=1)
    *_, numpy_trace = run_ring(case, q, k, v)
    *_, torch_trace = torch_ring(case, q, k, v)
    assert torch_trace.events == numpy_trace.events


def test_peak_bytes_halve_when_world_size_doubles():
    peaks = {}
    for p in (2, 4, 8):
        case = Case(1, 64, 4, 8, (64, 64), (1, 4), False, "longnet", p)
        *_, trace = torch_ring(case, *case.inputs(seed=3))
        peaks[p] = max(trace.peak_bytes)
    assert peaks[4] <= 0.55 * peaks[2] and peaks[8] <= 0.55 * peaks[4], peaks


def test_ranks_that_disagree_fail_together():
    q, k, v = (torch.randn(1, 24, 2, 4, dtype=torch.float64) for _ in range(3))

    def rank_main(comm):
        lo = comm.rank * 8
        segs = (12,) if comm.rank == 2 else (24,)
        return ring_dilated_attention(
            q[:, lo : lo + 8], k[:, lo : lo + 8], v[:, lo : lo + 8], segs, (2,), comm=comm
        )

    with pytest.raises(CommError, match="disagree"):
        SimulatedCluster(3, timeout=5.0).run(rank_main)


def test_a_remembering_communicator_agrees_once_per_configuration():
    """With an ``agreed`` memory (the torch.distributed communicator has one) a repeated
    configuration communicates nothing and a new one agrees again. The price: a rank that
    changes its configuration while the others repeat theirs waits alone in the agreement,
    and the run ends by the communicator's deadlock detection or timeout, not with the
    "disagree" message (documented in ringsim.agree)."""
    from collections import OrderedDict

    q, k, v = (torch.randn(1, 24, 2, 4, dtype=torch.float64) for _ in range(3))
    gathers = []

    def rank_main(comm, segments_of=lambda rank, call: (24,)):
        comm.agreed = OrderedDict()
        gather = comm.allgather
        comm.allgather = lambda obj: gathers.append(comm.rank) or gather(obj)
        lo = comm.rank * 8
        for call in range(3):
            segs = segments_of(comm.rank, call)
            ring_dilated_attention(
                q[:, lo : lo + 8], k[:, lo : lo + 8], v[:, lo : lo + 8], segs, (2,), comm=comm
            )

    SimulatedCluster(3, timeout=5.0).run(rank_main)
    assert sorted(gathers) == [0, 1, 2]  # the first call only
    gathers.clear()
    SimulatedCluster(3, timeout=5.0).run(
        lambda comm: rank_main(comm, lambda rank, call: (24,) if call < 2 else (12,))
    )
    assert sorted(gathers) == [0, 0, 1, 1, 2, 2]  # a new configuration agrees again
    with pytest.raises(CommError, match="rank 1 waits in allgather"):
        SimulatedCluster(3, timeout=5.0).run(
            lambda comm: rank_main(
                comm, lambda rank, call: (12,) if call == 2 and rank == 1 else (24,)
            )
        )


def test_bad_input_raises_before_any_rank_starts():
    x = torch.randn(1, 24, 2, 4)
    with pytest.raises(ValueError, match="world_size"):
        simulated_ring_dilated_attention(x, x, x, (24,), (2,), world_size=5)
    with pytest.raises(TypeError, match=r"q: expected a torch\.Tensor"):
        simulated_ring_dilated_attention(x.numpy(), x.numpy(), x.numpy(), (24,), (2,), world_size=2)


def test_torch_dist_communicator_needs_an_initialised_group():
    from ringsim.gpu.ring.comm import TorchDistCommunicator

    with pytest.raises(RuntimeError, match="not initialised"):
        TorchDistCommunicator()


@pytest.mark.parametrize(
    ("world_size", "layout", "masks"),
    [(2, "contiguous", ()), (3, "contiguous", ()), (4, "contiguous", ()), (3, "zigzag", ()),
     (4, "zigzag", ()), (2, "contiguous", ("--gqa", "--key-padding")),
     (3, "zigzag", ("--gqa", "--key-padding")), (4, "contiguous", ("--memory-pool",)),
     (3, "zigzag", ("--memory-pool", "--key-padding"))],
)  # fmt: skip
def test_gloo_ring_on_real_processes(world_size, layout, masks):
    """Forward and backward, one process per rank; gradients against the reference (with
    fewer K/V heads and a key padding mask: the masks; with a memory pool: every case twice,
    the checked call receiving into the buffers of the first)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ringsim.gpu.harness.distcheck",
            "--world-size",
            str(world_size),
            "--cases",
            "4",
            "--seed",
            str(world_size),
            "--timeout",
            "60",
            "--layout",
            layout,
            *masks,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"PASS distcheck backend=gloo world_size={world_size}" in result.stdout
    assert "max_grad_error=" in result.stdout
    flags = f"gqa={'--gqa' in masks} key_padding={'--key-padding' in masks}"
    assert f"layout={layout} {flags}" in result.stdout
    assert ("memory_pool=" in result.stdout) == ("--memory-pool" in masks)


def test_distcheck_ends_a_dead_worker_in_one_line(monkeypatch, capsys):
    """A worker killed, stopped or failing ends the check with one FAIL line and exit 1,
    not a ProcessExitedException traceback."""
    from ringsim.gpu.harness import distcheck

    def spawn(*args, **kwargs):
        raise distcheck.mp.ProcessExitedException(
            "process 1 terminated with signal SIGKILL", error_index=1, error_pid=1,
            exit_code=-9, signal_name="SIGKILL",
        )  # fmt: skip

    monkeypatch.setattr(distcheck.mp, "spawn", spawn)
    assert distcheck.main(["--world-size", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("FAIL distcheck world_size=2: process 1 terminated with signal")
    assert "Traceback" not in err
