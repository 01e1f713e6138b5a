"""One gang attempt over worker connections: N ranks, started together, failing fast as one.

Shared by the backends whose ranks run in ``python -m offload.worker``
processes they talk to (``offload.Local``, SSH).  The backend places the
ranks (one worker connection each, used by no other attempt while the
gang runs) and says where rank 0 listens; :class:`GangAttempt` does the
rest:

- every rank gets the same payload with its own :class:`~engine.Cluster`
  (rank 0 alone gets the traces recorded before, and reports new ones:
  the ranks run the same code, and rank 0's checkpoints stand for the
  gang);
- each rank's output comes back with its rank;
- the first rank that fails (raises, times out) or is lost (its worker
  dies, its host goes) stops every other rank at once (``stop_ranks``:
  SIGKILL of each worker's process group), so that no rank waits out a
  rendezvous timeout for a peer that is gone;
- the outcome is rank 0's when every rank succeeded, else the failing
  rank's, with ``rank`` set; a lost rank is the whole gang's
  infrastructure failure (its ``WorkerLost``/``HostLost``, naming the
  rank), which the engine retries as one attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, Any

import msgspec

from engine import OffloadError
from engine.extend import Cluster, Handle, InfrastructureError, Outcome, Payload, Start

from ._worker_client import WorkerClient
from ._worker_client import _Attempt as Attempt

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from engine.extend import AttemptHooks, Gang

__all__ = ["GangAttempt", "RankHooks", "free_port", "gang_handle"]


class RankHooks:
    """The engine's hooks as one rank sees them: output marked with the rank, traces from rank 0 only."""

    __slots__ = ("hooks", "rank")

    def __init__(self, hooks: AttemptHooks, rank: int) -> None:
        self.hooks = hooks
        self.rank = rank

    def log(self, stream: str, text: str, rank: int | None = None) -> None:
        self.hooks.log(stream, text, self.rank)

    def trace(self, key: str, name: str, kind: str, data: bytes) -> None:
        if self.rank == 0:
            self.hooks.trace(key, name, kind, data)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on this machine now, for a gang's rank 0 to listen on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def gang_handle(backend: str, serial: int, places: Sequence[str]) -> Handle:
    """The handle of a gang: ``gang:N``, rank 0's place as ``where``, and every rank's."""
    return Handle(backend, f"gang:{serial}", places[0], tuple(places))


class GangAttempt:
    """A gang's ranks running on their workers, and the task that waits for them all.

    ``stop_ranks`` ends every rank now (SIGKILL of their process groups)
    and waits until their workers are reaped; ``release`` is called once
    the gang has ended well, to hand the workers back (or stop them).
    """

    def __init__(
        self,
        handle: Handle,
        gang: Gang,
        workers: Sequence[WorkerClient],
        stop_ranks: Callable[[str], Awaitable[None]],
        release: Callable[[], Awaitable[None]],
    ) -> None:
        self.handle = handle
        self.gang = gang
        self.workers = list(workers)
        self.attempts: list[Attempt] = []
        self._stop_ranks = stop_ranks
        self._release = release
        self._outcome: asyncio.Task[Outcome] | None = None
        #: Why the gang was stopped early (a rank failed, it was cancelled).
        self.stopped: str | None = None

    async def start(
        self,
        payload: Payload,
        clusters: Sequence[Cluster],
        hooks: AttemptHooks,
        rank_env: Sequence[dict[str, str]] | None = None,
    ) -> None:
        """Send every rank its Start, all at once; the gang is running when this returns.

        ``rank_env``: variables for each rank beyond the payload's (the
        GPUs a backend gave it).
        """
        for rank, (worker, cluster) in enumerate(zip(self.workers, clusters, strict=True)):
            n = next(worker.serial)
            env = {**payload.env, **rank_env[rank]} if rank_env else payload.env
            traces = payload.traces if rank == 0 else {}
            mine = msgspec.structs.replace(payload, cluster=cluster, env=env, traces=traces)
            attempt = Attempt(n, mine, RankHooks(hooks, rank), self.handle, worker)
            # Registered before the send: a worker that dies from here on
            # fails this rank through its reader (WorkerClient.lost).
            worker.in_flight[n] = attempt
            self.attempts.append(attempt)
        await asyncio.gather(*(self._send(a) for a in self.attempts))
        self._outcome = asyncio.get_running_loop().create_task(
            self._watch(), name=f"shoal-gang-{self.handle.id}"
        )

    @staticmethod
    async def _send(attempt: Attempt) -> None:
        with contextlib.suppress(ConnectionError):
            # A worker gone meanwhile fails its rank with WorkerLost, in _watch().
            await attempt.worker.frames.send(Start(attempt.n, attempt.payload))

    def done(self) -> bool:
        """Whether the gang's outcome is known (taken by ``wait``)."""
        return self._outcome is not None and self._outcome.done()

    async def wait(self) -> Outcome:
        """The gang's outcome (see the module docstring); shielded, like a single attempt's wait."""
        if self._outcome is None:
            raise OffloadError(f"gang {self.handle.id} was waited for before it started")
        return await asyncio.shield(self._outcome)

    async def cancel(self) -> None:
        """Stop every rank (the engine cancelled the action, or it timed out)."""
        await self._stop("the gang was cancelled")
        if self._outcome is not None:
            self._outcome.cancel()
            with contextlib.suppress(BaseException):
                await self._outcome

    async def _stop(self, why: str) -> None:
        if self.stopped is None:
            self.stopped = why
            await self._stop_ranks(why)

    async def _watch(self) -> Outcome:
        nodes = len(self.attempts)
        places = self.handle.ranks
        pending: dict[asyncio.Future[Outcome], int] = {a.future: rank for rank, a in enumerate(self.attempts)}
        first: Outcome | None = None
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # Ranks that ended together: the lowest failing one is reported.
            for future in sorted(done, key=pending.__getitem__):
                rank = pending.pop(future)
                error = None if future.cancelled() else future.exception()
                if future.cancelled() or error is not None:
                    await self._stop(f"rank {rank} of the gang was lost")
                    raise _rank_lost(error, rank, nodes, places[rank])
                outcome = future.result()
                if not outcome.ok:
                    await self._stop(f"rank {rank} of the gang failed")
                    return msgspec.structs.replace(outcome, rank=rank, ranks=list(places))
                if rank == 0:
                    first = outcome
        assert first is not None
        await self._release()
        return msgspec.structs.replace(first, rank=0, ranks=list(places))


def _rank_lost(error: BaseException | None, rank: int, nodes: int, where: str) -> BaseException:
    """The infrastructure failure of one rank, as the whole gang's, naming the rank."""
    if isinstance(error, InfrastructureError):
        lost: Any = type(error)(f"rank {rank} of {nodes} ({where}): {error}")
        return lost  # type: ignore[no-any-return]
    if error is None:
        return OffloadError(f"rank {rank} of {nodes} ({where}) was cancelled under the gang")
    return error
