"""Bad input (spec §7): every public entry point raises ValueError or TypeError naming the
argument, before computing anything."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ringsim.cases import unit_normal
from ringsim.config import check_world_size, make_config, validate
from ringsim.reference import dense_dilated_attention, dilated_attention

SHAPE = (1, 8, 2, 4)  # (b, n, h, d)

ENTRY_POINTS = {
    "dilated_attention": dilated_attention,
    "dense_dilated_attention": dense_dilated_attention,
    "validate": validate,
}


def _call(entry: str, rng: np.random.Generator, **changes: Any) -> Any:
    """Call an entry point on good arguments with ``changes`` applied."""
    q, k, v = unit_normal(rng, SHAPE)
    arguments: dict[str, Any] = {
        "q": q,
        "k": k,
        "v": v,
        "segment_lengths": [4, 8],
        "dilation_rates": [1, 2],
    }
    keywords: dict[str, Any] = {}
    for name, value in changes.items():
        (arguments if name in arguments else keywords)[name] = value
    return ENTRY_POINTS[entry](*arguments.values(), **keywords)


BAD_INPUTS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("q 3-d", {"q": np.zeros((8, 2, 4))}, ValueError, r"^q: must be 4-dimensional"),
    ("k 5-d", {"k": np.zeros((1, 1, 8, 2, 4))}, ValueError, r"^k: must be 4-dimensional"),
    ("v not an array", {"v": [[[[0.0]]]]}, TypeError, r"^v: expected an array"),
    ("k shape", {"k": np.zeros((1, 8, 2, 5))}, ValueError, r"^k: shape must equal q's"),
    ("v shape", {"v": np.zeros((2, 8, 2, 4))}, ValueError, r"^v: shape must equal q's"),
    ("k dtype", {"k": np.zeros(SHAPE, np.float32)}, TypeError, r"^k: dtype must equal q's"),
    ("v dtype", {"v": np.zeros(SHAPE, np.float32)}, TypeError, r"^v: dtype must equal q's"),
    (
        "empty seq_len",
        {"q": np.zeros((1, 0, 2, 4)), "k": np.zeros((1, 0, 2, 4)), "v": np.zeros((1, 0, 2, 4))},
        ValueError,
        r"^q: seq_len must be >= 1",
    ),
    (
        "empty lengths",
        {"segment_lengths": [], "dilation_rates": []},
        ValueError,
        r"^segment_lengths: must not be empty",
    ),
    (
        "empty rates",
        {"segment_lengths": [4], "dilation_rates": ()},
        ValueError,
        r"^dilation_rates: must not be empty",
    ),
    (
        "unequal lengths",
        {"dilation_rates": [1]},
        ValueError,
        r"^segment_lengths and dilation_rates: must have equal length",
    ),
    (
        "length 0",
        {"segment_lengths": [4, 0]},
        ValueError,
        r"^segment_lengths: every entry must be >= 1",
    ),
    (
        "length -3",
        {"segment_lengths": [-3, 8]},
        ValueError,
        r"^segment_lengths: every entry must be >= 1",
    ),
    (
        "rate 0",
        {"dilation_rates": [0, 2]},
        ValueError,
        r"^dilation_rates: every entry must be >= 1",
    ),
    (
        "float length",
        {"segment_lengths": [4.0, 8]},
        TypeError,
        r"^segment_lengths: every entry must be an int",
    ),
    (
        "bool rate",
        {"dilation_rates": [True, 2]},
        TypeError,
        r"^dilation_rates: every entry must be an int",
    ),
    (
        "float rate",
        {"dilation_rates": [1, 2.5]},
        TypeError,
        r"^dilation_rates: every entry must be an int",
    ),
    ("str lengths", {"segment_lengths": "48"}, TypeError, r"^segment_lengths: expected a sequence"),
    ("int rates", {"dilation_rates": 2}, TypeError, r"^dilation_rates: expected a sequence"),
    ("set lengths", {"segment_lengths": {4, 8}}, TypeError, r"^segment_lengths: expected a seq"),
    ("dict rates", {"dilation_rates": {1: 1, 2: 2}}, TypeError, r"^dilation_rates: expected a seq"),
    ("0-d lengths", {"segment_lengths": np.array(8)}, TypeError, r"^segment_lengths: expected a 1"),
    ("unknown mode", {"mode": "dense"}, ValueError, r"^mode: must be one of 'longnet', 'grouped'"),
    ("mode not a str", {"mode": 1}, TypeError, r"^mode: expected a str"),
    (
        "grouped, too few heads",
        {"segment_lengths": [2, 4, 8], "dilation_rates": [1, 2, 4], "mode": "grouped"},
        ValueError,
        r"^num_heads: grouped mode",
    ),
    ("scale inf", {"softmax_scale": float("inf")}, ValueError, r"^softmax_scale: must be finite"),
    ("scale -inf", {"softmax_scale": -np.inf}, ValueError, r"^softmax_scale: must be finite"),
    ("scale nan", {"softmax_scale": float("nan")}, ValueError, r"^softmax_scale: must be finite"),
    ("scale str", {"softmax_scale": "0.5"}, TypeError, r"^softmax_scale: expected a real number"),
    ("scale bool", {"softmax_scale": True}, TypeError, r"^softmax_scale: expected a real number"),
    ("is_causal str", {"is_causal": "yes"}, TypeError, r"^is_causal: expected a bool"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_raises(
    rng: np.random.Generator, entry: str, changes: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _call(entry, rng, **changes)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_good_input_passes(rng: np.random.Generator, entry: str) -> None:
    """The base arguments of the table are legal: each row fails for its change alone."""
    _call(entry, rng)
    _call(entry, rng, mode="grouped", softmax_scale=np.float32(0.5), is_causal=np.bool_(True))
    _call(entry, rng, segment_lengths=(np.int64(4), 8), dilation_rates=np.array([1, 2]))


@pytest.mark.parametrize(
    ("dtype", "match"),
    [(np.float16, r"^q: dtype must be float32 or float64"), (np.int64, r"^q: dtype must be")],
)
def test_reference_dtypes(rng: np.random.Generator, dtype, match: str) -> None:
    q, k, v = (x.astype(dtype) for x in unit_normal(rng, SHAPE))
    with pytest.raises(TypeError, match=match):
        dilated_attention(q, k, v, [4], [1])


def test_make_config_freezes_values() -> None:
    config = make_config((np.int64(4), 8), [1, np.int32(2)], softmax_scale=np.float64(0.25))
    assert config.segment_lengths == (4, 8) and config.dilation_rates == (1, 2)
    assert all(type(x) is int for x in (*config.segment_lengths, *config.dilation_rates))
    assert config.softmax_scale == 0.25 and type(config.softmax_scale) is float
    assert config.scale(16) == 0.25 and make_config([4], [1]).scale(16) == 0.25


@pytest.mark.parametrize(
    ("seq_len", "world_size", "error", "match"),
    [
        (16, 3, ValueError, r"^world_size: seq_len must be divisible by world_size"),
        (10, 4, ValueError, r"^world_size: seq_len must be divisible by world_size"),
        (16, 0, ValueError, r"^world_size: must be >= 1"),
        (16, -2, ValueError, r"^world_size: must be >= 1"),
        (16, 2.0, TypeError, r"^world_size: expected an int"),
        (16, True, TypeError, r"^world_size: expected an int"),
        (16, "2", TypeError, r"^world_size: expected an int"),
    ],
)
def test_check_world_size_rejects(seq_len: int, world_size: Any, error, match: str) -> None:
    with pytest.raises(error, match=match):
        check_world_size(seq_len, world_size)


@pytest.mark.parametrize(("seq_len", "world_size"), [(16, 1), (16, 2), (24, 3), (24, 8), (7, 7)])
def test_check_world_size_accepts(seq_len: int, world_size: int) -> None:
    assert check_world_size(seq_len, np.int64(world_size)) == world_size


def test_validate_checks_world_size(rng: np.random.Generator) -> None:
    q, k, v = unit_normal(rng, SHAPE)
    with pytest.raises(ValueError, match=r"^world_size: seq_len must be divisible"):
        validate(q, k, v, [4], [1], world_size=3)
    assert validate(q, k, v, [4], [1], world_size=4).segment_lengths == (4,)


def test_integer_arrays_and_numpy_ints_are_accepted(rng: np.random.Generator) -> None:
    """A 1-d integer array of lengths, and a NumPy integer world size, are ints as users
    write them: every entry point takes them (the simulated cluster included)."""
    from ringsim.reference import ring_dilated_attention

    q, k, v = unit_normal(rng, SHAPE)
    out = ring_dilated_attention(q, k, v, np.array([4, 8]), np.array([1, 2]),
                                 world_size=np.int64(2))  # fmt: skip
    assert out.shape == SHAPE


@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("dout", None, TypeError, r"^dout: expected a NumPy array, got NoneType"),
        ("out", "list", TypeError, r"^out: expected a NumPy array, got list"),
        ("dout", "int64", TypeError, r"^dout: dtype must be q's \(float64\), got int64"),
        ("dout", "float32", TypeError, r"^dout: dtype must be q's \(float64\), got float32"),
        ("lse", "float32", TypeError, r"^lse: dtype must be q's"),
    ],
)
def test_backward_inputs_are_checked(rng, name, value, error, match) -> None:
    from ringsim.reference import dilated_attention, dilated_attention_backward

    q, k, v = unit_normal(rng, SHAPE)
    out, lse = dilated_attention(q, k, v, (4, 8), (1, 2), return_lse=True)
    args = {"out": out, "lse": lse, "dout": np.ones_like(out)}
    args[name] = {None: None, "list": out.tolist(), "int64": args[name].astype(np.int64),
                  "float32": args[name].astype(np.float32)}[value]  # fmt: skip
    with pytest.raises(error, match=match):
        dilated_attention_backward(q, k, v, args["out"], args["lse"], args["dout"], (4, 8), (1, 2))


def test_faults_must_be_faults() -> None:
    from ringsim.comm import SimulatedCluster

    with pytest.raises(TypeError, match=r"^faults: expected a sequence of ringsim.comm.Fault"):
        SimulatedCluster(2).run(lambda comm: None, faults="drop")


def test_flags_must_be_bools(rng: np.random.Generator) -> None:
    """``return_lse='yes'`` (or ``return_trace``) was read as True: every entry point of the
    reference refuses it naming the flag; the per-rank ring refuses it on every rank, in the
    agreement, so no rank waits for the others."""
    from ringsim.comm import RankFailed, SimulatedCluster
    from ringsim.reference import ring_dilated_attention, ring_dilated_attention_shard

    q, k, v = unit_normal(rng, SHAPE)
    args = (q, k, v, (4, 8), (1, 2))
    with pytest.raises(TypeError, match=r"^return_lse: expected a bool, got 'yes'"):
        dilated_attention(*args, return_lse="yes")
    with pytest.raises(TypeError, match=r"^return_trace: expected a bool"):
        ring_dilated_attention(*args, world_size=2, return_trace=1)
    shard = tuple(x[:, :4] for x in (q, k, v))

    def run_rank(comm):
        flag = "yes" if comm.rank == 1 else False
        return ring_dilated_attention_shard(*shard, (4, 8), (1, 2), comm=comm, return_lse=flag)

    with pytest.raises(RankFailed, match="return_lse: expected a bool"):
        SimulatedCluster(2, timeout=20.0).run(run_rank)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(dilation_rates=(1, 2**63)), ValueError,
         r"^dilation_rates: every entry must be <= 2\*\*62"),
        (dict(segment_lengths=(4, 10**30)), ValueError,
         r"^segment_lengths: every entry must be <= 2\*\*62"),
        (dict(softmax_scale=10**400), ValueError,
         r"^softmax_scale: must be finite, got an int of 401"),
    ],
)  # fmt: skip
def test_numbers_past_machine_range_name_the_argument(kwargs, error, pattern):
    """They crashed with OverflowError inside NumPy or float()."""
    from ringsim.reference import dense_dilated_attention, dilated_attention

    q = np.zeros((1, 8, 1, 4))
    args = dict(segment_lengths=(4, 8), dilation_rates=(1, 2)) | kwargs
    for fn in (dilated_attention, dense_dilated_attention):
        with pytest.raises(error, match=pattern):
            fn(q, q, q, **args)


@pytest.mark.parametrize("dtype", [np.complex128, np.bool_, object, np.int64])
def test_the_definition_refuses_what_is_not_a_real_float(dtype):
    from ringsim.reference import dense_dilated_attention

    q = np.ones((1, 8, 1, 4), dtype=dtype)
    with pytest.raises(TypeError, match=r"^q: expected a numpy array of a real floating dtype"):
        dense_dilated_attention(q, q, q, (4, 8), (1, 2))
