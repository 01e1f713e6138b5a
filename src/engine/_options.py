"""Per-task options: :class:`Retry` and :class:`Resources`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from ._errors import ConfigError

if TYPE_CHECKING:
    import random

__all__ = ["Backoff", "Resources", "Retry"]


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before the n-th try again of anything: retries, polling, reconnects.

    The one policy of the engine and its backends: ``base * 2 ** (n - 1)``
    seconds, capped at ``max_delay``, then spread by up to ``jitter`` of
    itself in either direction (0.1: +-10%), so that many waiters do not
    come back in lockstep.  The random source is the caller's (an engine's
    ``rng``), so that tests can make it deterministic.
    """

    base: float = 1.0
    max_delay: float = 60.0
    jitter: float = 0.1

    def delay(self, n: int, rng: random.Random) -> float:
        """Seconds to wait before try ``n`` again (1-based)."""
        base = min(self.base * 2.0 ** (n - 1), self.max_delay)
        if self.jitter:
            base *= 1.0 + self.jitter * (2.0 * rng.random() - 1.0)
        return max(0.0, base)


@dataclasses.dataclass(frozen=True, slots=True, init=False)
class Retry:
    """How often, and after which failures, an action is attempted again.

    ``attempts`` counts retries, not tries: ``Retry(2)`` runs a failing
    action at most three times.  The delay before retry *n* (1-based) is
    ``backoff * 2 ** (n - 1)``, capped at ``max_delay``, then spread by up to
    ``jitter`` of itself in either direction so that many failing actions do
    not retry in lockstep.  Only exceptions that are instances of ``on`` (an
    exception class, or any iterable of them; kept as a tuple) are retried;
    cancellation never is.  A later attempt does not run again the child
    calls and traces that succeeded in an earlier one: it gets their values.
    """

    attempts: int
    backoff: float
    max_delay: float
    jitter: float
    on: tuple[type[BaseException], ...]

    def __init__(
        self,
        attempts: int = 0,
        backoff: float = 1.0,
        max_delay: float = 60.0,
        jitter: float = 0.1,
        on: type[BaseException] | Iterable[type[BaseException]] = (Exception,),
    ) -> None:
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
            raise ConfigError(
                f"engine.Retry attempts is a whole number of retries >= 0, got {attempts!r}"
            )
        for name, value in (("backoff", backoff), ("max_delay", max_delay), ("jitter", jitter)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"engine.Retry {name}= is a number of seconds, got {value!r}")
        if backoff < 0 or max_delay < 0:
            raise ConfigError(
                f"engine.Retry backoff and max_delay must be >= 0, got backoff={backoff!r}, "
                f"max_delay={max_delay!r}"
            )
        if not 0 <= jitter <= 1:
            raise ConfigError(f"engine.Retry jitter is a fraction between 0 and 1, got {jitter!r}")
        types = _exception_types(on)
        set_field = object.__setattr__  # frozen: fields are set once, here
        set_field(self, "attempts", attempts)
        set_field(self, "backoff", float(backoff))
        set_field(self, "max_delay", float(max_delay))
        set_field(self, "jitter", float(jitter))
        set_field(self, "on", types)

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return Backoff(self.backoff, self.max_delay, self.jitter).delay(retry, rng)

    @classmethod
    def coerce(cls, value: Any, *, what: str) -> Retry:
        """Turn the ``retries=`` option (int, Retry or None) of ``what`` into a Retry."""
        if value is None:
            return NO_RETRY
        if isinstance(value, Retry):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ConfigError(
                    f"{what}: retries= is how many times a failed action is attempted again, "
                    f"a whole number >= 0, got {value!r}"
                )
            return cls(value)
        raise ConfigError(
            f"{what}: retries= takes a whole number or engine.Retry(...), got {value!r}"
        )


def _exception_types(on: Any) -> tuple[type[BaseException], ...]:
    """``Retry(on=...)`` as a tuple of exception classes, or a ConfigError."""
    if isinstance(on, type):
        types: tuple[Any, ...] = (on,)
    elif isinstance(on, str | bytes) or not isinstance(on, Iterable):
        types = ()
    else:
        types = tuple(on)
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise ConfigError(
            f"engine.Retry on= takes exception classes (one, or an iterable of them such as "
            f"(ValueError, OSError)), got {on!r}"
        )
    return types


NO_RETRY = Retry(0)


class Resources(msgspec.Struct, frozen=True, kw_only=True):
    """What one action needs: CPU and GPU slots, and memory (``"4Gi"`` or bytes).

    Run locally, an action takes ``cpu`` of the engine's CPU slots and ``gpu``
    of its GPU slots for as long as it runs; offloaded, the numbers go to the
    backend (job definition, host choice) instead.  ``cpu=0`` (the default)
    takes no slot, which suits the common async, I/O-bound task.
    """

    cpu: float = 0
    memory: int | str | None = None
    gpu: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.cpu, bool) or not isinstance(self.cpu, int | float):
            raise ConfigError(f"Resources cpu= is a number of CPU slots (e.g. 2 or 0.5), got {self.cpu!r}")
        if isinstance(self.gpu, bool) or not isinstance(self.gpu, int):
            raise ConfigError(f"Resources gpu= is a whole number of GPUs, got {self.gpu!r}")
        if self.cpu < 0 or self.gpu < 0:
            raise ConfigError(
                f"Resources cpu and gpu must be >= 0, got cpu={self.cpu!r}, gpu={self.gpu!r}"
            )
        if self.memory is not None:
            parse_memory(self.memory)

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_memory(self.memory)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1024**4,
    "tib": 1024**4,
}


def parse_memory(value: int | str) -> int:
    """``"512Mi"`` -> 536870912; integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number) :].strip()
        try:
            amount = float(number)
        except ValueError:
            amount = -1.0
        if amount >= 0 and unit in _UNITS:
            return int(amount * _UNITS[unit])
    raise ConfigError(
        f"Resources memory must be bytes or a size such as '512Mi' or '4Gi', got {value!r}"
    )
