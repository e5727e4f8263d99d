"""torch's optimizers without its compiler: about a second less start-up in every process that trains.

torch 2.x's optimizers import `torch._dynamo`, the compiler's front end (with sympy), the first time one is made
or stepped, although nothing is compiled: `Optimizer.step` calls `torch._dynamo.graph_break()` and a few methods
are wrapped in `torch._dynamo.disable`. Outside `torch.compile` both are no-ops, yet the import costs ~1 s of a
core (measured: creating and stepping Adam in a fresh process, 0.93-1.16 s against 0.00 s). Each agent's
worker paid it before its first round, and two workers on two cores paid it at the same time.

`defer_compiler()` puts a stand-in for `torch._dynamo` in its place that does what those two calls do in eager
mode and nothing else. Anything more (any other attribute, a submodule, `torch.compile`) imports the real module
on the spot and from then on everything sees the real one: the stand-in only defers the import, it never
replaces the compiler. edgetrain compiles nothing; a process that did would compile correctly but would trace
into the optimizer methods that torch otherwise keeps out of its graphs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

_NAME = "torch._dynamo"


class _Deferred(types.ModuleType):
    """`torch._dynamo` until something asks for more than the two eager no-ops."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_load_real(), name)


def _graph_break(msg: str = "") -> None:
    """Eager mode: nothing (it only marks a break for the tracer)."""


def _disable(fn: Callable[..., Any] | None = None, recursive: bool = True, **_: Any) -> Any:
    """Eager mode: the function itself (outside compilation there is nothing to disable)."""
    if fn is None:
        return lambda f: f
    return fn


class _Adopt(importlib.abc.Loader):
    """Hands the import system a submodule the real package has already loaded, without running it again."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module, self.spec = module, module.__spec__

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__spec__ is not self.spec:  # the import system set ours on it: give it back its own
            module.__spec__ = self.spec


class _Submodules(importlib.abc.MetaPathFinder):
    """`import torch._dynamo.X` while the stand-in is in place: load the real package first.

    The import system reads the parent's `__path__` before it looks for X, so a lazy `__path__` would load the
    real package and then run X a second time (two `config` modules). The stand-in's `__path__` is empty and
    this finder, first on `sys.meta_path`, answers instead: with the module the real package loaded, or with
    where X lies in it.
    """

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_NAME + ".") or not isinstance(sys.modules.get(_NAME), _Deferred):
            return None
        _load_real()
        done = sys.modules.pop(fullname, None)  # loaded by the real package just now: handed over as it is
        if done is not None:  # (left there, the import system would run it again: importlib._bootstrap._find_spec)
            return importlib.machinery.ModuleSpec(fullname, _Adopt(done), origin=getattr(done, "__file__", None))
        return importlib.machinery.PathFinder.find_spec(fullname, sys.modules[_NAME].__path__)


_FINDER = _Submodules()


def _load_real() -> types.ModuleType:
    if isinstance(sys.modules.get(_NAME), _Deferred):
        del sys.modules[_NAME]
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    return importlib.import_module(_NAME)  # the import sets torch._dynamo to it, as any import of it does


def defer_compiler() -> bool:
    """Stand in for `torch._dynamo` until something needs it; True if the stand-in is (now) in place.

    A no-op where it is imported already (or stood in for). Call it before a process's first optimizer.
    """
    current = sys.modules.get(_NAME)
    if current is not None:
        return isinstance(current, _Deferred)
    stand_in = _Deferred(_NAME, __doc__)
    stand_in.__path__ = []
    stand_in.graph_break = _graph_break  # type: ignore[attr-defined]
    stand_in.disable = _disable  # type: ignore[attr-defined]
    sys.meta_path.insert(0, _FINDER)
    sys.modules[_NAME] = stand_in
    torch._dynamo = stand_in
    return True


def compiler_loaded() -> bool:
    """Whether this process has imported the real `torch._dynamo`."""
    current = sys.modules.get(_NAME)
    return current is not None and not isinstance(current, _Deferred)
