"""How ``parallel_map`` sends a function to its worker processes: by reference or by value.

Functions that a fresh interpreter can import (module-level functions of
importable modules) travel by reference; functions of the caller's script
(run as ``__main__`` or loaded from a file under a name no worker can
import), lambdas and closures travel by value with cloudpickle.  Anything
that cannot be pickled raises :class:`~engine.InputError` when the call is
made.
"""

from __future__ import annotations

import os
import pickle
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Shipping", "function_name"]


def function_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None)
    if isinstance(name, str):
        return name
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None and inner is not fn:
        return f"partial({function_name(inner)})"
    return type(fn).__qualname__


def _importable_in_fresh_interpreter(module_name: str) -> bool:
    """Whether a worker process can import ``module_name`` and get the same module.

    Not ``__main__`` (workers have their own), and not a module loaded from
    a file under a made-up name (``shoal run FILE`` does that): its spec must
    be findable on the import path without looking at ``sys.modules``, and
    for a top-level module it must be the same file.
    """
    if module_name in ("__main__", "__mp_main__"):
        return False
    module = sys.modules.get(module_name)
    spec = getattr(module, "__spec__", None)
    if module is None or spec is None or spec.name != module_name:
        return False
    top = module_name.partition(".")[0]
    found = None
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            found = find_spec(top, None)
        except Exception:
            continue
        if found is not None:
            break
    if found is None:
        return False
    if top == module_name and spec.origin and found.origin and spec.has_location:
        return bool(os.path.realpath(spec.origin) == os.path.realpath(found.origin))
    return True


def _modules_of(fn: Any) -> set[str]:
    """Names of the modules that define ``fn`` (and what a partial or method wraps)."""
    names: set[str] = set()
    seen = 0
    todo = [fn]
    while todo and seen < 16:
        obj = todo.pop()
        seen += 1
        for cand in (getattr(obj, "__module__", None), getattr(type(obj), "__module__", None)):
            if isinstance(cand, str):
                names.add(cand)
        for attr in ("func", "__func__", "__self__", "__wrapped__"):
            inner = getattr(obj, attr, None)
            if inner is not None and inner is not obj and not isinstance(inner, ModuleType):
                todo.append(inner)
    return names


class Shipping:
    """How one call's function and items are pickled for the workers.

    ``by_value`` lists the modules whose functions and classes must travel by
    value: the caller's script under its own name (cloudpickle already
    ships ``__main__`` by value).  While pickling, they are registered with
    cloudpickle and unregistered afterwards.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.name = function_name(fn)
        self.by_value = [
            m
            for m in _modules_of(fn)
            if m not in ("__main__", "builtins")
            and m in sys.modules
            and not _importable_in_fresh_interpreter(m)
        ]
        # Plain pickle suffices (and is a little faster) when nothing has to
        # go by value; items still fall back to cloudpickle if it fails.
        self.plain_items = not self.by_value and "__main__" not in _modules_of(fn)
        # Bumped whenever the rules change (a module learnt to go by value),
        # so chunks pickled under older rules can be told apart.
        self.generation = 0
        try:
            function = self._cloudpickle(fn)
        except Exception as exc:
            raise InputError(
                f"parallel_map cannot send the function {self.name!r} to worker processes: it "
                f"cannot be pickled ({type(exc).__name__}: {exc}). Pass a function defined at "
                f"module level, a lambda or a closure over picklable values; objects such as "
                f"open files, locks, sockets or generators cannot go to another process"
            ) from exc
        # Workers take the caller's import path along with the function.
        self.function = pickle.dumps((list(sys.path), function), protocol=pickle.HIGHEST_PROTOCOL)

    def _cloudpickle(self, obj: object) -> bytes:
        import cloudpickle  # type: ignore[import-untyped]

        registered = set(cloudpickle.list_registry_pickle_by_value())
        added = [sys.modules[m] for m in self.by_value if m not in registered]
        for module in added:
            cloudpickle.register_pickle_by_value(module)
        try:
            blob: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            return blob
        finally:
            for module in added:
                cloudpickle.unregister_pickle_by_value(module)

    def learn(self, module_name: str) -> None:
        """A worker could not import ``module_name``: send what it defines by value from now on."""
        if (
            module_name in sys.modules
            and module_name not in self.by_value
            and not _importable_in_fresh_interpreter(module_name)
        ):
            self.by_value.append(module_name)
            self.plain_items = False
            self.generation += 1

    def items(self, items: list[Any], start: int) -> bytes:
        """Pickle one chunk; an item that cannot be pickled raises InputError naming it.

        Plain pickle names classes by reference; a reference to ``__main__``
        means nothing in a worker, so such chunks go through cloudpickle.
        Classes of other modules the workers cannot import are learnt when a
        worker reports them missing (see :meth:`learn`).
        """
        try:
            if self.plain_items:
                try:
                    blob = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception:
                    pass
                else:
                    if b"__main__" not in blob:
                        return blob
            return self._cloudpickle(items)
        except Exception as exc:
            index, cause = start, exc
            for i, item in enumerate(items):
                try:
                    self._cloudpickle(item)
                except Exception as item_exc:
                    index, cause = start + i, item_exc
                    break
            raise InputError(
                f"parallel_map({self.name}): item {index} cannot be pickled to send it to a "
                f"worker process ({type(cause).__name__}: {cause}); pass plain data or objects "
                f"of classes defined at module level"
            ) from cause
