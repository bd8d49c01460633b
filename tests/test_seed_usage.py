"""The seed's two usage snippets run as its document writes them (``examples/seed_usage.py``):
on one device, and under torchrun as a ring of 2 over gloo; a ring_size without a process
group is a clear error; ``dtype=None`` picks the seed's dtype.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ringsim.gpu import (  # noqa: E402
    RingDilatedAttentionHybrid,
    RingMultiheadDilatedAttentionHybrid,
)
from ringsim.gpu.nn.seed import seed_dtype  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "seed_usage.py"


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_seed_snippets_run_as_written(world_size):
    launch = [sys.executable] if world_size == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={world_size}",
    ]  # fmt: skip
    result = subprocess.run([*launch, str(SCRIPT)], capture_output=True, text=True, timeout=240,
                            cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(world_size):
        assert f"[rank {rank}] PASS seed usage: world_size={world_size}" in result.stdout
    assert "NaN: True" not in result.stdout


def test_a_ring_size_without_a_process_group_is_named():
    with pytest.raises(ValueError, match=r"ring_size: ring_size=2 runs over a torch\.distributed"):
        RingDilatedAttentionHybrid([2048, 4096], [1, 2], 0.1, ring_size=2)


def test_dtype_none_picks_the_seeds_dtype():
    cpu = torch.device("cpu")
    assert seed_dtype(None, cpu) is torch.float32
    assert seed_dtype(torch.float64, cpu) is torch.float64
    assert seed_dtype(None, None) is None
    module = RingDilatedAttentionHybrid([8], [1], device=cpu)
    assert module.input_dtype is torch.float32
    with pytest.raises(TypeError, match=r"dtype: the module was built for torch\.float32"):
        module(*(torch.zeros(1, 8, 2, 4, dtype=torch.float64) for _ in range(3)))
    assert RingDilatedAttentionHybrid([8], [1]).input_dtype is None  # no device: any dtype
    multihead = RingMultiheadDilatedAttentionHybrid(8, 2, [8], [1], device=cpu)
    assert multihead.in_proj_weight.dtype is torch.float32
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert seed_dtype(None, torch.device("cuda")) is torch.bfloat16
