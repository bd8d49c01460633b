"""Variants of the forward's mixing kernel (:mod:`ringsim.gpu.executor.mix_triton`), checked
against it and timed on the parts the executor really keeps.

    python scripts/bench_mix_variants.py [OUT.json] [--n 1048576 262144]   (a GPU machine)
    python scripts/bench_mix_variants.py --tiny-cpu   (CPU: Triton's interpreter, n=256)

The parts come from one call of ``ringsim.gpu.dilated_attention`` (b=1, h=16, d=128, bf16,
w=(2048..32768), r=(1..16), causal and not) whose ``mix_`` is wrapped to keep its arguments,
so the variants read the same tensors, strides and table as the executor's own mix. Each
variant is checked against the baseline (out within bf16 rounding, lse within 1e-4, the same
-inf and NaN rows), then timed with CUDA events (3 warm-up, median of 20); TB/s counts the
bytes the mix needs: every part's out and lse read once, out and lse written once. Each row
also has the registers per thread and the kernel's SASS size (static, every pair unrolled).

Variants (each a hypothesis about the baseline's 1.7 TB/s, 194 registers, issue-bound):

A  the general kernel ``_mix_kernel`` as ``mix_`` launched it (the reference of the checks):
   per-element int64 addresses, online merge, masked loads of every pair; ``A-mix_``: ``mix_``
   as it is now (it may pick residue programs, as F). A-D convert and multiply-add the whole
   BLOCK_N x BLOCK_D tile for each of the 5 pairs, though a position has 1.94 on average
   (the masked lanes load 0, the ALU work remains).
B  lean addressing: the program's block and first row of each pair are scalars (BLOCK_N
   divides W, r divides BLOCK_N), so each tile is one int64 base plus int32 offsets; and
   BLOCK_D may split d over a 3rd grid axis. Tests: address math and live/col masks cost
   registers and issue slots.
C  B + two phases: the max of all pairs' lse first (cheap), then ``acc += e_i part_i`` with
   no rescale of acc. Tests: the online rescale (a BLOCK_N x BLOCK_D multiply per pair).
   ``hm``: heads-major program order (a head's positions consecutive, not a position's heads).
D  C + dense loads: pair i's picked rows of a program are BLOCK_N/r consecutive rows of its
   part; load them as one dense tile and spread them with a where over a (BLOCK_N/r, r, D)
   view + reshape. Tests: issue slots of the (r-1)/r masked-off lanes of each pair's loads.
F  residue programs: a program takes the positions p0 + s + R t (R = max rate, s = its
   residue): whether pair i covers them is then the same for the whole program
   (s mod r_i = offset), so a scalar branch skips the pairs that do not, and the others are
   read with no mask at all (rows R/r apart). Tests: the ALU and load work of pairs that do
   not apply (A-D do it for all 5); ``ef``: loads marked evict_first.
E  roofline: a flat Triton kernel that reads 1.94x and writes 1x the output contiguously
   (``dst = a + b``), and torch's ``copy_``: what streaming reaches on this GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback

if "--tiny-cpu" in sys.argv:  # before Triton is imported: kernels are interpreted on the CPU
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.language as tl

from ringsim.gpu import dilated_attention
from ringsim.gpu.executor import forward as executor
from ringsim.gpu.executor import merge, mix_triton
from ringsim.gpu.executor.schedule import Schedule

POS = float("inf")


@triton.jit
def _pair(table, i, heads, head, batch, seq_len, p_first, WIDTH: tl.constexpr,
          RATE: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """Pair i for this head: its pattern offset, the scalar offsets of the part's row that
    holds position ``p_first`` (out in elements, lse in floats) and the row strides (int32)."""
    e = table + (i * heads + head) * 9
    block, row0 = batch * (seq_len // WIDTH) + p_first // WIDTH, (p_first % WIDTH) // RATE
    at = (tl.load(e) + block * tl.load(e + 3) + tl.load(e + 4) + row0 * tl.load(e + 5)) * VEC
    lse_at = tl.load(e + 1) + block * tl.load(e + 6) + tl.load(e + 7) + row0 * tl.load(e + 8)
    sm, lm = (tl.load(e + 5) * VEC).to(tl.int32), tl.load(e + 8).to(tl.int32)
    return tl.load(e + 2), at, lse_at, sm, lm


@triton.jit
def _max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)  # a NaN lse propagates


@triton.jit
def _pair_lse(lse, lse_at, lm, t, off, RATE: tl.constexpr):
    x = tl.load(lse + lse_at + (t // RATE) * lm, mask=(t % RATE) == off, other=float("-inf"))
    return tl.where(x == float("inf"), float("-inf"), x)  # flash's empty row


@triton.jit
def _pair_out(out, at, sm, t, cols, off, RATE: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, DENSE: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
    if DENSE:  # the BLOCK_N / r picked rows are consecutive rows of the part
        j = tl.arange(0, BLOCK_N // RATE)
        ptrs = out + at + (j * sm)[:, None] + cols[None, :]
        part = tl.load(
            ptrs, mask=((j * 0 + off) >= 0)[:, None], other=0.0, eviction_policy=EVICT
        ).to(tl.float32)
        if RATE > 1:  # row j of the tile is position off + r j: spread over (BLOCK_N/r, r)
            spread = (tl.arange(0, RATE) == off)[None, :, None]
            part = tl.reshape(tl.where(spread, part[:, None, :], 0.0), (BLOCK_N, BLOCK_D))
    else:
        ptrs = out + at + ((t // RATE) * sm)[:, None] + cols[None, :]
        picked = ((t % RATE) == off)[:, None]
        part = tl.load(ptrs, mask=picked, other=0.0, eviction_policy=EVICT).to(tl.float32)
    return part


@triton.jit
def _tile_kernel(table, out, lse, seq_len, heads, so0, so1, so2, sl0, sl1, sl2,
                 WIDTHS: tl.constexpr, RATES: tl.constexpr, VEC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TWO_PHASE: tl.constexpr,
                 DENSE: tl.constexpr, HEAD_MAJOR: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
    """Variants B, C, D: BLOCK_N consecutive positions of one head, BLOCK_D columns."""
    if HEAD_MAJOR:
        head, p0 = tl.program_id(0) // (seq_len // BLOCK_N), tl.program_id(0) % (seq_len // BLOCK_N)
    else:
        head, p0 = tl.program_id(0) % heads, tl.program_id(0) // heads
    p0 = p0 * BLOCK_N
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.arange(0, BLOCK_N)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    if TWO_PHASE:  # the largest lse of all pairs first: no rescale of acc below
        for i in tl.static_range(len(WIDTHS)):
            off, at, lse_at, sm, lm = _pair(table, i, heads, head, batch, seq_len, p0,
                                            WIDTHS[i], RATES[i], VEC)  # fmt: skip
            best = _max(best, _pair_lse(lse, lse_at, lm, t, off, RATES[i]))
    shift = tl.where(best == float("-inf"), 0.0, best)
    total = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        off, at, lse_at, sm, lm = _pair(table, i, heads, head, batch, seq_len, p0,
                                        WIDTHS[i], RATES[i], VEC)  # fmt: skip
        pair_lse = _pair_lse(lse, lse_at, lm, t, off, RATES[i])
        if not TWO_PHASE:  # online, as the baseline
            grown = _max(best, pair_lse)
            shift = tl.where(grown == float("-inf"), 0.0, grown)
            keep = tl.exp(best - shift)
            total, acc, best = total * keep, acc * keep[:, None], grown
        weight = tl.exp(pair_lse - shift)
        total += weight
        part = _pair_out(out, at, sm, t, cols, off, RATES[i], BLOCK_N, BLOCK_D, DENSE, EVICT)
        acc += weight[:, None] * part
    _finish(out, lse, acc, total, best, batch, p0, head, t, 1, cols,
            so0, so1, so2, sl0, sl1, sl2)  # fmt: skip


@triton.jit
def _finish(out, lse, acc, total, best, batch, p_first, head, t, STEP: tl.constexpr, cols,
            so0, so1, so2, sl0, sl1, sl2):  # fmt: skip
    """Write positions ``p_first + STEP t``: out (the column programs) and lse (column 0's)."""
    empty = best == float("-inf")
    total = tl.where(empty, 1.0, total)
    result = tl.where(empty[:, None], 0.0, acc / total[:, None])
    merged = tl.where(empty, float("-inf"), best + tl.log(total))
    o_at = batch * so0 + p_first.to(tl.int64) * so1 + head * so2
    tl.store(out + o_at + (t * (STEP * so1))[:, None] + cols[None, :],
             result.to(out.dtype.element_ty))  # fmt: skip
    l_at = batch * sl0 + p_first.to(tl.int64) * sl1 + head * sl2
    tl.store(lse + l_at + t * (STEP * sl1), merged, mask=t * 0 + tl.program_id(2) == 0)


@triton.jit
def _residue_kernel(table, out, lse, seq_len, heads, so0, so1, so2, sl0, sl1, sl2,
                    WIDTHS: tl.constexpr, RATES: tl.constexpr, VEC: tl.constexpr,
                    STRIDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    EVICT: tl.constexpr):  # fmt: skip
    """Variant F: positions ``p0 + s + STRIDE t`` of one head; a pair covers all or none."""
    head, s = tl.program_id(0) % heads, (tl.program_id(0) // heads) % STRIDE
    p_first = tl.program_id(0) // (heads * STRIDE) * (STRIDE * BLOCK_N) + s
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.arange(0, BLOCK_N)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        off, at, lse_at, sm, lm = _pair(table, i, heads, head, batch, seq_len, p_first,
                                        WIDTHS[i], RATES[i], VEC)  # fmt: skip
        if s % RATES[i] == off:
            x = tl.load(lse + lse_at + t * ((STRIDE // RATES[i]) * lm))
            best = _max(best, tl.where(x == float("inf"), float("-inf"), x))
    shift = tl.where(best == float("-inf"), 0.0, best)
    total = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        off, at, lse_at, sm, lm = _pair(table, i, heads, head, batch, seq_len, p_first,
                                        WIDTHS[i], RATES[i], VEC)  # fmt: skip
        if s % RATES[i] == off:
            x = tl.load(lse + lse_at + t * ((STRIDE // RATES[i]) * lm))
            weight = tl.exp(tl.where(x == float("inf"), float("-inf"), x) - shift)
            total += weight
            rows = (t * ((STRIDE // RATES[i]) * sm))[:, None]
            part = tl.load(out + at + rows + cols[None, :], eviction_policy=EVICT)
            acc += weight[:, None] * part.to(tl.float32)
    _finish(out, lse, acc, total, best, batch, p_first, head, t, STRIDE, cols,
            so0, so1, so2, sl0, sl1, sl2)  # fmt: skip


@triton.jit
def _copy_kernel(a, b, dst, n_a, n_b, BLOCK: tl.constexpr):
    """Variant E: ``dst = a + b`` over a flat range (b shorter: read where it exists)."""
    at = tl.program_id(0).to(tl.int64) * BLOCK
    x = tl.arange(0, BLOCK)
    va = tl.load(a + at + x, mask=x < n_a - at).to(tl.float32)
    vb = tl.load(b + at + x, mask=x < n_b - at, other=0.0).to(tl.float32)
    tl.store(dst + at + x, (va + vb).to(dst.dtype.element_ty), mask=x < n_a - at)


# --- launching -----------------------------------------------------------------------------


class Job:
    """One mix's arguments (as the executor passed them) and the scratch out/lse it writes."""

    def __init__(self, parts, widths, rates, like):
        self.parts, self.widths, self.rates = parts, tuple(widths), tuple(rates)
        self.out = torch.empty_like(like)
        b, n, h, _ = self.out.shape
        self.lse = torch.empty(b, h, n, dtype=torch.float32, device=like.device)
        self.lse = self.lse.transpose(1, 2)  # (b, n, h) view, as the executor's
        self.vec = mix_triton._vec(parts, self.out)
        self.table = mix_triton._table(parts, len(widths), self.out, self.lse, self.vec)
        self.bytes = sum(p.out.numel() * p.out.element_size() + p.lse.numel() * 4 for p in parts)
        self.bytes += self.out.numel() * self.out.element_size() + self.lse.numel() * 4

    def args(self):
        _, n, h, _ = self.out.shape
        return (self.table, self.out, self.lse, n, h, *self.out.stride()[:3], *self.lse.stride())


def general(job, cfg):
    """Variant A: ``mix_triton._mix_kernel`` launched as ``mix_triton._run`` launched it
    before it had residue programs (the reference of every check)."""
    b, n, h, d = job.out.shape
    bd = triton.next_power_of_2(d)
    used = {"block_n": max(1, min(mix_triton.BLOCK_ROWS, 8192 // bd)), "block_d": bd,
            "num_warps": mix_triton.WARPS}  # fmt: skip
    grid = (triton.cdiv(n, used["block_n"]) * h, b)
    args = (job.table, job.out, job.lse, n, h, d, *job.out.stride()[:3], *job.lse.stride())
    return lambda: mix_triton._mix_kernel[grid](
        *args, WIDTHS=job.widths, RATES=job.rates, VEC=job.vec, BLOCK_N=used["block_n"],
        BLOCK_D=bd, num_warps=used["num_warps"],
    ), used  # fmt: skip


def dispatched(job, cfg):
    """``mix_`` as it is now: whichever kernel it picks (the file is being edited)."""
    shape = getattr(mix_triton, "residue_shape", lambda *a: None)
    residue = shape(job.widths, job.rates, job.out.shape[-1]) is not None
    kernel = getattr(mix_triton, "_residue_mix_kernel" if residue else "_mix_kernel", None)

    def run():
        mix_triton.mix_(job.parts, job.widths, job.rates, job.out, job.lse)
        caches = getattr(kernel, "device_caches", {}).values()
        return next((list(c[0].values())[-1] for c in caches if c[0]), None)

    return run, {"kernel": getattr(kernel, "__name__", None)}


def reference(parts, widths, rates, like):
    """Out and lse of the general kernel (variant A) on these parts, in buffers of their own."""
    ref = Job(parts, widths, rates, like)
    general(ref, {})[0]()
    return ref.out, ref.lse


def launcher(job, cfg):
    """Variants B, C, D (``_tile_kernel``) and F (``_residue_kernel``, cfg ``residue``)."""
    b, n, h, d = job.out.shape
    bd, stride = cfg["block_d"], max(job.rates) if cfg.get("residue") else 1
    bn = cfg["block_n"] = min(cfg["block_n"], *(w // stride for w in job.widths))  # tiny W
    unit = stride if cfg.get("residue") else bn  # what each rate must divide
    if any(w % (stride * bn) or unit % r for w, r in zip(job.widths, job.rates)):
        raise ValueError(f"needs R BLOCK_N | W, r | BLOCK_N (B-D), r | R (F, R = max r): {cfg}")
    if d % bd:
        raise ValueError(f"needs BLOCK_D | d: {cfg}")
    grid = (n // (stride * bn) * stride * h, b, d // bd)
    common = {"WIDTHS": job.widths, "RATES": job.rates, "VEC": job.vec, "BLOCK_N": bn,
              "BLOCK_D": bd, "EVICT": cfg.get("evict", ""),
              "num_warps": cfg["num_warps"]}  # fmt: skip
    if cfg.get("residue"):
        return lambda: _residue_kernel[grid](*job.args(), STRIDE=stride, **common), cfg
    flags = {k: cfg.get(k.lower(), False) for k in ("TWO_PHASE", "DENSE", "HEAD_MAJOR")}
    return lambda: _tile_kernel[grid](*job.args(), **common, **flags), cfg


def roofline(job, cfg):
    """Variant E, on buffers of its own: returns (run, cfg, bytes); nothing to check."""
    total = job.out.numel()
    extra = sum(p.out.numel() for p in job.parts) - total  # the 0.94x beyond one tensor
    a = torch.randn(total, device=job.out.device).to(job.out.dtype)
    b, dst = a[:extra].clone(), torch.empty_like(a)
    size = a.element_size()
    if cfg.get("torch"):
        return (lambda: dst.copy_(a)), cfg, 2 * total * size
    grid = (triton.cdiv(total, cfg["block"]),)
    run = lambda: _copy_kernel[grid](a, b, dst, total, extra, BLOCK=cfg["block"],  # noqa: E731
                                     num_warps=cfg["num_warps"])  # fmt: skip
    return run, cfg, (2 * total + extra) * size


def configs(tiny: bool):
    """(name, maker, cfg) of every variant; the tiny CPU case needs small tiles."""
    w = lambda n, d, warps, **k: {"block_n": n, "block_d": d, "num_warps": warps, **k}  # noqa: E731
    if tiny:
        tile, res = [(16, 8, 2)], [(8, 8, 2)]  # interpreted: slow, one shape each
        rc = [("E-copy", roofline, {"block": 256, "num_warps": 4})]
    else:
        tile, res = (
            [(64, 128, 4), (64, 64, 4), (128, 64, 8)],
            [(64, 128, 4), (64, 128, 8), (32, 128, 4), (32, 128, 2), (64, 64, 4), (128, 64, 8)],
        )
        rc = [("E-copy", roofline, {"block": 8192, "num_warps": 8}),
              ("E-copy", roofline, {"block": 4096, "num_warps": 4}),
              ("E-torch-copy_", roofline, {"torch": True})]  # fmt: skip
    out = [("A-general", general, {}), ("A-mix_", dispatched, {})]
    out += [("B-lean", launcher, w(*s)) for s in tile]
    out += [("C-two-phase", launcher, w(*s, two_phase=True)) for s in tile]
    out += [("C-two-phase-hm", launcher, w(*tile[0], two_phase=True, head_major=True))]
    out += [("D-dense", launcher, w(*s, two_phase=True, dense=True)) for s in tile]
    out += [("F-residue", launcher, w(*s, residue=True)) for s in res]
    out += [("F-residue-ef", launcher, w(*res[0], residue=True, evict="evict_first"))]
    return out + rc


# --- checking and timing -------------------------------------------------------------------


def compare(job, ref_out, ref_lse, chunk=1 << 16):
    """Max |out - ref| and |lse - ref| over finite entries; raises if a NaN/-inf row, an
    empty row's out, or a value beyond bf16 rounding (1e-2 + 2^-7 |ref|) / 1e-4 differs."""
    worst_out = worst_lse = 0.0
    for s in range(0, job.out.shape[1], chunk):
        a, r = job.out[:, s : s + chunk].float(), ref_out[:, s : s + chunk].float()
        la, lr = job.lse[:, s : s + chunk], ref_lse[:, s : s + chunk]
        for what, x, y in (("out NaN", a, r), ("lse NaN", la, lr)):
            if not torch.equal(x.isnan(), y.isnan()):
                raise AssertionError(f"{what} entries differ")
        if not torch.equal(la.isneginf(), lr.isneginf()) or (a[la.isneginf()] != 0).any():
            raise AssertionError("empty rows (lse -inf, out 0) differ")
        diff = (a - r).abs().nan_to_num(0.0)
        if (diff > 1e-2 + 2**-7 * r.abs().nan_to_num(0.0)).any():
            raise AssertionError(f"out differs beyond bf16 rounding: {diff.max().item():.3g}")
        finite = la.isfinite() & lr.isfinite()
        dl = (la[finite] - lr[finite]).abs()
        worst_out = max(worst_out, diff.max().item())
        worst_lse = max(worst_lse, dl.max().item() if dl.numel() else 0.0)
    if worst_lse > 1e-4:
        raise AssertionError(f"lse differs by {worst_lse:.3g}")
    return worst_out, worst_lse


def median_ms(run, warmup=3, reps=20):
    for _ in range(warmup):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]  # fmt: skip
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def evaluate(job, ref_out, ref_lse, tiny: bool, **setup):
    """Every variant on one job: a list of result rows."""
    rows = []
    for name, maker, cfg in configs(tiny):
        row = {**setup, "variant": name, **cfg, "ok": False}
        try:
            made = maker(job, dict(cfg))
            run, used = made[:2]
            row.update(used)
            nbytes = made[2] if len(made) > 2 else job.bytes
            job.out.fill_(float("nan"))
            job.lse.fill_(float("nan"))
            compiled = run()
            if maker is roofline:
                row["ok"] = None  # nothing to compare
            else:
                row["max_abs_out"], row["max_abs_lse"] = compare(job, ref_out, ref_lse)
                row["ok"] = True
            row["n_regs"] = getattr(compiled, "n_regs", None)
            row["n_spills"] = getattr(compiled, "n_spills", None)
            row["sass_insts"] = sass_size(compiled) if not tiny else None
            if not tiny:
                row["ms"] = median_ms(run)
                row["bytes"], row["tbps"] = nbytes, nbytes / row["ms"] / 1e9
        except Exception as err:  # a benchmark: record the failure and go on
            row["error"], row["traceback"] = repr(err), traceback.format_exc()
            print(f"{name} {cfg} FAILED:\n{row['traceback']}", flush=True)
        rows.append(row)
        print(line(row), flush=True)
    return rows


def sass_size(compiled) -> int | None:
    """Instructions in the kernel's SASS (all pairs unrolled): the issue budget."""
    try:
        return sum(x.rstrip().endswith(";") for x in compiled.asm["sass"].splitlines())
    except Exception:  # no cuobjdump, a torch op: not known
        return None


def line(row) -> str:
    ms, tb = row.get("ms"), row.get("tbps")
    shape = f"{row.get('block_n', row.get('block', ''))}x{row.get('block_d', '')}"
    timing = "" if ms is None else f"{ms:8.3f} ms {tb:6.2f} TB/s"
    return (f"{row['variant']:18} {shape:>9} w{row.get('num_warps', '-')!s:2} "
            f"regs {row.get('n_regs')!s:>4} sass {row.get('sass_insts')!s:>5} "
            f"ok {row['ok']!s:5} {timing}")  # fmt: skip


def capture(n, heads, dim, widths, rates, causal, device, dtype, kernel, seed=0):
    """Run the forward once, keeping what it handed to ``mix_`` (parts, local widths, rates)
    and the mix's out and lse as references."""
    kept = []
    original = mix_triton.mix_

    def keep(*args):
        kept.append(args)
        return original(*args)

    mix_triton.mix_ = keep
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        q, k, v = (torch.randn(1, n, heads, dim, generator=gen, device=device).to(dtype)
                   for _ in range(3))  # fmt: skip
        dilated_attention(q, k, v, widths, rates, is_causal=causal, kernel=kernel)
    finally:
        mix_triton.mix_ = original
    (parts, local_widths, local_rates, out, lse), = kept  # fmt: skip
    return parts, local_widths, local_rates, out, lse


def describe(parts):
    return [{"pair": p.pair, "heads": len(p.heads), "shape": list(p.out.shape),
             "stride": list(p.out.stride()), "lse_stride": list(p.lse.stride())}
            for p in parts]  # fmt: skip


def run_tiny() -> bool:
    """Every variant against the baseline under Triton's interpreter, on CPU parts: two
    schedules (one part per group, one gathered part per pair), rates with and without
    uncovered rows, and parts with +inf (flash's empty) and NaN entries."""
    merge.INTERPRET_ON_CPU = True
    cases = [((32, 64, 128), (1, 2, 4), None), ((32, 64, 128), (2, 4, 8), None),
             ((32, 64, 128), (1, 2, 4), "inf+nan")]  # fmt: skip
    rows = []
    for schedule in ("strided", "gathered"):
        executor.schedule = lambda *a, s=schedule, **k: Schedule(s)
        for widths, rates, poke in cases[schedule == "gathered" :]:
            parts, lw, lr, like, _ = capture(256, 4, 16, widths, rates, False, "cpu",
                                          torch.bfloat16, "math")  # fmt: skip
            if poke:
                for p in parts:
                    p.lse[:, :, :2] = POS
                    p.lse[:, :, 9::7] = POS
                parts[0].out[0, 0, 5, 3] = float("nan")
                parts[-1].lse[0, 0, 3] = float("nan")
            ref_out, ref_lse = reference(parts, lw, lr, like)  # of the poked parts too
            job = Job(parts, lw, lr, like)
            print(f"--- {schedule} w={widths} r={rates} {poke or ''}", flush=True)
            rows += evaluate(job, ref_out, ref_lse, tiny=True,
                             schedule=schedule, rates=list(rates), poke=poke)  # fmt: skip
    bad = [r for r in rows if r["ok"] is False]
    print(f"tiny CPU: {len(rows) - len(bad)}/{len(rows)} variant runs pass")
    return not bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.path.join(os.environ["OUT"], "mix_variants.json") if "OUT" in os.environ else None
    parser.add_argument("json", nargs="?", default=default)
    parser.add_argument("--n", type=int, nargs="+", default=[1 << 20, 1 << 18])
    parser.add_argument("--causal", choices=["both", "no", "yes"], default="both")
    parser.add_argument("--tiny-cpu", action="store_true")
    args = parser.parse_args()
    if args.tiny_cpu:
        sys.exit(0 if run_tiny() else 1)
    widths, rates = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16)
    report = {"device": torch.cuda.get_device_name(), "triton": triton.__version__,
              "torch": torch.__version__, "setups": [], "rows": []}  # fmt: skip
    for n in args.n:
        for causal in {"both": (False, True), "no": (False,), "yes": (True,)}[args.causal]:
            parts, lw, lr, like, _ = capture(n, 16, 128, widths, rates, causal, "cuda",
                                             torch.bfloat16, None)  # fmt: skip
            ref_out, ref_lse = reference(parts, lw, lr, like)
            job = Job(parts, lw, lr, like)
            del like
            setup = {"n": n, "causal": causal, "parts": describe(parts), "bytes": job.bytes,
                     "widths": list(lw), "rates": list(lr), "vec": job.vec}  # fmt: skip
            report["setups"].append(setup)
            print(f"--- n={n} causal={causal}: {len(parts)} parts, {job.bytes / 1e9:.2f} GB")
            report["rows"] += evaluate(job, ref_out, ref_lse, tiny=False, n=n, causal=causal)
            del parts, job, ref_out, ref_lse
            torch.cuda.empty_cache()
            if args.json:  # after each setup: a partial result survives a time-out
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
