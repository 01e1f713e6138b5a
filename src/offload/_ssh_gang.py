"""Gangs on ``offload.SSH``: N ranks placed over the hosts all at once or not at all, each in a fresh worker.

Places (gang admission): a rank takes one of its host's *rank places*
(``ranks_per_host``: the task's, else the target's, default 1; the most
gang ranks on one host at once, shared by every gang of the target) and
the CPUs and GPUs its ``Resources`` ask for, out of the same slots that
single attempts hold.  A gang takes all N places in one step, with no
await in between, or none; gangs that cannot be placed now wait, first
come first served (only the first in line takes places); one that the
configured hosts can never hold is refused when the target opens
(:meth:`Gangs.unfit`, a ``ResourceError`` from the engine).  Only hosts
that are connected and probed get ranks: a lost host waits out its
backoff first.  Hosts are filled in the target's order, so the ranks on
one host are consecutive (local ranks 0..k-1) and rank 0's host is the
first with room.

Start: N ``python -m offload.worker`` processes that have served nothing
(gang ranks always get processes of their own; ``workers`` governs single
attempts): spares started on each host after the previous gang ended (as
many as the most ranks a gang has had there), else fresh ones started at
once over the hosts' existing connections, together with the code
bundle to each host and a short command on rank 0's host that finds a
free port there (``master_port``); ``master_addr`` is rank 0's host as
the target names it, the address the other hosts reach it at.

End: :class:`~offload._gang.GangAttempt` watches the ranks.  A rank that
fails or dies has every other rank's process group killed at once; a
host whose connection is lost fails its ranks with ``HostLost`` at once
(:meth:`Gangs.host_lost`, called by the link's loss report), which stops
the others the same way and has the engine retry the gang on the hosts
that are up.  What ran on the lost host is killed when its link connects
again, or when the target is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shlex
from typing import TYPE_CHECKING, Any, Final

from engine import OffloadError
from engine.extend import Cluster, HostLost, SubmitFailed, WorkerLost

from ._local import SHUTDOWN_GRACE

if TYPE_CHECKING:
    from collections.abc import Sequence

    from engine.extend import AttemptHooks, Gang, Handle, Outcome, Payload

    from ._gang import GangAttempt
    from ._ssh import SSH
    from ._ssh_link import _Link
    from ._ssh_workers import RemoteWorker

__all__ = ["Gangs"]

#: Run by rank 0's host's interpreter: a TCP port free on every address there now.
_FREE_PORT: Final = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
#: Slack for CPU counts summed from fractions (0.1 + 0.2 ...).
_EPSILON: Final = 1e-9


class _Places:
    """What one gang holds on the hosts: a link and its GPUs per rank; given back once."""

    def __init__(self, gangs: Gangs, ranks: list[tuple[_Link, list[int]]], cpu: float) -> None:
        self.gangs = gangs
        self.ranks = ranks
        self.cpu = cpu
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        for link, gpus in self.ranks:
            self.gangs.ranks_on[link] -= 1
            self.gangs.target._release(link, self.cpu, gpus)


class Gangs:
    """The gangs of one ``offload.SSH`` target: their admission, start, and the ranks they run."""

    def __init__(self, target: SSH) -> None:
        self.target = target
        # Invariant: ``attempts`` holds every gang started whose outcome has
        # not been taken by ``wait`` or dropped by ``cancel``; its workers
        # are its own, in no link's ``workers``.
        self.attempts: dict[str, GangAttempt] = {}
        # Invariant: ``ranks_on[link]`` counts the rank places held on the
        # link's host by gangs placed and not yet ended (never above the
        # largest ranks_per_host asked for).
        self.ranks_on: dict[_Link, int] = {}
        # Invariant: ``workers_on[link]`` are the rank workers of running
        # gangs on the link's host (so that a lost host fails them at once).
        self.workers_on: dict[_Link, list[RemoteWorker]] = {}
        # Tickets of the gangs waiting for places, in the order they asked:
        # only the first in line takes places, so a big gang is not starved
        # by small ones that keep fitting.
        self._line: list[int] = []
        self._tickets = itertools.count()
        self._serial = itertools.count(1)
        # Invariant: ``spares[link]`` are workers started on the link's host
        # that have served nothing, kept for the ranks of the next gang
        # there; ``wanted[link]`` is the most ranks a gang has had on that
        # host (none until a gang has run).  Made up again in the background
        # (``_refill``) once a gang has ended.
        self.spares: dict[_Link, list[RemoteWorker]] = {}
        self.wanted: dict[_Link, int] = {}
        self._refill: asyncio.Task[None] | None = None

    # -- places ----------------------------------------------------------------

    def _per_host(self, gang: Gang) -> int:
        return gang.ranks_per_host or self.target.ranks_per_host

    def _room(self, link: _Link, per_host: int, cpu: float, gpu: int, *, now: bool) -> int:
        """How many ranks the link's host takes: free now (``now``), or when nothing else runs."""
        cpus, gpus = self.target._slots_of(link)
        room = per_host - (self.ranks_on.get(link, 0) if now else 0)
        if cpu > 0:
            free = cpus - (link.cpu_held if now else 0.0)
            room = min(room, int((free + _EPSILON) // cpu))
        if gpu > 0:
            room = min(room, (gpus - (len(link.gpus_held) if now else 0)) // gpu)
        return max(0, room)

    def unfit(self, gang: Gang, cpu: float, gpu: int) -> str | None:
        """Why the target's hosts can never hold ``gang`` (each rank needing these), or None.

        A host whose CPUs or GPUs are not known yet (down since the open,
        no ``Host(cpus=, gpus=)``) is counted as holding ``ranks_per_host``.
        """
        from ._ssh_link import _Link

        target = self.target
        per_host = self._per_host(gang)
        links = target._links or [_Link(target, h, lambda: 0.0) for h in target.hosts]
        total = 0
        said: list[str] = []
        for link in links:
            host, facts = link.host, link.facts
            known = facts is not None or ((cpu <= 0 or host.cpus is not None) and (gpu <= 0 or host.gpus is not None))
            room = self._room(link, per_host, cpu, gpu, now=False) if known else per_host
            total += room
            cpus, gpus = target._slots_of(link)
            probed = facts is not None or host.cpus is not None or host.gpus is not None
            slots = f"{cpus} CPUs and {gpus} GPUs" if probed else "not probed yet"
            said.append(f"{host} holds {room} ({slots})")
        if total >= gang.nodes:
            return None
        ask = "".join(
            part for part, wanted in ((f", {cpu:g} CPUs", cpu > 0), (f", {gpu} GPUs", gpu > 0)) if wanted
        )
        return (
            f"it needs {gang.nodes} rank places (at most ranks_per_host={per_host} per host{ask} per "
            f"rank) and the {len(links)} hosts hold {total}: " + "; ".join(said)
        )

    def _take(self, gang: Gang, cpu: float, gpu: int) -> _Places | None:
        """Every rank's place on the connected hosts, held now; None (nothing held) if they do not all fit."""
        target = self.target
        per_host = self._per_host(gang)
        picked: list[_Link] = []
        for link in target._links:
            if not _ready(link):
                continue
            room = min(gang.nodes - len(picked), self._room(link, per_host, cpu, gpu, now=True))
            picked += [link] * room
            if len(picked) == gang.nodes:
                break
        if len(picked) < gang.nodes:
            return None
        ranks: list[tuple[_Link, list[int]]] = []
        for link in picked:
            self.ranks_on[link] = self.ranks_on.get(link, 0) + 1
            ranks.append((link, target._hold(link, cpu, gpu)))
        return _Places(self, ranks, cpu)

    async def _admit(self, gang: Gang, cpu: float, gpu: int) -> _Places:
        """Wait (in line) until every rank has a place, and hold them all."""
        target = self.target
        generation = target._generation
        ticket = next(self._tickets)
        self._line.append(ticket)
        try:
            while True:
                if generation != target._generation or not target._links:
                    raise OffloadError(
                        f"{target!r} was closed while a gang waited for its places; submit it again"
                    )
                if self._line[0] == ticket:
                    places = self._take(gang, cpu, gpu)
                    if places is not None:
                        return places
                connected = False
                for link in target._links:
                    if _ready(link):
                        connected = True
                    elif link._conn is None and link.up:
                        target._reconnect(link)
                await target._await_room(connected, f" for a gang of {gang.nodes}")
        finally:
            self._line.remove(ticket)
            target._wake()  # the next gang in line looks again

    # -- start -----------------------------------------------------------------

    async def submit(self, payload: Payload, gang: Gang, hooks: AttemptHooks) -> Handle:
        """Place the gang's ranks (waiting for room), start a fresh worker for each, send each its rank."""
        from ._gang import GangAttempt, gang_handle

        places = await self._admit(gang, payload.cpu, payload.gpu)
        for link, count in _counts(places).items():
            self.wanted[link] = max(self.wanted.get(link, 0), count)
        try:
            refill = self._refill
            if refill is not None and not refill.done():
                # Spares on their way are ready sooner than workers started now.
                await asyncio.shield(refill)
            workers, port = await self._start(payload, places)
        except BaseException:
            places.release()
            raise
        for worker in workers:
            self.workers_on.setdefault(worker.link, []).append(worker)
        handle = gang_handle("ssh", next(self._serial), [f"{w.hello.hostname}:{w.pid}" for w in workers])
        rank0 = places.ranks[0][0].host.name
        clusters = Cluster.layout([link.host.name for link, _ in places.ranks], rank0, port)
        rank_env = [
            {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)} if gpus else {} for _, gpus in places.ranks
        ]

        def forget() -> None:
            for worker in workers:
                on = self.workers_on.get(worker.link, [])
                if worker in on:
                    on.remove(worker)
            places.release()
            self._make_spares()

        async def stop_ranks(why: str) -> None:
            await asyncio.gather(*(w.kill(why) for w in workers), return_exceptions=True)
            forget()

        async def release() -> None:
            await asyncio.gather(*(w.stop(SHUTDOWN_GRACE, "its gang ended") for w in workers), return_exceptions=True)
            forget()

        attempt = GangAttempt(handle, gang, workers, stop_ranks, release)
        self.attempts[handle.id] = attempt
        await attempt.start(payload, clusters, hooks, rank_env)
        return handle

    async def _start(self, payload: Payload, places: _Places) -> tuple[list[RemoteWorker], int]:
        """Every rank's worker, a free port on rank 0's host, the bundle on each host: all at once.

        All or none: when one of them fails, the workers that did start
        are killed and the first error is raised (a lost host's
        ``HostLost`` is retried by the engine).
        """
        from ._ssh_workers import start_worker

        target = self.target
        context = target._context
        generation = target._generation
        copies = target._copies
        env, args = copies.worker_env(), copies.worker_args()
        links = [link for link, _ in places.ranks]
        starts: list[asyncio.Future[RemoteWorker]] = []
        spares: list[RemoteWorker | None] = []
        for link in links:
            spare = self._spare(link)
            spares.append(spare)
            if spare is None:
                starts.append(asyncio.ensure_future(start_worker(target, link, env, args)))
            else:
                ready: asyncio.Future[RemoteWorker] = asyncio.get_running_loop().create_future()
                ready.set_result(spare)
                starts.append(ready)
        # Rank 0's port: asked of its worker when that one is already up (a
        # round trip), else found by a short command while the workers start.
        first = spares[0]
        port = asyncio.ensure_future(first.free_port() if first is not None else self._free_port(links[0]))
        others: list[asyncio.Future[Any]] = [port]
        hosts = list(dict.fromkeys(links))
        if payload.bundle is not None and context is not None and context.bundle_path is not None:
            path = context.bundle_path(payload.bundle)
            others += [asyncio.ensure_future(link.bundle(payload.bundle, path)) for link in hosts]
        # The local store's blobs the arguments name go to every host of the gang.
        blobs = copies.needed(payload)
        if blobs:
            others += [asyncio.ensure_future(copies.send(link, blobs)) for link in hosts]
        everything: list[asyncio.Future[Any]] = [*starts, *others]
        try:
            results = await asyncio.gather(*everything, return_exceptions=True)
        except asyncio.CancelledError:
            for future in everything:
                future.cancel()
            await asyncio.gather(*everything, return_exceptions=True)
            await _kill_started(starts, "its gang was cancelled as it started")
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors and generation != target._generation:
            errors = [OffloadError(f"{target!r} was closed while a gang started; submit it again")]
        if not errors:
            workers = [s.result() for s in starts]
            moved = [w for w in workers if w.link._conn is not w.conn]
            # A worker that ended while the others started would never
            # answer its rank (its reader is gone): the gang starts again.
            ended = [w for w in workers if w.reader is None or w.reader.done()]
            if moved:
                errors = [HostLost(f"host {moved[0].link.host} was lost while a rank of the gang started there")]
            elif ended:
                errors = [WorkerLost(f"{ended[0].what} ended while the other ranks of its gang started")]
        if errors:
            await _kill_started(starts, "its gang could not start")
            error = next((e for e in errors if not isinstance(e, asyncio.CancelledError)), errors[0])
            raise error
        return workers, port.result()

    async def _free_port(self, link: _Link) -> int:
        python = self.target.python
        done = await link.run(f"{shlex.quote(python)} -c {shlex.quote(_FREE_PORT)}")
        text = done.stdout.strip()
        if done.exit_status != 0 or not text.isdigit():
            raise SubmitFailed(
                f"host {link.host} did not give a free port for rank 0 of a gang ({python} said "
                f"{' '.join((done.stderr or done.stdout).split()) or 'nothing'}, exit status {done.exit_status})"
            )
        return int(text)

    # -- spares ----------------------------------------------------------------

    def _spare(self, link: _Link) -> RemoteWorker | None:
        """A spare on ``link``'s host that is still up on its current connection, taken."""
        found = self.spares.get(link, [])
        while found:
            worker = found.pop()
            if worker.conn is link._conn and worker.reader is not None and not worker.reader.done():
                return worker
        return None

    def drop_spare(self, worker: RemoteWorker) -> None:
        """A worker ended: it is no spare any more."""
        with contextlib.suppress(ValueError):
            self.spares.get(worker.link, []).remove(worker)

    def _make_spares(self) -> None:
        if self._refill is None or self._refill.done():
            self._refill = asyncio.get_running_loop().create_task(self._fill(), name="shoal-ssh-spares")

    async def _fill(self) -> None:
        """Start on each host the spares that the largest gang there would want, all at once."""
        from ._ssh_workers import start_worker

        target = self.target
        generation = target._generation
        env, args = target._copies.worker_env(), target._copies.worker_args()
        wanted = [
            link
            for link, want in self.wanted.items()
            if _ready(link)
            for _ in range(want - len(self.spares.get(link, [])))
        ]
        started = await asyncio.gather(*(start_worker(target, link, env, args) for link in wanted), return_exceptions=True)
        for worker in started:
            if isinstance(worker, BaseException):
                continue  # the next gang starts its workers itself, and says why they fail
            if generation != target._generation or worker.conn is not worker.link._conn:
                await worker.stop(0, "offload.SSH was closed, or the host was lost, as it started")
            else:
                self.spares.setdefault(worker.link, []).append(worker)

    # -- the gang's life -------------------------------------------------------

    async def wait(self, handle: Handle) -> Outcome:
        attempt = self.attempts.get(handle.id)
        if attempt is None:
            raise OffloadError(
                f"offload.SSH has no gang {handle.id} (it finished, was cancelled, or ran under "
                f"another backend object): submit it again"
            )
        try:
            return await attempt.wait()
        finally:
            if attempt.done():
                self.attempts.pop(handle.id, None)

    async def cancel(self, handle: Handle) -> None:
        attempt = self.attempts.pop(handle.id, None)
        if attempt is not None:
            await attempt.cancel()

    def host_lost(self, link: _Link, why: str) -> None:
        """A host's connection went: its ranks fail with ``HostLost`` now (their gangs stop the others)."""
        for worker in list(self.workers_on.get(link, [])):

            def error(_: object, w: RemoteWorker = worker) -> OffloadError:
                return HostLost(
                    f"the connection to host {link.host} was lost ({why}) under {w.what}; the gang "
                    f"is retried on the hosts that are up"
                )

            worker.fail_all(error)

    async def aclose(self) -> None:
        """Stop every gang's ranks and the spares (the target is closing)."""
        attempts, self.attempts = list(self.attempts.values()), {}
        refill, self._refill = self._refill, None
        if refill is not None:
            # Let spares that are starting finish (one start at most): the
            # closed generation has them stopped, and none is left half made.
            with contextlib.suppress(Exception):
                await refill
        spares = [w for found in self.spares.values() for w in found]
        self.spares, self.wanted = {}, {}
        await asyncio.gather(
            *(a.cancel() for a in attempts),
            *(w.stop(SHUTDOWN_GRACE, "offload.SSH was closed") for w in spares),
            return_exceptions=True,
        )


def _counts(places: _Places) -> dict[_Link, int]:
    """How many of a gang's ranks each host holds."""
    counts: dict[_Link, int] = {}
    for link, _ in places.ranks:
        counts[link] = counts.get(link, 0) + 1
    return counts


def _ready(link: _Link) -> bool:
    """Whether a host may get ranks now: connected, and probed over this connection."""
    return link._conn is not None and link.facts is not None and link._facts_of is link._conn


async def _kill_started(starts: Sequence[asyncio.Future[RemoteWorker]], why: str) -> None:
    started = [s.result() for s in starts if s.done() and not s.cancelled() and s.exception() is None]
    await asyncio.gather(*(w.kill(why) for w in started), return_exceptions=True)
