"""torch's optimizers without its compiler: about a second less start-up in every process that trains.

torch 2.x's optimizers import `torch._dynamo`, the compiler's front end (with sympy), the first time one is made
or stepped, although nothing is compiled: `Optimizer.step` calls `torch._dynamo.graph_break()` and a few methods
are wrapped in `torch._dynamo.disable`. Outside `torch.compile` both are no-ops, yet the import costs ~1 s of a
core (measured: creating and stepping Adam in a fresh process, 0.93-1.16 s against 0.00 s). Each agent's
worker paid it before its first round, and two workers on two cores paid it at the same time.

`defer_compiler()` puts a stand-in for `torch._dynamo` in its place that does what those two calls do in eager
mode and nothing else. Anything more (any other attribute, a submodule, `torch.compile`) imports the real module
on the spot and from then on everything sees the real one: the stand-in only defers the import, it never
replaces the compiler: the functions torch asked the stand-in to disable lazily (`torch._disable_dynamo`, the
optimizers' methods) are handed back to the real one then. A function a module decorates with
`torch._dynamo.disable` when it is imported while the stand-in is in place stays undecorated: that matters only to
`torch.compile`, and edgetrain compiles nothing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

_NAME = "torch._dynamo"
_lock = threading.RLock()
_disabled: list[Callable[..., Any]] = []  # what torch asked the stand-in to disable (and cached on the function)


class _Deferred(types.ModuleType):
    """`torch._dynamo` until something asks for more than the two eager no-ops."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_load_real(), name)


def _graph_break(msg: str = "") -> None:
    """Eager mode: nothing (it only marks a break for the tracer)."""


def _disable(fn: Callable[..., Any] | None = None, recursive: bool = True, **_: Any) -> Any:
    """Eager mode: the function itself (outside compilation there is nothing to disable)."""
    if fn is None:
        return lambda f: _disable(f)
    _disabled.append(fn)
    return fn


class _Submodule(importlib.abc.Loader):
    """Loads the real package, then hands over its submodule, loaded once (by it, or now, as any import would)."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        _load_real()  # which takes this finder off sys.meta_path: the import below is an ordinary one
        module = importlib.import_module(spec.name)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__spec__ is not self.spec:  # the import system set ours on it: give it back its own
            module.__spec__ = self.spec


class _Submodules(importlib.abc.MetaPathFinder):
    """`import torch._dynamo.X` while the stand-in is in place.

    The import system reads the parent's `__path__` before it looks for X, so a lazy `__path__` would load the
    real package and then run X a second time (two `config` modules). The stand-in's `__path__` is empty, and
    this finder, first on `sys.meta_path`, answers with a loader that does the work when X is loaded (under X's
    own import lock, not the global one `find_spec` runs under).
    """

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_NAME + ".") or not isinstance(sys.modules.get(_NAME), _Deferred):
            return None
        return importlib.machinery.ModuleSpec(fullname, _Submodule())


_FINDER = _Submodules()


def _load_real() -> types.ModuleType:
    with _lock:
        if isinstance(sys.modules.get(_NAME), _Deferred):
            sys.modules.pop(_NAME)
        if _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
        for fn in _disabled:  # torch._disable_dynamo asks again, the real one, at the next call
            fn.__dict__.pop("__dynamo_disable", None)
        _disabled.clear()
        return importlib.import_module(_NAME)  # the import sets torch._dynamo to it, as any import of it does


def defer_compiler() -> bool:
    """Stand in for `torch._dynamo` until something needs it; True if the stand-in is (now) in place.

    A no-op where it is imported already (or stood in for). Call it before a process's first optimizer.
    """
    with _lock:
        current = sys.modules.get(_NAME)
        if current is not None:
            return isinstance(current, _Deferred)
        stand_in = _Deferred(_NAME, __doc__)
        stand_in.__path__ = []
        stand_in.__spec__ = importlib.machinery.PathFinder.find_spec(_NAME, list(torch.__path__))
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
