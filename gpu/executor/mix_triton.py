"""The parts of one step mixed in one Triton kernel: the executor's only pass over memory.

Merging each pattern group into float32 accumulators as it comes costs, at 1M tokens, a
float32 copy of the first pair, a read-modify-write of the accumulators per later group and
a final cast: about a quarter of the kernels' time. Instead the step executor
(:mod:`ringsim.gpu.executor.forward`) keeps every kernel call's ``(out, lse)`` as the kernel
returned it (a :class:`~ringsim.gpu.executor.forward.Part`) and, once all batches of a step
have run, :func:`mix_` makes one pass that, for each row and head,

1. reads the lse of every pair that selected the row (``-inf`` for the others; the raw
   ``+inf`` that flash kernels give a row with no key is read as ``-inf``, as
   :func:`~ringsim.gpu.kernels.attend` maps it),
2. takes the largest, ``M``, and the weights ``e_i = exp(lse_i - M)``, ``Z = sum e_i``,
3. writes ``out = sum e_i out_i / Z`` in q's dtype and ``lse = M + log Z``, float32.

That is the stable LSE merge of spec §5 done for all pairs at once, in float32: a row no pair
selects gets ``(0, -inf)``, a NaN lse or output propagates. Each part is read once in its own
dtype and the result written once, at the rank's last busy step: on a ring rank, a pair
attended at several steps first merges its steps' parts into partials of its own
(Note [Partials across steps] in :mod:`ringsim.gpu.executor.forward`).

The parts are separate tensors, so the kernel reads them through a table: for each pair and
head, where the group's out and lse start (as offsets from ``out`` and from ``lse``), the
row offset of its pattern, and the strides that locate local position ``p`` in the group's
blocks (block ``p // W``, row ``(p mod W) // r``; the local width
``W = min(w', c)`` and ``r`` are compile-time constants of the kernel). The table is copied
to the device once per layout (a steady loop sees the same addresses every call;
:class:`ringsim.gpu.executor.cache.DeviceCache`).

Note [Residue programs]
-----------------------
A program of the general kernels takes ``BLOCK_N`` consecutive positions of one head and,
for each pair, loads the rows it selects under a mask: with rates 1..16 most lanes of most
loads are masked off, and every element's address is computed in int64. Measured on an
H200 (``scripts/bench_mix_variants.py``, 2026-11-30): 1.67 TB/s, 196 registers a thread,
12.5 % occupancy, against 4.35 TB/s for a plain copy of the same bytes. So where the pattern
allows, a program takes the positions ``p0 + s + R t`` (``t < BLOCK_N``) of one head
instead, ``R`` the least common multiple of the rates and ``s < R`` the program's residue:
pair i covers all of them (``s mod r_i`` is the head's offset) or none, which is one scalar
test per pair; a covered pair's rows are ``R / r_i`` apart in its part, loaded with no mask,
from one int64 base and int32 offsets. That ran at 3.3 TB/s (3.85 against 7.69 ms at 1M
tokens, causal). It needs ``R BLOCK_N`` to divide every local width (so a program's
positions lie in one block of every pair) and a power-of-2 head_dim; elsewhere the general
kernels run (:func:`residue_shape` decides).

The backward's twin, :func:`sum_`, reads block gradients through the same table and writes,
for each position and head, the plain sum of the parts that cover it (Note [Direct gradients]
in :mod:`ringsim.gpu.executor.direct`).

Imported only where :func:`ringsim.gpu.executor.merge.mix_reason` allows (this module imports
Triton). On CPU tensors the kernel runs only under Triton's interpreter
(``TRITON_INTERPRET=1``), which the CPU tests use.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .cache import DeviceCache

if TYPE_CHECKING:
    from .part import Part

#: Table entries per (pair, head): out and lse offsets, the row offset, 3 out strides, 3 lse
#: strides.
FIELDS = tl.constexpr(9)


@triton.jit
def _program(heads, seq_len, dim, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's head, its ``BLOCK_N`` positions, batch entry and columns (heads vary
    fastest along axis 0: whole rows of out at once), and which of them are live."""
    head = tl.program_id(0) % heads
    p = tl.program_id(0) // heads * BLOCK_N + tl.arange(0, BLOCK_N)  # positions
    cols = tl.arange(0, BLOCK_D)
    return head, p, tl.program_id(1).to(tl.int64), p < seq_len, cols, cols < dim


@triton.jit
def _part_rows(entry, p, batch, seq_len, WIDTH: tl.constexpr, RATE: tl.constexpr,
               VEC: tl.constexpr):  # fmt: skip
    """Where one pair's part (its table ``entry``) holds the rows of positions ``p`` of one
    head, selected or not (a vector, or one position): the offset of each row's out in
    elements and of its lse in floats (W and r are compile-time constants: dividing by them
    is cheap)."""
    block = batch * (seq_len // WIDTH) + p // WIDTH
    row = (p % WIDTH) // RATE
    at = tl.load(entry) + block * tl.load(entry + 3) + tl.load(entry + 4)
    lse_at = tl.load(entry + 1) + block * tl.load(entry + 6) + tl.load(entry + 7)
    # out offsets are in units of VEC elements: the loads are VEC-aligned vectors
    return (at + row * tl.load(entry + 5)) * VEC, lse_at + row * tl.load(entry + 8)


@triton.jit
def _locate(entry, p, batch, live, seq_len, WIDTH: tl.constexpr, RATE: tl.constexpr,
            VEC: tl.constexpr):  # fmt: skip
    """Which of positions ``p`` of one head one pair's part selects, and where their rows of
    out and lse are (:func:`_part_rows`)."""
    picked = live & (p % RATE == tl.load(entry + 2))
    at, lse_at = _part_rows(entry, p, batch, seq_len, WIDTH, RATE, VEC)
    return picked, at, lse_at


@triton.jit
def _mix_kernel(
    table, out, lse, seq_len, heads, dim, so0, so1, so2, sl0, sl1, sl2,
    WIDTHS: tl.constexpr, RATES: tl.constexpr, VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    head, p, batch, live, cols, col_live = _program(heads, seq_len, dim, BLOCK_N, BLOCK_D)
    out_at = batch * so0 + p.to(tl.int64) * so1 + head * so2
    lse_at = lse + batch * sl0 + p.to(tl.int64) * sl1 + head * sl2
    tile = live[:, None] & col_live[None, :]
    # online: the largest lse so far (best), sum of exp(lse_i - best) (total) and the
    # weighted sum (acc), rescaled when best grows; every pair's loads are independent
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        entry = table + (i * heads + head) * FIELDS
        picked, at, lse_row = _locate(entry, p, batch, live, seq_len, WIDTHS[i], RATES[i], VEC)
        pair_lse = tl.load(lse + lse_row, mask=picked, other=float("-inf"))
        pair_lse = tl.where(pair_lse == float("inf"), float("-inf"), pair_lse)  # flash: empty
        mask = picked[:, None] & col_live[None, :]
        part = tl.load(out + at[:, None] + cols[None, :], mask=mask, other=0.0)
        grown = tl.maximum(best, pair_lse, propagate_nan=tl.PropagateNan.ALL)
        shift = tl.where(grown == float("-inf"), 0.0, grown)  # all empty so far: no shift
        keep, weight = tl.exp(best - shift), tl.exp(pair_lse - shift)
        total = total * keep + weight
        acc = acc * keep[:, None] + weight[:, None] * part.to(tl.float32)
        best = grown
    empty = best == float("-inf")
    total = tl.where(empty, 1.0, total)
    result = tl.where(empty[:, None], 0.0, acc / total[:, None])
    merged = tl.where(empty, float("-inf"), best + tl.log(total))
    tl.store(out + out_at[:, None] + cols[None, :], result, mask=tile)
    tl.store(lse_at, merged, mask=live)


@triton.jit
def _sum_kernel(
    table, out, seq_len, heads, dim, so0, so1, so2,
    WIDTHS: tl.constexpr, RATES: tl.constexpr, VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``out`` = the sum of the parts that cover each position and head (0 where none does),
    in float32, written once in out's dtype: the backward's dq, dk, dv (:func:`sum_`)."""
    head, p, batch, live, cols, col_live = _program(heads, seq_len, dim, BLOCK_N, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        entry = table + (i * heads + head) * FIELDS
        picked, at, _ = _locate(entry, p, batch, live, seq_len, WIDTHS[i], RATES[i], VEC)
        mask = picked[:, None] & col_live[None, :]
        acc += tl.load(out + at[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out_at = batch * so0 + p.to(tl.int64) * so1 + head * so2
    tl.store(out + out_at[:, None] + cols[None, :], acc, mask=live[:, None] & col_live[None, :])


@triton.jit
def _residue_program(heads, STRIDE: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's head, residue ``s`` and first position ``p0 + s``, batch entry, and
    its positions' indices ``t`` (positions ``first + STRIDE t``; Note [Residue programs])."""
    head, s = tl.program_id(0) % heads, (tl.program_id(0) // heads) % STRIDE
    first = tl.program_id(0) // (heads * STRIDE) * (STRIDE * BLOCK_N) + s
    return head, s, first, tl.program_id(1).to(tl.int64), tl.arange(0, BLOCK_N)


@triton.jit
def _residue_pair(table, i, heads, head, batch, seq_len, first, WIDTH: tl.constexpr,
                  RATE: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """Pair i for this head: its offset, where the part's row of position ``first`` starts
    (out in elements, lse in floats) and the row strides, int32."""
    entry = table + (i * heads + head) * FIELDS
    at, lse_at = _part_rows(entry, first, batch, seq_len, WIDTH, RATE, VEC)
    out_step, lse_step = (tl.load(entry + 5) * VEC).to(tl.int32), tl.load(entry + 8).to(tl.int32)
    return tl.load(entry + 2), at, lse_at, out_step, lse_step


@triton.jit
def _residue_mix_kernel(
    table, out, lse, seq_len, heads, so0, so1, so2, sl0, sl1, sl2,
    WIDTHS: tl.constexpr, RATES: tl.constexpr, VEC: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """:func:`mix_` by residue programs (Note [Residue programs]): the largest lse of the
    covering pairs first, then their weighted sum, with no rescale."""
    head, s, first, batch, t = _residue_program(heads, STRIDE, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        off, at, lse_at, _, lse_step = _residue_pair(table, i, heads, head, batch, seq_len,
                                                     first, WIDTHS[i], RATES[i], VEC)  # fmt: skip
        if s % RATES[i] == off:
            pair_lse = tl.load(lse + lse_at + t * ((STRIDE // RATES[i]) * lse_step))
            pair_lse = tl.where(pair_lse == float("inf"), float("-inf"), pair_lse)  # flash
            best = tl.maximum(best, pair_lse, propagate_nan=tl.PropagateNan.ALL)
    # (a row whose best is -inf gets NaN weights here, which `empty` below overrides)
    total = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        off, at, lse_at, out_step, lse_step = _residue_pair(
            table, i, heads, head, batch, seq_len, first, WIDTHS[i], RATES[i], VEC)  # fmt: skip
        if s % RATES[i] == off:
            pair_lse = tl.load(lse + lse_at + t * ((STRIDE // RATES[i]) * lse_step))
            pair_lse = tl.where(pair_lse == float("inf"), float("-inf"), pair_lse)
            weight = tl.exp(pair_lse - best)
            total += weight
            rows = (t * ((STRIDE // RATES[i]) * out_step))[:, None]
            acc += weight[:, None] * tl.load(out + at + rows + cols[None, :]).to(tl.float32)
    empty = best == float("-inf")
    total = tl.where(empty, 1.0, total)
    result = tl.where(empty[:, None], 0.0, acc / total[:, None])
    out_at = batch * so0 + first.to(tl.int64) * so1 + head * so2
    tl.store(out + out_at + (t * (STRIDE * so1))[:, None] + cols[None, :], result)
    lse_at = batch * sl0 + first.to(tl.int64) * sl1 + head * sl2
    tl.store(
        lse + lse_at + t * (STRIDE * sl1), tl.where(empty, float("-inf"), best + tl.log(total))
    )


@triton.jit
def _residue_sum_kernel(
    table, out, seq_len, heads, so0, so1, so2,
    WIDTHS: tl.constexpr, RATES: tl.constexpr, VEC: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """:func:`sum_` by residue programs (Note [Residue programs])."""
    head, s, first, batch, t = _residue_program(heads, STRIDE, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        off, at, _, out_step, _ = _residue_pair(table, i, heads, head, batch, seq_len, first,
                                                WIDTHS[i], RATES[i], VEC)  # fmt: skip
        if s % RATES[i] == off:
            rows = (t * ((STRIDE // RATES[i]) * out_step))[:, None]
            acc += tl.load(out + at + rows + cols[None, :]).to(tl.float32)
    out_at = batch * so0 + first.to(tl.int64) * so1 + head * so2
    tl.store(out + out_at + (t * (STRIDE * so1))[:, None] + cols[None, :], acc)


def _vec(parts: Sequence[Part], base: torch.Tensor) -> int:
    """The widest vector (elements, at most 16 bytes) that divides every part's out offset
    from ``base`` and every stride the kernel steps by."""
    size, vec = base.element_size(), max(1, 16 // base.element_size())
    for part in parts:
        o = part.out
        for x in ((o.data_ptr() - base.data_ptr()) // size, *o.stride()[:3]):
            vec = math.gcd(vec, x)
    return vec


#: Tables of recent calls, by everything they encode: in a steady loop the caching allocator
#: hands out the same addresses, so each table is built and copied once.
_TABLES = DeviceCache(32, "mixing tables")


def _table(parts: Sequence[Part], pairs: int, base, lse, vec: int) -> torch.Tensor:
    """The ``(pairs * heads, FIELDS)`` int64 table the kernels read, on base's device:
    offsets from ``base`` (in units of ``vec`` elements) and from ``lse`` (None: the sum
    reads no lse; those fields are 0)."""
    heads, size = base.shape[2], base.element_size()
    no_lse = (0, (0, 0, 0))
    layout = tuple(
        (p.pair, p.heads, p.offsets, p.out.data_ptr(), p.out.stride(),
         *(no_lse if lse is None else (p.lse.data_ptr(), p.lse.stride())))
        for p in parts
    )  # fmt: skip

    def build() -> torch.Tensor:
        # a head no group of the pair covers: offset -1 selects no position
        rows = [[0, 0, -1, 0, 0, 0, 0, 0, 0] for _ in range(pairs * heads)]
        for pair, group_heads, offsets, at, strides, lse_at, lse_strides in layout:
            start = (at - base.data_ptr()) // size // vec
            lse_start = 0 if lse is None else (lse_at - lse.data_ptr()) // 4
            sb, sh, sm = (x // vec for x in strides[:3])
            lb, lh, lm = lse_strides
            for j, (head, offset) in enumerate(zip(group_heads, offsets)):
                rows[pair * heads + head] = [
                    start, lse_start, offset, sb, j * sh, sm, lb, j * lh, lm
                ]  # fmt: skip
        return torch.tensor(rows, dtype=torch.int64)

    lse_ptr = None if lse is None else lse.data_ptr()
    key = (layout, base.data_ptr(), lse_ptr, base.dtype, heads, pairs, vec)
    return _TABLES.get(key, base.device, build)


def mix_(parts: Sequence[Part], widths, rates, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Mix the parts into ``out (b, c, h, d)`` (q's dtype, last dim contiguous) and
    ``lse (b, c, h)`` float32 (any strides: the executor passes its ``(b, h, c)`` lse
    transposed), overwriting both; pair i has the local width
    ``W = widths[i]`` and ``r = rates[i]`` (compile-time constants of the kernel).

    Every part's out must have ``out``'s dtype and a contiguous last dim, its lse float32,
    and its positions must be aligned (``W`` divides c, ``r`` divides ``W``): the caller
    checks.
    """
    if lse.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError("mix_: out needs a contiguous last dim and lse float32")
    _check_parts(parts, out, lse_dtype=torch.float32)
    _run((_mix_kernel, _residue_mix_kernel), parts, widths, rates, out, lse)


def sum_(parts: Sequence[Part], widths, rates, out: torch.Tensor) -> None:
    """Write into ``out (b, c, h, d)`` the sum of the parts that cover each position and head
    (0 where none does), added in float32 and written once in out's dtype: the parts are one
    gradient's block shares (dq, dk or dv), laid out as :func:`mix_` reads them (their
    ``lse`` is not read). ``out`` may be a view of some heads of a larger tensor (a head
    chunk); the parts' heads then count from the view's first head."""
    if out.stride(-1) != 1:
        raise ValueError("sum_: out needs a contiguous last dim")
    _check_parts(parts, out, lse_dtype=None)
    _run((_sum_kernel, _residue_sum_kernel), parts, widths, rates, out, None)


def _check_parts(parts: Sequence[Part], out: torch.Tensor, lse_dtype) -> None:
    if not parts:
        raise ValueError("mix_/sum_: no parts")
    for part in parts:
        if part.out.dtype != out.dtype or part.out.stride(-1) != 1:
            raise ValueError(f"mix_/sum_: parts need {out.dtype} out with a contiguous last dim")
        if lse_dtype is not None and part.lse.dtype != lse_dtype:
            raise ValueError(f"mix_: parts need {lse_dtype} lse")


#: Positions per program and warps per program of the general kernels.
BLOCK_ROWS, WARPS = 64, 4
#: Elements of out per residue program (BLOCK_N x head_dim) and its warps: 32 x 128 and 4
#: ran fastest of the shapes measured (Note [Residue programs]).
RESIDUE_ELEMENTS, RESIDUE_WARPS = 4096, 4

_INTERPRETED = threading.Lock()


def residue_shape(widths, rates, dim: int) -> tuple[int, int] | None:
    """``(R, BLOCK_N)`` of the residue kernels for pairs of local widths ``widths`` and
    rates ``rates`` and head_dim ``dim``, or None where they cannot run (Note [Residue
    programs]): ``R`` the least common multiple of the rates, ``BLOCK_N`` the largest power
    of 2 up to ``RESIDUE_ELEMENTS / dim`` with ``R BLOCK_N`` dividing every width."""
    stride = math.lcm(*rates)
    if dim & (dim - 1) or any(w % stride for w in widths):
        return None
    block = max(1, RESIDUE_ELEMENTS // dim)
    while any(w % (stride * block) for w in widths):
        block //= 2
    return stride, block


def _run(kernels, parts, widths, rates, out: torch.Tensor, lse: torch.Tensor | None) -> None:
    b, n, h, d = out.shape
    vec = _vec(parts, out)
    table = _table(parts, len(widths), out, lse, vec)
    lse_args = () if lse is None else (lse,)
    strides = (*out.stride()[:3], *(() if lse is None else lse.stride()))
    constants = {"WIDTHS": tuple(widths), "RATES": tuple(rates), "VEC": vec}
    shape = residue_shape(widths, rates, d)
    if shape is None:  # the general kernel: BLOCK_N consecutive positions, masked loads
        kernel, block_d = kernels[0], triton.next_power_of_2(d)
        block_n = max(1, min(BLOCK_ROWS, 8192 // block_d))
        grid = (triton.cdiv(n, block_n) * h, b)  # heads vary fastest: whole rows of out at once
        constants.update(num_warps=WARPS)
        launch_args = (table, out, *lse_args, n, h, d, *strides)
    else:
        (stride, block_n), kernel, block_d = shape, kernels[1], d
        grid = (n // block_n * h, b)  # n / (R BLOCK_N) blocks of R residues, heads fastest
        constants.update(STRIDE=stride, num_warps=RESIDUE_WARPS)
        launch_args = (table, out, *lse_args, n, h, *strides)
    # Triton's interpreter (the CPU tests) patches its language module while it runs a
    # kernel, so the simulated cluster's rank threads take turns there; on a GPU the launch
    # goes to out's device, whichever is current (tensors on cuda:1 with cuda:0 current
    # raised "Pointer argument cannot be accessed from Triton")
    with _INTERPRETED if not out.is_cuda else torch.cuda.device(out.device):
        kernel[grid](*launch_args, **constants, BLOCK_N=block_n, BLOCK_D=block_d)
