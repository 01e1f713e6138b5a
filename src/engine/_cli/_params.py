"""Command-line options from a task's signature, and picking the task in a file.

Each named parameter of the task becomes an option ``--name`` (underscores
written as dashes; the underscore spelling is accepted too):

- ``bool``: a flag pair ``--name/--no-name``.
- ``str``: the text as given.  ``int``, ``float``: a number.
- ``list[T]``, ``tuple[T, ...]``, ``set[T]``: repeat the option
  (``--x 1 --x 2``), or give a JSON array (``--x '[1, 2]'``), or both.
- anything else msgspec understands (Structs, dataclasses, dicts,
  ``Literal``, enums, datetimes, unions): JSON (``--cfg '{"lr": 0.1}'``),
  or for scalar-like types the bare text (``--when 2024-05-01``).
- ``pathlib.Path``: the text as a path.  No annotation: JSON if it parses,
  else the text.

A parameter without a default is a required option.  Only the options
given are passed to the task, so the defaults are the function's own.
A value that does not convert is a usage error naming the option, the
expected type and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import pathlib
import types
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec

from .._errors import ConfigError, ImportFailed
from .._loader import load_file, locate
from .._task import Task

if typing.TYPE_CHECKING:
    from .._config import Config

__all__ = [
    "HelpRequested",
    "TaskArgs",
    "UsageProblem",
    "check_offload_targets",
    "check_offload_tasks",
    "convert",
    "file_tasks",
    "module_tasks",
    "parse_offload",
    "parse_task_args",
    "pick_task",
    "task_options",
    "type_name",
]

_EMPTY: Any = inspect.Parameter.empty
_SEQUENCES = (list, tuple, set, frozenset)


def type_name(annotation: Any) -> str:
    """How an annotation is written for a user: ``int``, ``list[int]``, ``Config``."""
    if annotation is _EMPTY:
        return "any value"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "").replace("builtins.", "")


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(``X``, True) for ``X | None``; (annotation, False) otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _is_class(annotation: Any) -> bool:
    """A plain class (``list[int]`` passes ``isinstance(x, type)`` but is not one)."""
    return isinstance(annotation, type) and typing.get_origin(annotation) is None


def _is_text(annotation: Any) -> bool:
    """Whether the raw command-line text is itself the value (no JSON decoding)."""
    if annotation is str:
        return True
    if _is_class(annotation) and issubclass(annotation, enum.Enum):
        return all(isinstance(m.value, str) for m in annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    return False


class BadValue(ValueError):
    """A command-line value that does not convert to its parameter's type."""


def convert(text: str, annotation: Any, *, item_of: Any = None) -> Any:
    """One command-line value as ``annotation`` (see the module docstring).

    With ``item_of`` (the sequence annotation), ``text`` is one occurrence
    of a repeatable option and the result is a list of items: a JSON array
    stands for several.  Raises :class:`BadValue` saying what was expected.
    """
    expected = type_name(item_of if item_of is not None else annotation)
    try:
        if item_of is not None:
            if text.lstrip().startswith("["):
                return list(_decode(text, types.GenericAlias(list, (annotation,))))
            return [_decode(text, annotation)]
        return _decode(text, annotation)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        detail = str(exc)
        # msgspec's "Expected `int`, got `str`" only repeats what we say.
        hint = "" if detail.startswith("Expected `") and "$" not in detail else f" ({detail})"
        raise BadValue(f"expected {expected}, got {text!r}{hint}") from None


def _decode(text: str, annotation: Any) -> Any:
    base, optional = _strip_optional(annotation)
    if annotation is _EMPTY or annotation is Any or annotation is object:
        try:
            return msgspec.json.decode(text)
        except msgspec.DecodeError:
            return text
    if optional and text in ("null", "none", "None"):
        return None
    if _is_class(base) and issubclass(base, pathlib.PurePath):
        return base(text)
    if _is_text(base):
        return msgspec.convert(text, base)
    try:
        return msgspec.json.decode(text, type=annotation, strict=False)
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError:
        # Not JSON at all: bare text for scalar-like types (datetimes, UUIDs,
        # enums of numbers), converted the lax way.
        if _structured(base):
            raise ValueError("not valid JSON") from None
        return msgspec.convert(text, annotation, strict=False)


def _structured(annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    if origin in (*_SEQUENCES, dict):
        return True
    if isinstance(origin, type):
        return issubclass(origin, msgspec.Struct) or dataclasses.is_dataclass(origin) or typing.is_typeddict(origin)
    return False


def _metavar(annotation: Any) -> str:
    base, _ = _strip_optional(annotation)
    if base in (int, float, str):
        return str(base.__name__).upper()
    if _is_class(base) and issubclass(base, pathlib.PurePath):
        return "PATH"
    if _structured(base):
        return "JSON"
    return "VALUE"


def _sequence_item(annotation: Any) -> Any | None:
    """The item type of ``list[T]``/``tuple[T, ...]``/``set[T]``, or None."""
    base, _ = _strip_optional(annotation)
    origin = typing.get_origin(base)
    if origin not in _SEQUENCES:
        return None
    args = typing.get_args(base)
    if origin is tuple:
        return args[0] if len(args) == 2 and args[1] is Ellipsis else None
    return args[0] if args else Any


class TaskOption:
    """One task parameter as a command-line option."""

    def __init__(self, name: str, annotation: Any, default: Any) -> None:
        self.name = name
        self.annotation = annotation
        self.default = default
        self.flag = f"--{name.replace('_', '-')}"
        self.required = default is _EMPTY
        self.is_bool = _strip_optional(annotation)[0] is bool
        self.item = _sequence_item(annotation)

    @property
    def usage(self) -> str:
        if self.is_bool:
            return f"{self.flag}/--no-{self.flag[2:]}"
        return f"{self.flag} {_metavar(self.item if self.item is not None else self.annotation)}"

    @property
    def help(self) -> str:
        text = type_name(self.annotation)
        if self.item is not None:
            text += ": repeat the option or give a JSON array"
        return text + (" (required)" if self.required else f" [default: {_show(self.default)}]")


class TaskArgs:
    """The arguments for one task call, parsed from the command line."""

    def __init__(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs


class HelpRequested(Exception):
    """``--help`` was among the task's options."""


def task_options(task: Task[Any, Any]) -> list[TaskOption]:
    return [TaskOption(n, a, d) for n, a, d in task.signature.params]


def _show(default: Any) -> str:
    text = repr(default)
    return text if len(text) <= 40 else text[:37] + "..."


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_task_args(task: Task[Any, Any], argv: list[str]) -> TaskArgs:
    """Parse ``argv`` (``--name value``, ``--name=value``, ``--flag``/``--no-flag``).

    Raises :class:`UsageProblem` for an unknown option, a missing value or
    required option, or a value that does not convert, and
    :class:`HelpRequested` for ``--help``.  Only the options given are in
    the result, so the task's own defaults apply to the rest.
    """
    options = task_options(task)
    by_flag: dict[str, tuple[TaskOption, bool | None]] = {}
    for opt in options:
        spellings = {opt.name.replace("_", "-"), opt.name}
        for spelling in spellings:
            by_flag[f"--{spelling}"] = (opt, True if opt.is_bool else None)
            if opt.is_bool:
                by_flag[f"--no-{spelling}"] = (opt, False)
    given: dict[str, Any] = {}
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token in ("--help", "-h"):
            raise HelpRequested
        if not token.startswith("--"):
            raise UsageProblem(
                f"unexpected argument {token!r}; task {task.name!r} takes options only "
                f"({_listing(options)})"
            )
        flag, eq, inline = token.partition("=")
        found = by_flag.get(flag)
        if found is None:
            close = difflib.get_close_matches(flag, list(by_flag), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageProblem(
                f"no such option: {flag}{hint} (task {task.name!r} takes {_listing(options)})"
            )
        opt, flag_value = found
        if opt.is_bool:
            if not eq:
                given[opt.name] = flag_value
                continue
            word = inline.strip().lower()
            if word not in _TRUE + _FALSE or flag_value is False:
                raise UsageProblem(
                    f"invalid value for {opt.flag}: expected bool (true or false), got {inline!r}"
                )
            given[opt.name] = word in _TRUE
            continue
        if eq:
            text = inline
        elif i < len(tokens):
            text = tokens[i]
            i += 1
        else:
            raise UsageProblem(f"option {opt.flag} needs a value ({type_name(opt.annotation)})")
        try:
            if opt.item is not None:
                given.setdefault(opt.name, []).extend(convert(text, opt.item, item_of=opt.annotation))
            else:
                given[opt.name] = convert(text, opt.annotation)
        except BadValue as exc:
            raise UsageProblem(f"invalid value for {opt.flag}: {exc}") from None
    missing = [opt for opt in options if opt.required and opt.name not in given]
    if missing:
        names = ", ".join(f"{o.flag} ({type_name(o.annotation)})" for o in missing)
        raise UsageProblem(f"missing option{'s' if len(missing) > 1 else ''}: {names}")
    for opt in options:
        if opt.item is not None and opt.name in given:
            given[opt.name] = _as_sequence(given[opt.name], opt.annotation)
    args: list[Any] = []
    for pname in _positional_only(task):
        if pname not in given:
            break
        args.append(given.pop(pname))
    return TaskArgs(args, given)


class UsageProblem(Exception):
    """What is wrong with the command line, in words for the user."""


def _listing(options: list[TaskOption]) -> str:
    return ", ".join(o.usage for o in options) or "no options"


def _as_sequence(items: list[Any], annotation: Any) -> Any:
    base, _ = _strip_optional(annotation)
    origin = typing.get_origin(base)
    if origin is list or origin is None:
        return items
    return msgspec.convert(items, base)


def _positional_only(task: Task[Any, Any]) -> list[str]:
    try:
        sig = inspect.signature(task.fn)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values() if p.kind is p.POSITIONAL_ONLY]


# -- finding the task -------------------------------------------------------------


def split_target(target: str) -> tuple[str, str | None]:
    """``FILE[:TASK]`` -> (file, task or None); a file whose name has a colon wins."""
    if Path(target).is_file() or ":" not in target:
        return target, None
    file, _, name = target.rpartition(":")
    return file, name or None


def pick_task(target: str) -> Task[Any, Any]:
    """Import ``FILE[:TASK]`` and return the task to run.

    Without ``:TASK``: the only task defined in the file, else the one named
    ``main``.  Tasks imported into the file from elsewhere count only when
    the file defines none.  Raises :class:`UsageProblem` with what to
    do instead.
    """
    file, name = split_target(target)
    if not Path(file).exists():
        raise UsageProblem(f"no such file: {file}")
    if Path(file).is_dir():
        raise UsageProblem(f"{file} is a folder; give the Python file that defines the task")
    try:
        module = load_file(file)
    except ImportFailed as exc:
        raise UsageProblem(str(exc)) from None
    tasks = _tasks_in(module)
    if name is not None:
        try:
            return locate(module, name)
        except ImportFailed:
            by_name = [t for t in tasks if t.name == name]
            if by_name:
                return by_name[0]
            raise UsageProblem(
                f"{file} has no task {name!r}; tasks there: {', '.join(t.name for t in tasks) or 'none'}"
            ) from None
    if not tasks:
        raise UsageProblem(
            f"{file} defines no task; decorate the function to run with @engine.task"
        )
    if len(tasks) == 1:
        return tasks[0]
    mains = [t for t in tasks if t.name == "main" or t.fn.__name__ == "main"]
    if len(mains) == 1:
        return mains[0]
    names = ", ".join(t.name for t in tasks)
    raise UsageProblem(
        f"{file} defines several tasks ({names}) and none is named 'main'; "
        f"pick one with FILE:TASK, e.g. 'shoal run {file}:{tasks[0].fn.__qualname__}'"
    )


def _tasks_in(module: ModuleType) -> list[Task[Any, Any]]:
    seen: dict[int, Task[Any, Any]] = {}
    for value in vars(module).values():
        if isinstance(value, Task):
            seen.setdefault(id(value), value)
    tasks = list(seen.values())
    own = [t for t in tasks if t.fn.__module__ == module.__name__]
    return own or tasks


# -- --offload TASK=TARGET --------------------------------------------------------


def parse_offload(values: list[str] | None) -> dict[str, str]:
    """``--offload TASK=TARGET`` (repeatable) as ``{TASK: TARGET}``.

    Raises :class:`UsageProblem` for a value that is not of that form (no
    ``=``, an empty side) or a task given twice.
    """
    offload: dict[str, str] = {}
    for value in values or ():
        task, eq, target = value.partition("=")
        task, target = task.strip(), target.strip()
        if not eq or not task or not target:
            raise UsageProblem(
                f"invalid value for --offload: expected TASK=TARGET (a task of the flow, and a "
                f"target named in config, or 'local' to run the task in this process), got {value!r}"
            )
        if task in offload and offload[task] != target:
            raise UsageProblem(
                f"--offload sends task {task!r} to both {offload[task]!r} and {target!r}; give one"
            )
        offload[task] = target
    return offload


def module_tasks(module: ModuleType) -> list[str]:
    """The names of every task in ``module``: defined there or imported into it."""
    return sorted({value.name for value in vars(module).values() if isinstance(value, Task)})


def file_tasks(target: str) -> list[str]:
    """The names of every task in the file of ``FILE[:TASK]`` (imported already by :func:`pick_task`)."""
    file, _ = split_target(target)
    try:
        return module_tasks(load_file(file))
    except ImportFailed as exc:
        raise UsageProblem(str(exc)) from None


def check_offload_tasks(offload: dict[str, str], tasks: list[str], where: str) -> None:
    """Refuse an ``--offload`` of a task that ``where`` (the flow's file) does not have."""
    for name in offload:
        if name not in tasks:
            close = difflib.get_close_matches(name, tasks, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageProblem(
                f"--offload {name}={offload[name]}: {where} has no task {name!r}{hint} "
                f"(tasks there: {', '.join(tasks) or 'none'})"
            )


def check_offload_targets(offload: dict[str, str], config: Config, *, flag: str = "--offload {task}={target}") -> None:
    """Refuse an ``--offload`` to a target that config does not define, before the run starts.

    (The engine would refuse it only when the task is first called, failing
    the run; from the command line it is a usage error, exit 2.)
    """
    for task, target in offload.items():
        if target == "local" or target in config.offload:
            continue
        known = ", ".join(sorted(config.offload))
        close = difflib.get_close_matches(target, list(config.offload), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        if config.source is None:
            where = "no config file was found, so no target is defined"
            table = f"[tool.shoal.offload.{target}] table of pyproject.toml"
        else:
            where = f"targets defined in {config.source}: {known or 'none'}"
            table = f"{config.target_table(target, with_file=False)} table there"
        raise ConfigError(
            f"{flag.format(task=task, target=target)}: there is no offload target {target!r}{hint} ({where}); "
            f"define it in a {table}, or give {task}=local to run the task in this process"
        )
