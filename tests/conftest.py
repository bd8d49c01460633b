"""Shared fixtures for the test suite, and the hypothesis profiles.

Profiles: ``ci`` (default: derandomized, 60 examples, no deadline) and ``thorough``
(``HYPOTHESIS_PROFILE=thorough pytest ...``: 1000 random examples).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60, database=None)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def fresh_plans():
    """Plans are cached (``rank_plan``): a test that patches a plan function (the mutants)
    must neither reuse nor leave behind plans made with other code."""
    from ringsim.plan import clear_plan_caches

    clear_plan_caches()
    yield
    clear_plan_caches()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the test's id: random inputs, the same on every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def interpreted(monkeypatch):
    """Triton's interpreter for this test: the executor's mixing and summing kernels run on
    CPU tensors (``mix_reason`` lets them). Returns the kernel module, imported under the
    interpreter the first time (a process that compiled it for CUDA cannot interpret it)."""
    import importlib

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("ringsim.gpu.executor.merge.INTERPRET_ON_CPU", True)
    return importlib.import_module("ringsim.gpu.executor.mix_triton")


@pytest.fixture
def no_tf32():
    """Full float32 matrix products for the test (the fp32 bounds assume them), restored after."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
