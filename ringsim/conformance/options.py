"""What a user declares about their function, checked before anything runs, and the cases
that follow from it.

Every option is validated here, with a message naming it, so that a bad option fails before
the user's function is called (and, for a ring, before any rank communicates). Options map
one to one to the command line (``layout_shard`` is ``--layout-shard``); :meth:`Options.argv`
writes them back, which is how each case gets a line a user can paste to reproduce it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from ringsim.cases import (
    FLOAT64_ONLY,
    PARITY_CASES,
    Case,
    fixed_cases,
    grouped_query,
    random_case,
)
from ringsim.layout import LAYOUTS

KINDS = ("single", "shard")
BACKENDS = ("numpy", "torch")
TENSOR_LAYOUTS = ("bnhd", "bhnd")
RETURNS = ("out", "out,lse")
MODES = ("longnet", "grouped")
DTYPES = {"numpy": ("float64", "float32"), "torch": ("float64", "float32", "bfloat16", "float16")}

#: The largest shard of a random case; single-device cases are one shard of up to 32 rows.
MAX_SHARD = {"single": 32, "shard": 9}


@dataclass(frozen=True)
class Options:
    """How to call the function under test, and which cases to run (one field per option).

    - ``kind``: ``"single"`` (global arrays) or ``"shard"`` (one rank of the user's own ring,
      run under ``mpiexec`` or ``torchrun``).
    - ``backend``: ``"numpy"`` arrays or ``"torch"`` tensors.
    - ``device``: torch device (``"cpu"``, ``"cuda"``; a ring rank uses ``cuda:LOCAL_RANK``).
    - ``dtype``: the inputs' dtype; the tolerance is that dtype's (the definition's own rule).
    - ``layout``: the user's tensor layout, ``"bnhd"`` (batch, seq, heads, dim) or ``"bhnd"``.
    - ``returns``: ``"out"`` or ``"out,lse"``: what the function returns.
    - ``modes``: head modes the function implements; ``mode=`` is passed only when these name
      more than ``"longnet"``.
    - ``causal``: run causal cases too (``is_causal=`` is passed only when True).
    - ``cases``: random cases after the fixed ones.
    - ``seed``: the seed of the random cases and of every case's inputs.
    - ``scale``: pass ``softmax_scale=`` (a value other than the default) in every case.
    - ``grad``: torch only: compare dq, dk, dv with the reference backward.
    - ``timeout``: seconds one case may take (a hang fails the case; a ring's ranks stop).
    - ``key_padding``: pass ``key_padding_mask=`` (bool ``(batch, seq_len)``, True =
      padding; a ring rank gets its shard) with about a quarter of the keys padded.
    - ``gqa``: grouped-query attention: k and v of every case get fewer heads than q (1 to
      3, dividing q's); the function reads K/V head ``h // (H / H_kv)`` for query head h.
    - ``layout_shard``: which positions each rank holds (``"contiguous"`` or ``"zigzag"``);
      passed as ``layout=`` only when not contiguous.
    - ``case``: run only the case of this index (what the reproduce lines use).
    """

    kind: str = "single"
    backend: str = "numpy"
    device: str = "cpu"
    dtype: str = "float64"
    layout: str = "bnhd"
    returns: str = "out"
    modes: tuple[str, ...] = ("longnet",)
    causal: bool = True
    cases: int = 20
    seed: int = 0
    scale: bool = False
    grad: bool = False
    timeout: float = 60.0
    key_padding: bool = False
    gqa: bool = False
    layout_shard: str = "contiguous"
    case: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.modes, str):
            object.__setattr__(self, "modes", tuple(self.modes.split(",")))
        elif isinstance(self.modes, list):
            object.__setattr__(self, "modes", tuple(self.modes))
        for name, allowed in (
            ("kind", KINDS),
            ("backend", BACKENDS),
            ("layout", TENSOR_LAYOUTS),
            ("returns", RETURNS),
            ("layout_shard", LAYOUTS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")  # fmt: skip
        if self.dtype not in DTYPES[self.backend]:
            raise ValueError(
                f"dtype: the {self.backend} backend takes {', '.join(DTYPES[self.backend])}, "
                f"got {self.dtype!r}"
            )
        unknown = [m for m in self.modes if m not in MODES]
        if not self.modes or unknown:
            raise ValueError(f"modes: a comma-separated subset of {', '.join(MODES)}, "
                             f"got {','.join(self.modes)!r}")  # fmt: skip
        if self.key_padding and self.dtype in ("bfloat16", "float16"):
            raise ValueError(
                "key_padding: the bf16/fp16 bound needs the plain formula in that dtype with "
                "the mask, which the suite does not have yet; check masks in float32 or float64"
            )
        if self.grad and self.backend != "torch":
            raise ValueError("grad: gradients are checked with the torch backend (autograd)")
        if self.device != "cpu" and self.backend != "torch":
            raise ValueError(f"device: only the torch backend runs on {self.device!r}")
        if self.backend == "torch":
            _check_torch_device(self.device)
        if self.layout_shard != "contiguous" and self.kind != "shard":
            raise ValueError("layout_shard: a shard layout needs kind='shard'")
        for name in ("cases", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        if self.case is not None and (not isinstance(self.case, int) or self.case < 0):
            raise ValueError(f"case: expected an int >= 0, got {self.case!r}")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout)
                and self.timeout > 0):  # fmt: skip
            raise ValueError(f"timeout: expected seconds > 0, got {self.timeout!r}")

    @property
    def pass_mode(self) -> bool:
        return self.modes != ("longnet",)

    @property
    def with_lse(self) -> bool:
        return self.returns == "out,lse"

    def argv(self) -> list[str]:
        """The command-line options that give these options (defaults left out)."""
        args: list[str] = []
        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            if value == default or f.name == "case":
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.name == "causal":
                args.append("--no-causal")
            elif isinstance(value, bool):
                args.append(flag)
            else:
                args += [flag, ",".join(value) if isinstance(value, tuple) else str(value)]
        return args


def _check_torch_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: not a torch device: {device!r} ({err})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked, but CUDA is not available here")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} asked, but there are "
                         f"{torch.cuda.device_count()} CUDA devices")  # fmt: skip


def select_cases(options: Options, world_size: int = 1) -> list[tuple[int, Case]]:
    """The cases to run, with their indices, for ``options`` (and the ring's ``world_size``).

    Single: the named parity cases, then ``options.cases`` random ones (up to 32 rows);
    shard: the hand-picked ring cases of :func:`ringsim.cases.fixed_cases` at this world size
    (segments inside a shard, across shards, the whole sequence, ragged, empty rows), then
    random ones. Cases the options exclude are dropped: other modes, causal ones with
    ``causal=False``, float64-only ones in float32 or lower; every case gets a softmax scale
    other than the default with ``scale=True`` and none without; with ``gqa=True`` every case
    has fewer K/V heads than query heads (:func:`ringsim.cases.grouped_query`). Case i's
    inputs come from :func:`inputs_seed`.
    """
    rng = np.random.default_rng(options.seed)
    p = world_size if options.kind == "shard" else 1
    layout = options.layout_shard
    first = list(PARITY_CASES) if options.kind == "single" else fixed_cases(p, layout)
    shard = MAX_SHARD[options.kind]
    drawn = [random_case(rng, p, max_shard=shard, layout=layout) for _ in range(options.cases)]
    chosen = []
    for case in first + drawn:
        if case.mode not in options.modes or (case.is_causal and not options.causal):
            continue
        if case.label in FLOAT64_ONLY and options.dtype != "float64":
            continue
        if options.scale:
            scale = case.softmax_scale or 1.5 / math.sqrt(case.head_dim)
            case = replace(case, softmax_scale=scale)
        elif case.softmax_scale is not None:
            continue
        chosen.append(case)
    if options.gqa:
        chosen = grouped_query(chosen, options.seed)
    indexed = list(enumerate(chosen))
    if options.case is not None:
        if options.case >= len(chosen):
            raise ValueError(f"case: {options.case} is past the last case ({len(chosen) - 1})")
        return [indexed[options.case]]
    return indexed


def inputs_seed(options: Options, index: int, case: Case) -> int:
    """The seed of case ``index``'s q, k, v (and upstream gradient): fixed by the options."""
    return case.seed + 1000 * options.seed + index
