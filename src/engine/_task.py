"""Tasks: functions that become actions when called inside a run."""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import threading
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar, overload

from ._action import named_execute
from ._context import action_var
from ._errors import ConfigError
from ._options import Resources, Retry
from ._signature import Signature

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Task", "task"]

P = ParamSpec("P")
R = TypeVar("R")

TASK_OPTIONS = (
    "name", "retries", "timeout", "cache", "concurrency", "resources", "offload", "nodes", "ranks_per_host",
)
#: What ``task.override(...)`` may change: everything but the name, which
#: keys, replay and the cache depend on.
OVERRIDE_OPTIONS = (
    "retries", "timeout", "cache", "concurrency", "resources", "offload", "nodes", "ranks_per_host",
)


class Keep(enum.Enum):
    """The default of each ``override`` option: keep the task's own setting."""

    KEEP = "keep"


KEEP = Keep.KEEP


class Task(Generic[P, R]):
    """A function registered with :func:`task`.

    Called inside a run, it creates an *action*: the arguments are validated
    at once, and the returned awaitable runs the action under the engine's
    scheduler (admission, retries, timeout, journal).  Called outside any
    run, it is the plain function, which keeps unit tests simple.
    """

    __slots__ = (
        "__dict__",
        "__weakref__",
        "_execute",
        "_handles",
        "admitted",
        "cache_version",
        "concurrency",
        "fn",
        "is_async",
        "limiter",
        "name",
        "nodes",
        "offload",
        "origin",
        "placed",
        "plain",
        "ranks_per_host",
        "resources",
        "retry",
        "signature",
        "timeout",
    )

    if TYPE_CHECKING:
        # Copied from the function by functools.update_wrapper.
        __name__: str
        __qualname__: str
        __wrapped__: Callable[P, Any]

    def __init__(
        self,
        fn: Callable[P, Any],
        *,
        name: str | None = None,
        retries: int | Retry | None = None,
        timeout: float | None = None,
        cache: bool | str = False,
        concurrency: int | None = None,
        resources: Resources | None = None,
        offload: Any = None,
        nodes: int = 1,
        ranks_per_host: int | None = None,
    ) -> None:
        if isinstance(fn, Task):
            fn = fn.fn  # re-decorating a task wraps its function, not the task
        if not callable(fn):
            raise ConfigError(f"@engine.task decorates a function, got {fn!r}")
        self.fn: Callable[P, Any] = fn
        self.name = name or getattr(fn, "__name__", None) or repr(fn)
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"task name must be a non-empty string, got {name!r}")
        what = f"task {self.name!r}"
        self.is_async = inspect.iscoroutinefunction(fn)
        self.retry = Retry.coerce(retries, what=what)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise ConfigError(f"{what}: timeout= is a number of seconds > 0, got {timeout!r}")
        self.timeout = None if timeout is None else float(timeout)
        self.concurrency = _count(
            what, "concurrency", concurrency, "the most actions of this task running at once", none="no limit"
        )
        if resources is not None and not isinstance(resources, Resources):
            raise ConfigError(f"{what}: resources= takes engine.Resources(...), got {resources!r}")
        self.resources = resources
        self.offload = offload
        #: Ranks of a gang (1: an ordinary action); see ``engine._cluster``.
        self.nodes: int = _count(what, "nodes", nodes, "how many ranks run the function together (a gang)")
        self.ranks_per_host = _count(
            what, "ranks_per_host", ranks_per_host, "the most ranks of a gang placed on one host",
            none="the target's default",
        )
        if cache is True:
            self.cache_version: str | None = _source_version(fn)
        elif cache is False or cache is None:
            self.cache_version = None
        elif isinstance(cache, str) and cache:
            self.cache_version = cache
        else:
            raise ConfigError(
                f"{what}: cache= takes True, False or a version string, got {cache!r}"
            )
        self.signature = Signature(fn, self.name)
        # Runs one action of this task: the engine's ``execute``, named after
        # the task so that a call never awaited is reported by its name.
        self._execute = named_execute(self.name)
        # An async task with no retry and no timeout takes the action path's
        # shortest branch.
        self.plain = self.is_async and self.retry.attempts == 0 and self.timeout is None
        # Whether an action of this task must take slots before it runs.
        self.admitted = concurrency is not None or (resources is not None and offload is None)
        # Whether a call must check where the action can run (resources, offload).
        self.placed = resources is not None or offload is not None or nodes > 1
        # Invariant: ``origin`` is the task as declared (itself, unless this
        # is a handle made by ``override``), and ``limiter`` the task whose
        # ``concurrency`` slots its actions share: its origin's, unless the
        # handle was given a ``concurrency`` of its own.
        self.origin: Task[P, R] = self
        self.limiter: Task[Any, Any] = self
        # The handles made by ``with_options``, by their options, so that a
        # handle made again (``square.override(concurrency=2)`` in a loop)
        # is the same one: one placement, one set of concurrency slots.
        self._handles: dict[tuple[tuple[str, Any], ...], Task[P, R]] = {}
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        parent = action_var.get()
        if parent is None:
            return self.fn(*args, **kwargs)  # type: ignore[no-any-return]
        run = parent.run
        if run.thread_id != threading.get_ident():
            # A sync task (in a worker thread) calling another task: run the
            # child on the loop and block this thread until it is done.
            return run.call_from_thread(self, parent, args, kwargs)  # type: ignore[no-any-return]
        # For an async function R is the coroutine type, which this is.
        return run.call(self, parent, args, kwargs)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<engine.Task {self.name!r}>"

    def __reduce__(self) -> str | tuple[Any, ...]:
        # Pickled by reference to the module attribute, like a function.
        return str(self.fn.__qualname__)

    def override(
        self,
        *,
        retries: int | Retry | Literal[Keep.KEEP] | None = KEEP,
        timeout: float | Literal[Keep.KEEP] | None = KEEP,
        cache: bool | str | Literal[Keep.KEEP] = KEEP,
        resources: Resources | Literal[Keep.KEEP] | None = KEEP,
        concurrency: int | Literal[Keep.KEEP] | None = KEEP,
        offload: object = KEEP,
        nodes: int | Literal[Keep.KEEP] = KEEP,
        ranks_per_host: int | Literal[Keep.KEEP] | None = KEEP,
        **unknown: object,
    ) -> Task[P, R]:
        """This task with other options, for some calls (``await train.override(retries=3)(cfg)``).

        The handle calls the same function under the same name, so its
        actions have the same keys: replay, resume and the cache treat them
        as calls of this task.  Options not given are this task's own.  A
        ``concurrency`` given here limits the handle's calls on their own;
        otherwise they share this task's limit.  ``offload=`` places the
        handle's calls (``"local"``: this process); an engine's
        ``offload=`` map, which names tasks, still wins, as it does over
        ``@task(offload=)``.  An unknown option is a :class:`ConfigError`.
        """
        if unknown:
            name = next(iter(unknown))
            if name == "name":
                raise ConfigError(
                    f"task {self.name!r}: override() cannot change the name (action keys, replay "
                    f"and the cache depend on it); declare another task for another name"
                )
            _unknown_option(name, OVERRIDE_OPTIONS, where=f"task {self.name!r}: override()")
        given = {
            option: value
            for option, value in (
                ("retries", retries), ("timeout", timeout), ("cache", cache), ("resources", resources),
                ("concurrency", concurrency), ("offload", offload), ("nodes", nodes),
                ("ranks_per_host", ranks_per_host),
            )
            if value is not KEEP
        }
        return self.with_options(given)

    def with_options(self, given: dict[str, Any]) -> Task[P, R]:
        """A handle of this task with the options in ``given`` (names checked by the caller)."""
        memo: tuple[tuple[str, Any], ...] | None = tuple(sorted(given.items()))
        try:
            found = self._handles.get(memo)  # type: ignore[arg-type]
        except TypeError:  # an option value that cannot be hashed: not remembered
            memo = found = None
        if found is not None:
            return found
        options: dict[str, Any] = {
            "retries": self.retry,
            "timeout": self.timeout,
            "cache": self.cache_version or False,
            "concurrency": self.concurrency,
            "resources": self.resources,
            "offload": self.offload,
            "nodes": self.nodes,
            "ranks_per_host": self.ranks_per_host,
        }
        options.update(given)
        handle: Task[P, R] = Task(self.fn, name=self.name, **options)
        handle.signature = self.signature
        handle.origin = self.origin
        handle.limiter = handle if "concurrency" in given else self.limiter
        if memo is not None:
            self._handles[memo] = handle
        return handle

    @property
    def import_path(self) -> str:
        """``module:qualname`` of the function."""
        return f"{self.fn.__module__}:{self.fn.__qualname__}"


def _count(what: str, option: str, value: Any, meaning: str, *, none: str | None = None) -> Any:
    """``value`` if it is a whole number >= 1 (or None, where ``none`` says what None means)."""
    if value is None and none is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = "" if none is None else f" (or None for {none})"
        raise ConfigError(f"{what}: {option}= is {meaning}, a whole number >= 1{also}, got {value!r}")
    return value


def _source_version(fn: Callable[..., Any]) -> str:
    """Cache version of ``cache=True``: a hash of the function's source."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        source = repr(code.co_code + repr(code.co_consts).encode()) if code else repr(fn)
    return "src-" + hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


def check_options(options: dict[str, Any], *, where: str, known: tuple[str, ...] = TASK_OPTIONS) -> None:
    unknown = [k for k in options if k not in known]
    if unknown:
        _unknown_option(unknown[0], known, where=where)


def _unknown_option(name: str, known: tuple[str, ...], *, where: str) -> None:
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{where} got an unknown option {name!r}.{hint} Options are: {', '.join(known)}.")


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task(
    fn: None = None, /, **options: Any
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None, /, **options: Any
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Make a function a task; bare (``@task``) or with options (``@task(retries=2)``).

    Options: ``name`` (default: the function's name), ``retries``
    (int or :class:`Retry`), ``timeout`` (seconds per attempt, enforced by
    cancelling it), ``cache`` (False, True for a version hashed from the
    source, or an explicit version string), ``concurrency`` (most actions of
    this task running at once in an engine), ``resources``
    (:class:`Resources`), ``offload`` (a target name from config or a
    backend object), ``nodes`` (run each action as a gang of that many
    ranks on the offload target, see :func:`engine.cluster`) and
    ``ranks_per_host`` (the most ranks of a gang on one SSH host; default
    the target's, else 1).  Sync functions run in a worker thread.
    """
    check_options(options, where="@engine.task")
    if fn is None:

        def decorate(f: Callable[P, R]) -> Task[P, R]:
            return Task(f, **options)

        return decorate
    return Task(fn, **options)
