"""Mutants and how they are put in place: a patch of a module's name, undone afterwards.

A :class:`Mutant` applies itself through anything with ``setattr(target, name, value)``:
pytest's ``monkeypatch`` in the test suite, or :class:`Patcher` in the conformance suite's
:func:`applied`, which also forgets the ring plans cached meanwhile.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ringsim.plan import clear_plan_caches


class SetAttr(Protocol):
    """What a mutant needs to apply itself: ``setattr("pkg.module.name", value)`` or
    ``setattr(obj, "name", value)``; pytest's ``monkeypatch`` is one, :class:`Patcher`
    another."""

    def setattr(self, target: Any, name: Any, value: Any = ...) -> None: ...


@dataclass(frozen=True)
class Mutant:
    """One defect: the pitfall it re-introduces (``None``: a peer's convention, named in
    ``origin``), what it does, and how to apply it."""

    pitfall: int | None
    description: str
    apply: Callable[[SetAttr], None]
    origin: str = ""

    @property
    def source(self) -> str:
        """Where the defect is described: ``"pitfall 2"`` or the peer's name."""
        return self.origin or f"pitfall {self.pitfall}"


_MISSING = object()


def _resolve(dotted: str) -> Any:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(f"no module in {dotted!r}")


class Patcher:
    """Sets attributes and puts them back (what pytest's ``monkeypatch.setattr`` does,
    without pytest); a target that does not exist raises, as there."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def setattr(self, target: Any, name: Any, value: Any = _MISSING) -> None:
        if value is _MISSING:  # setattr("pkg.module.name", value)
            path, _, attr = str(target).rpartition(".")
            target, name, value = _resolve(path), attr, name
        self._saved.append((target, name, getattr(target, name)))  # raises if it is gone
        setattr(target, name, value)

    def undo(self) -> None:
        while self._saved:
            target, name, old = self._saved.pop()
            setattr(target, name, old)


_ONE_AT_A_TIME = threading.Lock()


@contextlib.contextmanager
def applied(mutant: Mutant) -> Iterator[None]:
    """Run the block with ``mutant`` in place, then restore everything (and forget the plans
    cached meanwhile, in both directions). One mutant at a time in the whole process: the
    patches are global."""
    with _ONE_AT_A_TIME:
        patcher = Patcher()
        clear_plan_caches()
        try:
            mutant.apply(patcher)
            yield
        finally:
            patcher.undo()
            clear_plan_caches()
