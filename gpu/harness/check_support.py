"""Pieces shared by the device check (:mod:`ringsim.gpu.harness.check`) and the benchmark
(:mod:`ringsim.gpu.harness.bench`): the plain formula in one dtype, the error measure, the
environment record and the tables.

:func:`naive_dilated` is spec §3, §4 written plainly in torch with every operation in one
dtype. In float64 it is the dense-mask definition (the NumPy oracle
:func:`ringsim.reference.dense_dilated_attention` transcribed, and checked against it by the
check); in bf16/fp16 it is spec §9's baseline, "the plain dense-mask formula evaluated in that
dtype". With ``dense=False`` it evaluates the same formula segment by segment on the selected
rows only: a masked score adds ``exp(-inf) = 0`` exactly, so only the order of the sums
inside the matrix products and reductions differs, and memory is O(n w) instead of O(n^2).

Importing this module imports torch but never initialises CUDA.
"""

from __future__ import annotations

import math
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ringsim.cases import Case
from ringsim.config import Pattern, segment_bounds, selected_in_segment, validate
from ringsim.reference.dense import pattern_mask
from ringsim.tolerance import low_precision_bound, tolerance

#: A cache of dense masks, ``(pattern, n, is_causal) -> (n, n)`` bool on the device.
MaskCache = dict[tuple[Pattern, int, bool], torch.Tensor]


@dataclass(frozen=True)
class Check:
    """A configuration and what runs on it besides every single-device kernel."""

    name: str
    case: Case
    flex_dtypes: tuple[str, ...] = ()  # FlexAttention compiles per shape and dtype: few
    rings: tuple[int, ...] = ()  # simulated ring world sizes
    ring_kernels: bool = False  # ring with every kernel in the first dtype, not only auto
    grads: bool = False  # also check dq, dk, dv (:mod:`ringsim.gpu.harness.check_grad`)
    masks: bool = False  # key padding and fewer K/V heads (:mod:`ringsim.gpu.harness.check_masks`)


@dataclass(frozen=True)
class Plan:
    """What one run of the device check covers (``smoke``, ``quick`` or ``full``)."""

    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]
    adapter_shapes: tuple[tuple[int, int, int, int], ...]
    checks: tuple[Check, ...]
    oracle_cases: tuple[Case, ...]
    dense_max: int
    flex_dtypes: tuple[str, ...] = ()  # adapter checks of FlexAttention (a compile each)


def plain_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention with every operation in q's dtype (no upcast anywhere).

    Args:
        q, k, v: ``(..., M, D)``, ``(..., L, D)``, ``(..., L, D)``, one dtype.
        allowed: ``(M, L)`` bool (or broadcastable to the scores, e.g. ``(b, 1, M, L)``),
            True = attend; None attends everything.
    Returns:
        out ``(..., M, D)`` (0 on a row with no key) and lse ``(..., M)`` (-inf there),
        both in q's dtype.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    probs = torch.where(torch.isneginf(lse)[..., None], 0.0, probs)  # empty row: NaN -> 0
    return torch.matmul(probs, v), lse


def causal_mask(m: int, device: torch.device) -> torch.Tensor:
    """``(m, m)`` lower triangle (True = attend)."""
    return torch.ones(m, m, dtype=torch.bool, device=device).tril()


def mix_patterns(
    outs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """LongNet eq. 10 in the tensors' own dtype: ``outs[i] (b, n, h, d)``, ``lses[i] (b, h, n)``
    -> ``sum_i exp(lse_i - L) o_i`` and ``L = logsumexp_i lse_i`` (0 and -inf on empty rows)."""
    total = torch.logsumexp(torch.stack(lses), dim=0)  # (b, h, n)
    out = torch.zeros_like(outs[0])
    for o, lse in zip(outs, lses):
        weight = torch.where(torch.isneginf(lse), 0.0, torch.exp(lse - total))
        out = out + weight.transpose(1, 2)[..., None] * o
    return out, total


def _blocks(pattern: Pattern, n: int, causal: bool, device, dense: bool, masks: MaskCache | None):
    """``(rows (m,), allowed (m, m) | None)`` blocks that together cover one pattern."""
    if dense:  # the definition: all n rows, the pattern's (n, n) mask
        key = (pattern, n, causal)
        mask = None if masks is None else masks.get(key)
        if mask is None:
            mask = torch.from_numpy(pattern_mask(pattern, n, is_causal=causal)).to(device)
            if masks is not None:
                masks[key] = mask
        yield torch.arange(n, device=device), mask
        return
    for start, stop in segment_bounds(pattern.segment_length, n):
        rows = torch.as_tensor(selected_in_segment(pattern, start, start, stop), device=device)
        if len(rows):
            yield rows, (causal_mask(len(rows), device) if causal else None)


def naive_dilated(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths,
    dilation_rates,
    *,
    is_causal: bool = False,
    mode: str = "longnet",
    softmax_scale: float | None = None,
    dtype: torch.dtype | None = None,
    dense: bool = True,
    masks: MaskCache | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """spec §3, §4 with every operation in ``dtype`` (default q's).

    Args:
        q, k, v: ``(b, n, h, d)``, cast to ``dtype`` first; k, v may have fewer heads
            (grouped-query attention: query head i reads K/V head ``i // (h / h_kv)``).
        key_padding_mask: ``(b, n)`` bool, True = padding: never a key.
        dense: True builds each pattern's ``(n, n)`` mask (O(n^2) memory, one head at a
            time); False attends the selected rows of each segment (O(n w)).
        masks: an optional cache of the dense masks, reused across calls.
    Returns:
        out ``(b, n, h, d)`` and lse ``(b, h, n)``, both in ``dtype``.
    """
    config = validate(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        mode=mode,
        softmax_scale=softmax_scale,
        allow_gqa=True,
    )
    dtype = q.dtype if dtype is None else dtype
    q, k, v = (x.to(dtype) for x in (q, k, v))
    b, n, h, d = q.shape
    ratio = h // k.shape[2]
    scale = config.scale(d)
    outs = [torch.zeros_like(q) for _ in range(config.num_pairs)]
    lses = [torch.full((b, h, n), -math.inf, dtype=dtype, device=q.device) for _ in outs]
    for group in config.pattern_groups(h):
        chunks = [(head,) for head in group.heads] if dense else [group.heads]
        for rows, allowed in _blocks(group.pattern, n, config.is_causal, q.device, dense, masks):
            if key_padding_mask is not None:  # (b, 1, m, m): the keys that stay
                keep = ~key_padding_mask[:, rows][:, None, None, :]
                allowed = keep if allowed is None else allowed & keep
            for chunk in chunks:
                heads = torch.as_tensor(chunk, device=q.device)

                def pick(x, rows=rows, heads=heads):  # (b, n, h, d) -> (b, H, m, d)
                    return x[:, rows][:, :, heads].transpose(1, 2)

                kv = heads // ratio
                o, lse = plain_attention(pick(q), pick(k, heads=kv), pick(v, heads=kv), allowed,
                                         scale)  # fmt: skip
                outs[group.pair][:, rows[:, None], heads[None, :]] = o.transpose(1, 2)
                lses[group.pair][:, heads[:, None], rows[None, :]] = lse
    return mix_patterns(outs, lses)


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """:func:`ringsim.tolerance.max_abs_error` computed on the tensors' device: equal
    infinities count 0, NaN on one side only counts as infinite error."""
    if actual.shape != expected.shape:
        raise ValueError(
            f"actual: shape {tuple(actual.shape)} differs from {tuple(expected.shape)}"
        )
    if actual.numel() == 0:
        return 0.0
    actual, expected = actual.reshape(-1), expected.to(actual.device).reshape(-1)
    worst = 0.0
    for start in range(0, actual.numel(), CHUNK):  # float64 copies of a chunk at a time
        a, e = actual[start : start + CHUNK].double(), expected[start : start + CHUNK].double()
        same = (a == e) | (torch.isnan(a) & torch.isnan(e))
        diff = torch.where(same, 0.0, (a - e).abs())
        worst = max(worst, float(torch.where(torch.isnan(diff), math.inf, diff).max()))
    return worst


#: Elements :func:`max_abs_err` compares at once (float64 temporaries of 1 GiB at most).
CHUNK = 2**27


def is_low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def bounds(dtype: torch.dtype, naive_a: float, naive_b: float, kind: str = "out"):
    """spec §9 for two measured errors (out and lse, or dq and dk/dv with ``kind="grad"``):
    fixed for float32/64, else 2x (out) or 3x (grad) the naive same-dtype error + 1e-6."""
    if is_low_precision(dtype):
        return low_precision_bound(naive_a, kind), low_precision_bound(naive_b, kind)
    return tolerance(dtype), tolerance(dtype)


@dataclass
class Row:
    """One line of the check's table."""

    path: str  # reference / adapter / dilated / ring
    kernel: str
    dtype: str
    world_size: int
    n: int
    config: str
    err_out: float
    err_lse: float
    bound_out: float
    bound_lse: float
    reference: str  # what the error is measured against
    note: str = ""
    passed: bool = field(init=False)

    def __post_init__(self) -> None:  # NaN compares False: it fails
        self.passed = self.err_out <= self.bound_out and self.err_lse <= self.bound_lse

    def cells(self) -> list[str]:
        return [
            self.path,
            self.kernel,
            self.dtype,
            str(self.world_size),
            str(self.n),
            self.config,
            f"{self.err_out:.2e}",
            f"{self.err_lse:.2e}",
            f"{self.bound_out:.1e}/{self.bound_lse:.1e}",
            "PASS" if self.passed else "FAIL",
        ]

    def record(self) -> dict:
        return asdict(self)


ROW_HEADER = ["path", "kernel", "dtype", "P", "n", "config", "err out", "err lse", "bound", ""]


def environment(device: torch.device) -> dict:
    """Where the numbers come from: device, torch, CUDA, cuDNN, date (UTC)."""
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device_type": device.type,
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info["device"] = torch.cuda.get_device_name(device)
        info["capability"] = f"sm{major}{minor}"
        info["cudnn"] = torch.backends.cudnn.version()
        info["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        info["device"] = f"CPU ({platform.machine()})"
    return info


def draw(shape, dtype, seed: int, device) -> tuple[torch.Tensor, ...]:
    """Three unit-normal tensors drawn in float64 from ``seed``, rounded to ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=gen, dtype=torch.float64, device=device).to(dtype)
        for _ in range(3)
    )


def setup_device() -> dict:
    """Full float32 matrix products (no TF32), and room for FlexAttention's recompiles (one
    per block shape and dtype; past dynamo's limit it would silently run uncompiled)."""
    import torch._dynamo.config as dynamo_config

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit, 64)
    return {
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.fp32_precision": getattr(torch.backends.cuda.matmul, "fp32_precision", None),
        f"dynamo.{limit}": getattr(dynamo_config, limit),
    }


def summary(rows: list[Row], failed: list[Row], seconds: float, path: Path) -> str:
    """The last lines: failures in full, then the tightest margin per path and dtype."""
    passed = f"{len(rows) - len(failed)}/{len(rows)} rows pass"
    lines = ["", f"== summary: {passed} in {seconds:.0f} s; wrote {path}"]
    lines += ["FAIL " + "  ".join(r.cells()[:9]) + f"  {r.note}" for r in failed[:40]]
    lines += [f"FAIL ... and {len(failed) - 40} more (see the JSON)"] if len(failed) > 40 else []
    margins: dict[tuple[str, str], float] = {}
    for r in rows:
        ratio = max(r.err_out / r.bound_out, r.err_lse / r.bound_lse)
        key = (r.path, r.dtype)
        margins[key] = max(margins.get(key, 0.0), ratio)
    lines += [f"  worst error/bound {p:9s} {d:8s} {m:.3f}" for (p, d), m in sorted(margins.items())]
    return "\n".join(lines)
