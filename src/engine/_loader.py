"""Finding tasks again: import a module or a script file, and locate a task in it.

Used by resume (to re-import a run's root task) and by ``shoal run FILE``.
A script is imported the way Python runs it: its folder goes first on
``sys.path`` and it becomes the module named after the file, unless that
name already belongs to another module, in which case it is loaded under a
private name.  Worker processes started by ``parallel_map`` inherit
``sys.path``, so functions in such a script can be found there too.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import ImportFailed
from ._task import Task

if TYPE_CHECKING:
    from types import ModuleType

    from ._wire import FunctionRef

__all__ = ["load_file", "load_function", "locate", "root_of"]


def load_file(path: str | Path) -> ModuleType:
    """Import a Python file as a module (see the module docstring)."""
    file = Path(path).resolve()
    if not file.is_file():
        raise ImportFailed(f"no such file: {path}")
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and _same(module.__file__, file):
            return module
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = file.stem
    if name.isidentifier() and name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and _same(spec.origin, file):
            return _import(name, file)
    return _exec(f"shoal_flow_{abs(hash(str(file))):x}", file)


def _same(a: str | None, b: Path) -> bool:
    try:
        return a is not None and Path(a).resolve() == b
    except OSError:
        return False


def _import(name: str, file: Path) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportFailed:
        raise
    except BaseException as exc:
        raise ImportFailed(f"importing {file} failed: {type(exc).__name__}: {exc}") from exc


def _exec(name: str, file: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportFailed(f"{file} cannot be imported as Python code")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        raise ImportFailed(f"importing {file} failed: {type(exc).__name__}: {exc}") from exc
    return module


def locate(module: ModuleType, qualname: str) -> Task[Any, Any]:
    """The task at ``qualname`` in ``module``."""
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if isinstance(obj, Task):
        return obj
    found = {t.fn.__qualname__: t for t in vars(module).values() if isinstance(t, Task)}
    if qualname in found:
        return found[qualname]
    raise ImportFailed(
        f"{module.__name__} has no task {qualname!r} any more "
        f"(tasks there: {', '.join(sorted(found)) or 'none'})"
    )


def root_of(task: Task[Any, Any]) -> tuple[str, str | None]:
    """(``module:qualname``, file or None) to find ``task`` again in another process."""
    fn = task.fn
    module = sys.modules.get(fn.__module__)
    file = getattr(module, "__file__", None)
    return f"{fn.__module__}:{fn.__qualname__}", str(Path(file).resolve()) if file else None


def load_root(root: str, root_file: str | None) -> Task[Any, Any]:
    """Import a run's root task again, by module or, failing that, by file."""
    module_name, _, qualname = root.partition(":")
    module: ModuleType | None = None
    main = sys.modules.get("__main__")
    if root_file and main is not None and _same(getattr(main, "__file__", None), Path(root_file)):
        module = main
    elif module_name != "__main__" and not module_name.startswith("shoal_flow_"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        except BaseException as exc:
            raise ImportFailed(
                f"importing {module_name} (root task of the run) failed: {type(exc).__name__}: {exc}"
            ) from exc
        if (
            module is not None
            and root_file
            and Path(root_file).is_file()
            and not _same(getattr(module, "__file__", None), Path(root_file))
        ):
            # Another module of that name (a script called test.py resumed
            # where the standard library's test package wins): use the file.
            module = None
    if module is None:
        if not root_file or not Path(root_file).is_file():
            raise ImportFailed(
                f"the run's root task {root} cannot be imported"
                + (f" and its file {root_file} is gone" if root_file else "")
                + "; restore the code (or run from the folder it was run from) and resume again"
            )
        module = load_file(root_file)
    return locate(module, qualname)


def load_function(ref: FunctionRef, root: Path | None = None) -> Any:
    """The task (or function) that ``ref`` names, imported in this process (a worker).

    A ref with a ``path`` is a script inside the code bundle unpacked at
    ``root``: it is imported from there under ``ref.module``, never as
    ``__main__``, so its ``if __name__ == "__main__":`` block does not run.
    Otherwise ``ref.module`` is imported by name (from the bundle, which
    is first on ``sys.path``, or from what is installed).
    """
    if ref.path is not None:
        if root is None:
            raise ImportFailed(f"{ref} is in a script, and no code bundle was sent with it")
        file = (root / ref.path).resolve()
        if not file.is_file():
            raise ImportFailed(f"{ref}: the code bundle has no file {ref.path}")
        module = sys.modules.get(ref.module)
        if module is None or not _same(getattr(module, "__file__", None), file):
            if str(file.parent) not in sys.path:
                sys.path.insert(0, str(file.parent))
            module = _exec(ref.module, file)
    else:
        try:
            module = importlib.import_module(ref.module)
        except ImportError as exc:
            raise ImportFailed(
                f"cannot import {ref.module} to run {ref}: {exc}; install it where the "
                f"worker runs, or keep it inside the project folder that is bundled"
            ) from exc
        except BaseException as exc:
            raise ImportFailed(f"importing {ref.module} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in ref.qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if obj is None or not callable(obj):
        raise ImportFailed(f"{ref.module} has no function {ref.qualname!r} (looking for {ref})")
    return obj
