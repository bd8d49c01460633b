"""Random configurations and inputs, seeded, shared by tests, the CLI and the MPI checks.

The draws favour what breaks ring implementations: lengths that are not powers of two,
ragged last segments, segments longer than a shard and crossing shard boundaries, w > n,
r > w, r not dividing w, head counts not divisible by the number of pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


def unit_normal(rng: np.random.Generator, shape, dtype=np.float64, count: int = 3):
    """``count`` unit-normal arrays of ``shape`` (q, k, v by default), drawn in float64 from
    ``rng`` and cast to ``dtype``: every check's inputs come from here."""
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(count))


@dataclass(frozen=True)
class Case:
    """One configuration of dilated attention, with the world size to run it on."""

    batch: int
    seq_len: int
    num_heads: int
    head_dim: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    is_causal: bool = False
    mode: str = "longnet"
    world_size: int = 1
    softmax_scale: float | None = None
    seed: int = 0  # the default seed of :meth:`inputs`
    label: str = ""  # what the case is for, in reports
    layout: str = "contiguous"  # which positions each rank holds (ringsim.layout)
    num_kv_heads: int | None = None  # fewer K/V heads than query heads (grouped-query)
    q_scale: float = 1.0  # q's inputs times this: large scores at the default softmax scale

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.seq_len, self.num_heads, self.head_dim)

    def kwargs(self) -> dict:
        """Keyword arguments shared by every ``dilated_attention`` entry point."""
        return dict(is_causal=self.is_causal, mode=self.mode, softmax_scale=self.softmax_scale)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        """k's and v's shape: q's, with ``num_kv_heads`` heads when set."""
        heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        return (self.batch, self.seq_len, heads, self.head_dim)

    def inputs(self, seed: int | None = None, dtype=np.float64) -> tuple[np.ndarray, ...]:
        """Unit-normal q, k, v of this case's shapes, from ``seed`` (default ``self.seed``)."""
        rng = np.random.default_rng(self.seed if seed is None else seed)
        if self.num_kv_heads is None:
            q, k, v = unit_normal(rng, self.shape)
        else:
            (q,) = unit_normal(rng, self.shape, count=1)
            k, v = unit_normal(rng, self.kv_shape, count=2)
        return tuple(x.astype(dtype) for x in (q * self.q_scale, k, v))

    def upstream(self, seed: int | None = None, dtype=np.float64) -> np.ndarray:
        """A unit-normal gradient of the loss with respect to out, ``(b, n, h, d)``, for the
        inputs of ``inputs(seed)`` (its own stream: seed + 10000)."""
        rng = np.random.default_rng((self.seed if seed is None else seed) + 10_000)
        return unit_normal(rng, self.shape, dtype, count=1)[0]

    def key_padding(self, seed: int | None = None) -> np.ndarray:
        """A random key padding mask ``(batch, seq_len)``, True for about a quarter of the
        keys, for the inputs of ``inputs(seed)`` (its own stream: seed + 20000)."""
        rng = np.random.default_rng((self.seed if seed is None else seed) + 20_000)
        return rng.random((self.batch, self.seq_len)) < 0.25

    def describe(self) -> str:
        causal = "causal" if self.is_causal else "full"
        scale = "" if self.softmax_scale is None else f" scale={self.softmax_scale}"
        label = f"[{self.label}] " if self.label else ""
        layout = "" if self.layout == "contiguous" else f" {self.layout}"
        layout += "" if self.num_kv_heads is None else f" kv_heads={self.num_kv_heads}"
        layout += "" if self.q_scale == 1.0 else f" q*{self.q_scale:g}"
        return (
            f"{label}P={self.world_size} n={self.seq_len} b={self.batch} h={self.num_heads} "
            f"d={self.head_dim} w={list(self.segment_lengths)} "
            f"r={list(self.dilation_rates)} {self.mode} {causal}{scale}{layout}"
        )


def random_case(
    rng: np.random.Generator, world_size: int = 1, max_shard: int = 9, layout: str = "contiguous"
) -> Case:
    """A random case whose seq_len is a multiple of ``world_size`` (zigzag: of ``2 *
    world_size``, so shards are even)."""
    c = int(rng.integers(1, max_shard + 1))
    if layout != "contiguous":  # even, at most max_shard (or 2)
        c = max(2, c - c % 2)
    n = c * world_size
    pairs = int(rng.integers(1, 4))
    mode = "grouped" if rng.random() < 0.35 else "longnet"
    heads = int(rng.integers(pairs if mode == "grouped" else 1, 6))
    # segments from a single row up to past the sequence: within a shard, across shards,
    # ragged (not dividing n), and w > n
    segs = tuple(int(rng.integers(1, n + 4)) for _ in range(pairs))
    rates = tuple(int(rng.integers(1, 6)) for _ in range(pairs))
    return Case(
        batch=int(rng.integers(1, 3)),
        seq_len=n,
        num_heads=heads,
        head_dim=int(rng.integers(1, 6)),
        segment_lengths=segs,
        dilation_rates=rates,
        is_causal=bool(rng.random() < 0.5),
        mode=mode,
        world_size=world_size,
        layout=layout,
    )


def fixed_cases(world_size: int, layout: str = "contiguous") -> list[Case]:
    """Hand-picked cases for a world size: aligned, across shards, ragged, causal, r > 1
    (shards of 6 rows: zigzag chunks of 3)."""
    p = world_size
    c = 6
    n = c * p
    cases = [
        Case(2, n, 4, 4, (n,), (1,), True, "longnet", p),  # one segment = the whole ring
        Case(1, n, 5, 3, (2 * c, n), (2, 3), False, "longnet", p),  # across shards, r > 1
        Case(1, n, 5, 3, (2 * c, n), (2, 3), True, "longnet", p),
        Case(1, n, 3, 4, (c - 1, c + 2, 5 * c), (2, 3, 4), True, "grouped", p),  # ragged
        Case(2, n, 4, 2, (3, 7), (5, 2), False, "grouped", p),  # r > w: rows with no key
        Case(1, n, 2, 4, (c, c), (1, 1), True, "longnet", p),  # a key chosen twice
    ]
    return [replace(case, layout=layout) for case in cases]


def device_cases(world_size: int) -> list[Case]:
    """Cases sized for GPU kernels (head_dim 64, shards of 512 rows), causal and not: segments
    inside a GPU, across GPUs, the whole sequence, both modes, and a ragged configuration
    (the executor's general path). Small enough for the dense float64 reference."""
    p = world_size
    c = 512
    n = c * p
    configs = [
        ((128, 256), (1, 2), "longnet"),  # inside a GPU
        ((256, 2 * c, n), (1, 2, 4), "longnet"),  # across GPUs and the whole sequence
        ((n,), (1,), "longnet"),  # plain ring attention
        ((256, n), (2, 4), "grouped"),  # one pair per head group
        ((300, c + 100), (1, 3), "longnet"),  # ragged: the general path
    ]
    return [
        Case(1, n, 8, 64, w, r, causal, mode, p)
        for w, r, mode in configs
        for causal in (False, True)
    ]


def grouped_query(cases: list[Case], seed: int) -> list[Case]:
    """The same cases with grouped-query attention: each gets 1 (MQA) to 3 K/V heads and
    ``num_kv_heads * ratio`` query heads, ratio 1 to 3 (grouped mode: at least one head per
    pair), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for case in cases:
        kv, ratio = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        heads = max(kv * ratio, kv * -(-len(case.segment_lengths) // kv))
        label = case.label if heads == case.num_heads else ""  # a label may count heads
        out.append(replace(case, num_heads=heads, num_kv_heads=kv, label=label))
    return out


def check_cases(
    world_size: int, count: int, seed: int, *, fixed: bool = True, layout: str = "contiguous"
) -> list[Case]:
    """What every check runs for one world size: the :func:`fixed_cases` (unless
    ``fixed`` is False), then ``count`` random cases from ``seed``, in ``layout``.

    Case i's inputs come from seed ``seed + i``: the MPI check, the torch.distributed check
    and ``ringsim verify`` all draw exactly these, so their results compare case by case.
    """
    rng = np.random.default_rng(seed)
    first = fixed_cases(world_size, layout) if fixed else []
    return first + [random_case(rng, world_size, layout=layout) for _ in range(count)]


def _small(segment_lengths, dilation_rates, seq_len: int, **fields) -> Case:
    """A single-process case with small defaults (2 heads of 4 dims, batch 1)."""
    return Case(**{"batch": 1, "num_heads": 2, "head_dim": 4, **fields}, seq_len=seq_len,
                segment_lengths=segment_lengths, dilation_rates=dilation_rates)  # fmt: skip


#: lse in the thousands with gaps > 1e3 between the patterns of a row: exp(lse) overflows
#: float64, so only the stable merge survives (pitfall 8). float64 only: at lse ~ 1e3 one
#: float32 ulp (6e-5) already exceeds the float32 tolerance.
HIGH_DYNAMIC_RANGE = _small((2, 16), (1, 2), 16, num_heads=2, head_dim=16, batch=2,
                            softmax_scale=100.0, seed=113, label="high dynamic range")  # fmt: skip

#: Single-process configurations, each named for what it covers: every single-process mutant
#: (:mod:`ringsim.conformance.mutants`) fails on some of them, and the conformance suite
#: runs them first.
PARITY_CASES: tuple[Case, ...] = (
    _small((8,), (1,), 16, num_heads=2, seed=101, label="one pattern, r=1"),
    _small((6, 12), (1, 2), 20, num_heads=3, is_causal=True, seed=102, label="causal, ragged, r>1"),
    _small((10,), (3,), 30, num_heads=3, seed=103, label="r does not divide w"),
    _small((7,), (3,), 16, num_heads=3, is_causal=True, seed=104, label="causal, r∤w, ragged"),
    _small((4, 6), (6, 3), 14, num_heads=6, seed=105, label="r > w, empty rows"),
    _small(
        (4, 6),
        (6, 3),
        14,
        num_heads=6,
        is_causal=True,
        mode="grouped",
        seed=106,
        label="r > w, grouped, causal",
    ),
    _small((64, 8), (2, 1), 24, num_heads=2, is_causal=True, seed=107, label="w > n, causal"),
    _small(
        (4, 8, 16),
        (1, 2, 4),
        28,
        num_heads=5,
        is_causal=True,
        mode="grouped",
        seed=108,
        label="grouped, 5 heads / 3 pairs, causal, ragged",
    ),
    _small(
        (3, 5, 7, 40),
        (1, 2, 3, 5),
        37,
        num_heads=6,
        batch=2,
        mode="grouped",
        seed=109,
        label="4 pairs, grouped, batch 2",
    ),
    _small(
        (5, 9, 13, 50),
        (2, 3, 4, 7),
        45,
        num_heads=4,
        batch=2,
        is_causal=True,
        seed=110,
        label="4 pairs, longnet, batch 2, causal",
    ),
    _small((1, 3), (1, 2), 5, num_heads=2, head_dim=1, seed=111, label="w=1, head_dim 1"),
    _small((2,), (1,), 1, num_heads=1, head_dim=3, is_causal=True, seed=112, label="seq_len 1"),
    HIGH_DYNAMIC_RANGE,
    # the same scores at the default softmax scale (1/4 here): q times 400, for functions
    # that take no softmax_scale
    replace(HIGH_DYNAMIC_RANGE, softmax_scale=None, q_scale=400.0,
            label="high dynamic range, large q"),
)  # fmt: skip

#: Cases whose inputs only float64 can represent well enough for its tolerance.
FLOAT64_ONLY = frozenset({"high dynamic range", "high dynamic range, large q"})
