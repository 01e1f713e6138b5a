"""Run-time overrides of task options: ``Engine(overrides=...)`` and ``shoal run --with``.

``Engine(overrides={"train": {"timeout": 600, "offload": "lab"}})`` gives
every call of the task named ``train`` in that engine's runs those options,
as ``train.override(timeout=600, offload="lab")`` would (same name, same
keys).  Precedence, from the most specific: the engine's ``offload`` map,
then these overrides, then ``task.override(...)`` in code, then
``@task(...)``: what is chosen when the flow is launched wins over what the
code says, as ``--offload`` already does.

``parse_with`` reads ``TASK.OPTION=VALUE`` strings, each value parsed as
its option's type, so that the command line stays a thin edge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import ConfigError
from ._options import Resources
from ._task import OVERRIDE_OPTIONS, Task, _unknown_option

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = ["check_overrides", "parse_with"]

_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")
_NONE = ("none", "null")


def _probe() -> None:
    """Stands in for a task's function when overrides are checked before any task is known."""


def check_overrides(overrides: Mapping[str, Mapping[str, Any]] | None, *, what: str = "Engine overrides=") -> dict[str, dict[str, Any]]:
    """``overrides`` checked: known option names, and values each task option accepts."""
    if overrides is None:
        return {}
    checked: dict[str, dict[str, Any]] = {}
    for name, options in overrides.items():
        if not isinstance(name, str) or not hasattr(options, "items"):
            raise ConfigError(f"{what} maps task names to {{option: value}}, got {name!r}: {options!r}")
        for option in options:
            _check_name(option, where=f"{what} for task {name!r}")
        try:
            # The task's constructor is the one place that validates options.
            Task(_probe, name=name, **dict(options))
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from None
        checked[name] = dict(options)
    return checked


def _check_name(option: str, *, where: str) -> None:
    if option == "name":
        raise ConfigError(f"{where}: the name of a task cannot be overridden (keys, replay and the cache depend on it)")
    if option not in OVERRIDE_OPTIONS:
        _unknown_option(option, OVERRIDE_OPTIONS, where=where)


def parse_with(values: Iterable[str], tasks: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """``["square.retries=3", "train.offload=lab"]`` as ``{"square": {"retries": 3}, ...}``.

    ``tasks``, when given, are the task names that may be named (the flow's
    file); any other is refused, with the closest name.  Each value is
    parsed as its option's type: ``retries``/``concurrency``/``nodes``/
    ``ranks_per_host`` whole numbers,
    ``timeout`` seconds, ``cache`` true/false or a version string,
    ``resources`` ``cpu=2,memory=4Gi,gpu=1``, ``offload`` a target name
    (``local``: this process); ``none`` unsets ``retries``, ``timeout``,
    ``concurrency``, ``resources`` and ``ranks_per_host``.  Raises :class:`ConfigError` naming
    the ``--with`` value.
    """
    known = None if tasks is None else sorted(set(tasks))
    parsed: dict[str, dict[str, Any]] = {}
    for text in values:
        where = f"--with {text}"
        head, eq, raw = text.partition("=")
        name, dot, option = head.strip().rpartition(".")
        if not eq or not dot or not name or not option:
            raise ConfigError(f"{where}: expected TASK.OPTION=VALUE (e.g. square.retries=3)")
        if known is not None and name not in known:
            import difflib

            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: the flow has no task {name!r}{hint} (tasks: {', '.join(known) or 'none'})")
        _check_name(option, where=where)
        value = _value(option, raw.strip(), where)
        check_overrides({name: {option: value}}, what=where)
        parsed.setdefault(name, {})[option] = value
    return parsed


def _value(option: str, raw: str, where: str) -> Any:
    lowered = raw.lower()
    if option in ("retries", "timeout", "concurrency", "resources", "ranks_per_host") and lowered in _NONE:
        return None
    if option in ("retries", "concurrency", "nodes", "ranks_per_host"):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{where}: {option} takes a whole number (or none), got {raw!r}") from None
    if option == "timeout":
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{where}: timeout takes seconds, a number > 0 (or none), got {raw!r}") from None
    if option == "cache":
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        if not raw:
            raise ConfigError(f"{where}: cache takes true, false or a version string")
        return raw
    if option == "resources":
        return _resources(raw, where)
    if not raw:
        raise ConfigError(f"{where}: offload takes a target name (or local for this process)")
    return raw


def _resources(raw: str, where: str) -> Resources:
    fields: dict[str, Any] = {}
    for part in raw.split(","):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in ("cpu", "memory", "gpu") or not value:
            raise ConfigError(
                f"{where}: resources takes cpu=N,memory=SIZE,gpu=N (any of them), got {raw!r}"
            )
        try:
            fields[key] = value if key == "memory" else (int(value) if key == "gpu" else float(value))
        except ValueError:
            raise ConfigError(f"{where}: resources {key}= takes a number, got {value!r}") from None
    try:
        return Resources(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
