"""The offload backend protocol: what the engine asks of ``offload.Local``, SSH and Batch.

The engine stays the only scheduler and the only writer of the journal; a
backend only runs attempts somewhere else.  For each attempt of an
offloaded action the engine calls::

    handle = await backend.submit(payload, hooks)   # hooks: logs and traces, live
    outcome = await backend.wait(handle)            # inside the task's timeout
    await backend.cancel(handle)                    # on cancel or timeout instead

``submit`` returns once the attempt is accepted (a worker took it, a job
was submitted); ``wait`` returns its :class:`~engine._wire.Outcome`, or
raises an :class:`~engine.OffloadError` subclass for an infrastructure
failure (a lost worker or host, a spot reclaim), which the engine retries
within the target's own ``retries`` budget without using up the task's.

A task declared with ``nodes=N`` (a *gang*, see :mod:`engine._cluster`)
is submitted with ``submit_gang(payload, gang, hooks)`` instead, by the
backends that have it (``offload.Local``, SSH, Batch); its handle is
waited for and cancelled as any other.  The backend places all N ranks or
none (gang admission), gives each its :class:`~engine.Cluster` in the
payload, and returns one outcome: rank 0's when every rank succeeded,
else that of the first rank that failed (``Outcome.rank``), having
stopped every other rank.  A rank that dies, or loses its host, is an
infrastructure failure of the whole gang.  ``gang_unfit(gang, cpu, gpu)``
says why a gang can never be placed.  Only rank 0's traces are reported
(the ranks run the same code; rank 0's checkpoints stand for the gang).

Backends are opened by the engine on first use (``open(context)``) and
closed by ``Engine.aclose()`` (``aclose()``), after its runs are cancelled
and before its journal closes; closing leaves nothing running.  As async
context managers they open with a default context, for use on their own.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import msgspec

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from ._cluster import Gang
    from ._wire import Outcome, Payload

__all__ = ["AttemptHooks", "Backend", "BackendContext", "GangBackend", "Handle"]


class Handle(msgspec.Struct, frozen=True):
    """A submitted attempt, as recorded in the journal.

    ``id`` is the backend's own name for it (a Batch job id, ``pid:n`` for
    a worker's n-th attempt) and ``where`` what users are shown: the host
    and pid it runs in, or the job id.
    """

    backend: str
    id: str
    where: str = ""
    #: For a gang: where each rank runs (host and pid, or node index), by
    #: rank; ``where`` is then rank 0's.
    ranks: tuple[str, ...] = ()


class AttemptHooks(Protocol):
    """What a backend reports to the engine while an attempt runs."""

    def log(self, stream: str, text: str, rank: int | None = None) -> None:
        """Output of the attempt: ``stream`` is ``stdout``, ``stderr`` or ``log``; ``rank`` for a gang's."""

    def trace(self, key: str, name: str, kind: str, data: bytes) -> None:
        """A trace call inside the attempt succeeded; its result is encoded as ``kind``."""


@dataclasses.dataclass(frozen=True)
class BackendContext:
    """What an engine gives the backends it opens.

    ``home``: a folder private to this engine where a backend may keep
    state (bundles, logs).  ``bundle_path(digest)`` gives the local path of
    a code bundle named in a payload.  ``blob_store``: URI of the engine's
    blob store.  ``sleep``/``monotonic``: the engine's clock, for polling
    and backoff.
    """

    home: Path
    blob_store: str | None = None
    bundle_path: Callable[[str], Path] | None = None
    sleep: Callable[[float], Awaitable[None]] | None = None
    monotonic: Callable[[], float] | None = None


@runtime_checkable
class Backend(Protocol):
    """An offload target's implementation (see the module docstring)."""

    #: ``"local"``, ``"ssh"`` or ``"batch"``.
    kind: ClassVar[str]
    #: Infrastructure retries per attempt (lost worker, host, reclaim).
    retries: int
    #: Whether a submitted attempt outlives this process and can be found
    #: again by its handle after a crash (Batch jobs: yes; workers: no).
    reattachable: ClassVar[bool]

    async def open(self, context: BackendContext) -> None: ...

    async def submit(self, payload: Payload, hooks: AttemptHooks) -> Handle: ...

    async def wait(self, handle: Handle) -> Outcome: ...

    async def cancel(self, handle: Handle) -> None: ...

    async def reattach(self, handle: Handle) -> Handle | None: ...

    async def aclose(self) -> None: ...

    def capacity(self) -> int:
        """How many attempts the target takes at once, once open: the engine submits no more.

        Those that run at once (workers x concurrency), plus any a backend
        queues on its workers ahead of time (``offload.Local`` pipelines).
        """
        ...

    def unfit(self, cpu: float, gpu: int) -> str | None:
        """Why no worker of this target can ever run an attempt needing these, or None."""
        ...


@runtime_checkable
class GangBackend(Backend, Protocol):
    """A backend that also runs gangs (``nodes=N``; see the module docstring)."""

    async def submit_gang(self, payload: Payload, gang: Gang, hooks: AttemptHooks) -> Handle: ...

    def gang_unfit(self, gang: Gang, cpu: float, gpu: int) -> str | None:
        """Why this target can never place ``gang`` (each rank needing these), or None."""
        ...


def describe_target(target: Any) -> str:
    """A target for messages: its name, or its type."""
    return target if isinstance(target, str) else type(target).__qualname__
