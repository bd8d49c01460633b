"""Calling the function under test: its inputs in its backend, dtype and layout, its keyword
arguments, a time limit, and what it returned, checked and brought back to float64 NumPy.

Everything the suite compares is float64 NumPy in the definition's ``(b, n, h, d)`` layout,
made from the very (rounded) inputs the function received, so a bf16 function is judged on
its own inputs.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ringsim.cases import Case

from .options import Options


class Unfit(Exception):
    """What the function returned cannot be compared (wrong type, shape or dtype)."""


class CaseTimeout(Exception):
    """The function did not return within the case's time limit."""


@dataclass
class Outcome:
    """What one call gave, in float64 NumPy, ``(b, n, h, d)`` (lse ``(b, h, n)``)."""

    out: np.ndarray
    lse: np.ndarray | None = None
    grads: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def within(seconds: float, work: Callable[[], Any]) -> Any:
    """``work()`` on a helper thread, its result or its exception; :class:`CaseTimeout` if
    it has not returned after ``seconds`` (the thread is left behind: Python cannot stop it,
    so the caller runs no further case). The thread starts in the caller's torch state that
    is per thread: the current CUDA device and whether gradients are on."""
    box: dict[str, Any] = {}
    restore = _thread_state()

    def run() -> None:
        try:
            restore()
            box["value"] = work()
        except BaseException as err:  # handed to the caller, raised there
            box["error"] = err

    thread = threading.Thread(target=run, name="ringsim conformance case", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise CaseTimeout(f"did not return within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class HungCase(str):
    """The problem text of a case that timed out (nothing can run after it)."""


def attempt(
    work: Callable[[], Outcome],
    timeout: float | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[Outcome | None, str | None]:
    """``work()``: its outcome, or the problem (exceptions from the user's function are the
    case's result, reported, never hidden). ``timeout``: run it on a helper thread
    (:func:`within`; a ring's ranks run it on their own, under a watchdog); ``say``: told
    at once when the function raised or exited (a ring rank's others may be left waiting)."""
    try:
        return (work() if timeout is None else within(timeout, work)), None
    except CaseTimeout as err:
        return None, HungCase(str(err))
    except Unfit as err:
        return None, str(err)
    except SystemExit as err:  # sys.exit() in the function must not end the check as a pass
        problem = f"called sys.exit({err.code!r})"
    except Exception as err:  # the function under test failed: that is the case's result
        problem = f"raised {type(err).__name__}: {err}"
    if say is not None:
        say(problem)
    return None, problem


def _thread_state() -> Callable[[], None]:
    """What a new thread must set to look like this one to a torch function."""
    torch = sys.modules.get("torch")
    if torch is None:
        return lambda: None
    grad = torch.is_grad_enabled()
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def restore() -> None:
        torch.set_grad_enabled(grad)
        if device is not None:
            torch.cuda.set_device(device)

    return restore


class Backend:
    """Moves arrays between the suite (float64 NumPy, bnhd) and the function (its backend,
    dtype, device and layout)."""

    def __init__(self, options: Options, device: str | None = None) -> None:
        self.options = options
        self.device = device or options.device
        self._leaves: dict[int, Any] = {}  # id of a strided input view -> its buffer
        if options.backend == "torch":
            import torch

            self.torch = torch
            self.dtype = getattr(torch, options.dtype)
        else:
            self.dtype = np.dtype(options.dtype)

    def _to_user_layout(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.swapaxes(1, 2)) if self.options.layout == "bhnd" else x

    def _to_bnhd(self, x: np.ndarray) -> np.ndarray:
        return x.swapaxes(1, 2) if self.options.layout == "bhnd" else x

    def to_user(self, x: np.ndarray, requires_grad: bool = False, strided: bool = False) -> Any:
        """``x (b, n, h, d)`` as the function takes it; ``strided``: as a view that is not
        contiguous (the other layout's buffer, axes 1 and 2 swapped back), which code that
        assumes contiguous inputs reads wrong. Gradients: :meth:`grad_of`."""
        x = self._to_user_layout(x)
        if strided:
            x = np.ascontiguousarray(x.swapaxes(1, 2))  # the buffer; the view swaps back
        if self.options.backend == "numpy":
            x = x.astype(self.dtype)
            return x.swapaxes(1, 2) if strided else x
        t = self.torch.from_numpy(x).to(device=self.device, dtype=self.dtype)
        t.requires_grad_(requires_grad)
        if not strided:
            return t
        view = t.transpose(1, 2)
        self._leaves[id(view)] = t
        return view

    def to_user_mask(self, mask: np.ndarray | None) -> Any:
        """A key padding mask ``(b, n)`` bool as the function takes it (a copy)."""
        if mask is None:
            return None
        if self.options.backend == "numpy":
            return mask.copy()
        return self.torch.from_numpy(mask.copy()).to(self.device)

    def start_case(self) -> None:
        """Forget the previous case's input buffers."""
        self._leaves.clear()

    def grad_of(self, x: Any) -> Any:
        """The gradient that reached input ``x`` (through its buffer if it is a view)."""
        leaf = self._leaves.get(id(x))
        if leaf is None:
            return x.grad
        return None if leaf.grad is None else leaf.grad.transpose(1, 2)

    def to_suite(self, x: Any, name: str, *, lse: bool = False) -> np.ndarray:
        """A returned ``out`` (in the user's layout) or ``lse`` ``(b, h, n)`` as float64 bnhd."""
        self.check_type(x, name)
        if self.options.backend == "torch":
            array = x.detach().to("cpu", self.torch.float64).numpy()
        else:
            array = x.astype(np.float64)
        return array if lse else self._to_bnhd(array)

    def check_type(self, x: Any, name: str) -> None:
        """``x`` is an array of the backend (:class:`Unfit` names what it is instead)."""
        kind = self.torch.Tensor if self.options.backend == "torch" else np.ndarray
        if not isinstance(x, kind):
            raise Unfit(f"{name} is a {type(x).__name__}, expected a "
                        f"{kind.__module__.split('.')[0]}.{kind.__name__}")  # fmt: skip

    def rounded(self, user: Any) -> np.ndarray:
        """The float64 bnhd values of an input as the function received it."""
        return self.to_suite(user, "input")

    def dtype_name(self, x: Any) -> str:
        return str(x.dtype).removeprefix("torch.")


@dataclass
class CaseInputs:
    """One case's inputs: as the function gets them (``user``, ``user_dout``, ``mask``) and
    as the suite judges them (float64 bnhd ``rounded``, ``dout``; the global ``pad``)."""

    user: list
    user_dout: Any
    mask: Any
    rounded: list
    dout: np.ndarray | None
    pad: np.ndarray | None


def case_inputs(backend: Backend, index: int, case: Case, seed: int,
                cut: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> CaseInputs:  # fmt: skip
    """The inputs of case ``index`` from ``seed`` (``cut``: a ring rank's shard of each);
    every other case as views that are not contiguous (:func:`strided`)."""
    options = backend.options
    backend.start_case()
    user = [backend.to_user(cut(x), requires_grad=options.grad, strided=strided(index))
            for x in case.inputs(seed)]  # fmt: skip
    user_dout = backend.to_user(cut(case.upstream(seed))) if options.grad else None
    pad = case.key_padding(seed) if options.key_padding else None
    return CaseInputs(
        user, user_dout, None if pad is None else backend.to_user_mask(cut(pad)),
        [backend.rounded(x) for x in user],  # before the call: judged on these
        None if user_dout is None else backend.rounded(user_dout), pad,
    )  # fmt: skip


def strided(index: int) -> bool:
    """Every other case passes its inputs as views that are not contiguous (a transposed
    buffer), as code in the other layout would."""
    return index % 2 == 1


def call_kwargs(case: Case, options: Options, mask: Any = None) -> dict[str, Any]:
    """The keyword arguments the function is declared to take (Options' docstring);
    ``mask``: the key padding mask as the function takes it."""
    kwargs: dict[str, Any] = {}
    if options.key_padding:
        kwargs["key_padding_mask"] = mask
    if options.causal:
        kwargs["is_causal"] = case.is_causal
    if options.pass_mode:
        kwargs["mode"] = case.mode
    if options.scale:
        kwargs["softmax_scale"] = case.softmax_scale
    if options.layout_shard != "contiguous":
        kwargs["layout"] = options.layout_shard
    return kwargs


def run(fn: Callable, backend: Backend, case: Case, qkv, dout=None, before=None,
        mask=None) -> Outcome:  # fmt: skip
    """Call ``fn`` on user tensors ``qkv``, check what it returned, and (with ``dout``, the
    upstream gradient in the user's layout) run its backward. ``before``: the inputs'
    float64 values before the call; an input changed in place is a failure (it would
    otherwise be judged on what it changed them to). Raises :class:`Unfit`."""
    options = backend.options
    kwargs = call_kwargs(case, options, mask)
    result = fn(*qkv, case.segment_lengths, case.dilation_rates, **kwargs)
    if before is not None:
        changed = [name for name, x, was in zip("qkv", qkv, before)
                   if not np.array_equal(backend.rounded(x), was, equal_nan=True)]  # fmt: skip
        if changed:
            raise Unfit(f"modified its inputs in place ({', '.join(changed)}): the definition "
                        "is judged on the inputs it was given")  # fmt: skip
    if options.with_lse:
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise Unfit(f"returned {_kind(result)}; returns='out,lse' expects (out, lse)")
        out, lse = result
    else:
        if isinstance(result, (tuple, list)):
            raise Unfit(f"returned {_kind(result)}; returns='out' expects out alone "
                        "(declare returns='out,lse' for (out, lse))")  # fmt: skip
        out, lse = result, None
    want = tuple(qkv[0].shape)
    b, h, n = (want[0], want[1], want[2]) if options.layout == "bhnd" else (want[0], want[2],
                                                                             want[1])  # fmt: skip
    dtype = backend.dtype_name(qkv[0])
    _check_array(backend, out, "out", want, (dtype,), qkv[0])
    if lse is not None:  # float64 inputs are held to 1e-10: a float32 lse cannot get there
        lse_dtypes = ("float64",) if dtype == "float64" else ("float32", "float64", dtype)
        _check_array(backend, lse, "lse", (b, h, n), lse_dtypes, qkv[0])
    grads = None
    if dout is not None:
        out.backward(dout)
        found = [backend.grad_of(x) for x in qkv]
        missing = [name for name, g in zip("qkv", found) if g is None]
        if missing:
            raise Unfit(f"no gradient reached {', '.join(missing)} (is the output detached?)")
        grads = tuple(backend.to_suite(g, f"d{name}") for name, g in zip("qkv", found))
    return Outcome(
        backend.to_suite(out, "out"),
        None if lse is None else backend.to_suite(lse, "lse", lse=True),
        grads,  # type: ignore[arg-type]
    )


def _kind(result: Any) -> str:
    if isinstance(result, (tuple, list)):
        return f"a {type(result).__name__} of {len(result)}"
    return f"a {type(result).__name__}"


def _check_array(backend: Backend, x: Any, name: str, shape: tuple, dtypes: tuple,
                 like: Any) -> None:  # fmt: skip
    backend.check_type(x, name)
    if backend.options.backend == "torch" and x.device != like.device:
        raise Unfit(f"{name} is on {x.device}, the inputs on {like.device}")
    if tuple(x.shape) != shape:
        raise Unfit(f"{name} has shape {tuple(x.shape)}, expected {shape} "
                    f"(layout={backend.options.layout!r})")  # fmt: skip
    if backend.dtype_name(x) not in dtypes:
        raise Unfit(f"{name} has dtype {backend.dtype_name(x)}, expected {' or '.join(dtypes)}")
