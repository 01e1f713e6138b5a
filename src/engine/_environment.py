"""Shared task defaults: :class:`Environment` (Flyte's ``TaskEnvironment``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from ._errors import ConfigError
from ._task import Task, check_options

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Environment"]

P = ParamSpec("P")
R = TypeVar("R")


class Environment:
    """Defaults shared by the tasks declared with ``@env.task``.

    ``Environment("train", resources=Resources(gpu=1), retries=2)`` gives
    every ``@env.task`` those options unless the task sets its own; task
    names are prefixed with the environment's name (``"train.fit"``), so two
    environments can each have a ``fit``.
    """

    def __init__(self, name: str, **defaults: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"Environment name must be a non-empty string, got {name!r}")
        check_options(defaults, where=f"Environment {name!r}")
        if "name" in defaults:
            raise ConfigError(f"Environment {name!r}: name= is set per task, not per environment")
        self.name = name
        self.defaults = defaults
        self.tasks: dict[str, Task[Any, Any]] = {}

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: None = None, /, **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self, fn: Callable[P, R] | None = None, /, **options: Any
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Like :func:`engine.task`, with this environment's defaults."""
        check_options(options, where=f"{self.name}.task")

        def decorate(f: Callable[P, R]) -> Task[P, R]:
            merged = {**self.defaults, **options}
            merged.setdefault("name", f"{self.name}.{getattr(f, '__name__', f)}")
            made: Task[P, R] = Task(f, **merged)
            self.tasks[made.name] = made
            return made

        return decorate if fn is None else decorate(fn)

    def __repr__(self) -> str:
        return f"Environment({self.name!r}, {len(self.tasks)} tasks)"
