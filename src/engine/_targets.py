"""Offload targets: the ``targets=`` and ``offload=`` of an ``Engine``, and finding a target by name.

A target is a backend object or a name.  Names resolve, in this order,
from ``Engine(targets={name: backend})``, from backends already built
from config tables, and from the config's ``[tool.shoal.offload.NAME]``
tables (built once per engine, through the registry).  ``"local"`` is
never a target: in an offload map it means "in this process".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._errors import ConfigError

if TYPE_CHECKING:
    from ._config import Config
    from ._task import Task

__all__ = ["check_offload", "check_targets", "resolve_target"]


def resolve_target(
    target: Any, task: Task[Any, Any], targets: Mapping[str, Any], built: dict[str, Any], config: Config
) -> tuple[str, Any]:
    """(name, backend) of ``target``, a name or a backend object, for a call of ``task``.

    ``built`` keeps the backends made from config tables, one per name.
    """
    from ._backend import Backend

    if not isinstance(target, str):
        if not isinstance(target, Backend):
            raise ConfigError(
                f"task {task.name!r}: offload= takes a target name or a backend object "
                f"(offload.Local(), offload.SSH(...), offload.Batch(...)), got {target!r}"
            )
        for name, known in targets.items():
            if known is target:
                return name, target
        # Unnamed: called after its class ("offload.Local"); the name "local"
        # means this process.
        package = type(target).__module__.partition(".")[0]
        return f"{package}.{type(target).__qualname__}", target
    found = targets.get(target)
    if found is not None:
        return target, found
    made = built.get(target)
    if made is not None:
        return target, made
    table = config.offload.get(target)
    if table is None:
        known_names = sorted({*targets, *config.offload})
        raise ConfigError(
            f"task {task.name!r} is sent to offload target {target!r}, which is not defined; "
            f"known targets: {', '.join(known_names) or 'none'} (define it with "
            f"Engine(targets={{{target!r}: ...}}) or a [tool.shoal.offload.{target}] table, "
            f"or use 'local' to run the task in this process)"
        )
    from ._registry import build_target

    made = built[target] = build_target(target, table, config)
    return target, made


def check_targets(targets: Mapping[str, Any] | None) -> dict[str, Any]:
    """``Engine(targets=)``: names (never ``local``) to backend objects."""
    from ._backend import Backend

    if targets is None:
        return {}
    if not isinstance(targets, Mapping):
        raise ConfigError(f"Engine targets= maps target names to backend objects, got {targets!r}")
    for name, backend in targets.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"Engine targets=: a target name is a non-empty string, got {name!r}")
        if name == "local":
            raise ConfigError(
                "Engine targets=: no target may be named 'local', which means 'run in this "
                "process'; name it otherwise (the backend offload.Local keeps its own name)"
            )
        if not isinstance(backend, Backend):
            raise ConfigError(
                f"Engine targets={{{name!r}: ...}} takes a backend object (offload.Local(), "
                f"offload.SSH(...), offload.Batch(...)), got {backend!r}"
            )
    return dict(targets)


def check_offload(offload: Mapping[str, Any] | None) -> dict[str, Any]:
    """``Engine(offload=)``: task names to targets (a name, a backend object, or ``"local"``)."""
    if offload is None:
        return {}
    if not isinstance(offload, Mapping):
        raise ConfigError(f"Engine offload= maps task names to targets, got {offload!r}")
    for task, target in offload.items():
        if not isinstance(task, str) or not task:
            raise ConfigError(f"Engine offload=: a key is a task name, got {task!r}")
        if isinstance(target, str) and not target:
            raise ConfigError(f"Engine offload={{{task!r}: ''}}: give a target name, or 'local'")
    return dict(offload)
