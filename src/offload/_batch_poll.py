"""The poller of ``offload.Batch``: one ``describe_jobs`` watcher per opened backend.

Each round asks ``describe_jobs`` about at most :data:`DESCRIBE_LIMIT` job
ids per call: plain jobs, and the *parents* of array jobs, whose status
summary says when children have ended; only then are the ended children
listed (``list_jobs(arrayJobId=..., jobStatus=...)``).  The interval
starts at ``interval`` and grows by half while nothing changes, up to 4x;
each call is retried by the backend's own ``call`` (throttling, 5xx), and
a longer outage fails the waits only after :data:`POLL_FAILURES` rounds
in a row.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, TypeVar

from engine import OffloadError
from engine.extend import HostLost

from ._batch_jobs import Watch

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["DESCRIBE_LIMIT", "POLL_FAILURES", "TERMINAL", "JobPoller"]

T = TypeVar("T")

#: ``describe_jobs`` takes at most this many job ids per call.
DESCRIBE_LIMIT: Final = 100
#: Poll rounds failing in a row (each call retried by the backend) before the waits fail.
POLL_FAILURES: Final = 5
TERMINAL: Final = frozenset({"SUCCEEDED", "FAILED"})


class JobPoller:
    """Watches the jobs someone waits for, and settles each wait with the job's description.

    ``call(what, fn)`` is the backend's AWS call (retried, errors mapped),
    ``client()`` its Batch client, ``live`` the set of job ids it has
    submitted and not seen end (shared with the backend: a job seen ended
    leaves it).
    """

    def __init__(
        self,
        *,
        call: Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]],
        client: Callable[[], Any],
        queue: str,
        interval: float,
        sleep: Callable[[float], Awaitable[None]],
        live: set[str],
    ) -> None:
        self._call = call
        self._client = client
        self._queue = queue
        self._interval = interval
        self._sleep = sleep
        self._live = live
        # Invariant: _watched holds the waiters of the jobs someone waits
        # for and that have not been seen ended.
        self.watched: dict[str, Watch] = {}
        # Summaries of array parents seen by the last round: (succeeded, failed).
        # A child counted there has been listed; those listed before anyone
        # waited for them are kept in _ended, since the counts will not
        # grow again for them.
        self._summaries: dict[str, tuple[int, int]] = {}
        self._ended: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        # Set when a job is first watched: the next round comes at the base interval.
        self._fresh = False
        #: Poll rounds made since the backend opened (what the benchmark divides calls by).
        self.rounds = 0

    def watch(self, job_id: str, nodes: int = 0) -> Watch:
        """The wait for ``job_id`` (one per job), polling from now on.

        ``nodes``: the job is a multi-node job of that many nodes, whose
        node jobs (``JOBID#i``) are asked about too while it runs.
        """
        watch = self.watched.get(job_id)
        if watch is None:
            watch = self.watched[job_id] = Watch(job_id, asyncio.get_running_loop().create_future(), nodes)
            ended = self._ended.pop(job_id, None)
            if ended is not None:
                self._settle(job_id, ended)
                return watch
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())
        self._fresh = True
        return watch

    def forget(self, job_id: str) -> None:
        """Stop waiting for ``job_id`` (it is being terminated): its wait is cancelled."""
        watch = self.watched.pop(job_id, None)
        if watch is not None and not watch.future.done():
            watch.future.cancel()

    async def stop(self) -> None:
        """Stop polling (the backend is closing)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def close(self, error: Callable[[str], BaseException]) -> None:
        """Fail every wait still open, with ``error(job_id)``."""
        for watch in self.watched.values():
            if not watch.future.done():
                watch.future.set_exception(error(watch.job_id))
                watch.future.exception()  # retrieved: nobody may wait any more
        self.watched.clear()

    async def _poll(self) -> None:
        interval = self._interval
        failed = 0
        while self.watched:
            self._fresh = False
            self.rounds += 1
            try:
                changed = await self._poll_round()
            except OffloadError as exc:
                # Each call was already retried; a longer outage fails the
                # waits only after POLL_FAILURES rounds in a row.
                failed += 1
                if failed >= POLL_FAILURES:
                    self._fail_watched(exc)
                    return
                changed = False
            except Exception as exc:  # never leave a wait hanging on a dead poller
                self._fail_watched(OffloadError(f"polling job queue {self._queue!r} failed: {type(exc).__name__}: {exc}"))
                raise
            else:
                failed = 0
            if changed or self._fresh:
                interval = self._interval
            else:
                interval = min(interval * 1.5, 4 * self._interval)
            if not self.watched:
                break
            await self._sleep(interval)

    def _fail_watched(self, error: BaseException) -> None:
        for job_id in list(self.watched):
            watch = self.watched.pop(job_id)
            if not watch.future.done():
                watch.future.set_exception(error)

    async def _poll_round(self) -> bool:
        """Ask about every watched job once; settle those that ended. Whether any did."""
        plain = [j for j in self.watched if ":" not in j]
        parents = sorted({j.split(":", 1)[0] for j in self.watched if ":" in j})
        # The node jobs of multi-node jobs: a node that failed while its
        # job runs on is a rank lost without an outcome (its job would run
        # until the main node gave up waiting for it).
        nodes = [f"{j}#{i}" for j in plain for i in range(self.watched[j].nodes)]
        ended = 0
        described = await self.describe(plain + parents + nodes, "poll jobs")
        for job_id in plain:
            job = described.get(job_id)
            if job is None:
                self._settle(job_id, HostLost(f"AWS Batch job {job_id} in job queue {self._queue!r} is gone: AWS no longer knows it"))
                ended += 1
            elif job.get("status") in TERMINAL:
                self._settle(job_id, job)
                ended += 1
            elif (lost := self._lost_node(job_id, described)) is not None:
                self.watched[job_id].lost = lost
                self._settle(job_id, job)
                ended += 1
        for parent in parents:
            array = described.get(parent)
            children = [j for j in self.watched if j.startswith(parent + ":")]
            if array is None:
                for child_id in children:
                    self._settle(child_id, HostLost(f"AWS Batch array job {parent} in job queue {self._queue!r} is gone: AWS no longer knows it"))
                ended += len(children)
                continue
            summary = (array.get("arrayProperties") or {}).get("statusSummary") or {}
            counts = (int(summary.get("SUCCEEDED", 0)), int(summary.get("FAILED", 0)))
            before = self._summaries.get(parent, (0, 0))
            self._summaries[parent] = counts
            for status, now, then in (("SUCCEEDED", counts[0], before[0]), ("FAILED", counts[1], before[1])):
                if now > then:
                    for child in await self._list_children(parent, status):
                        child_id = child["jobId"]
                        if child_id in self.watched:
                            self._settle(child_id, child)
                            ended += 1
                        elif child_id in self._live:
                            # Ended before anyone waited for it: kept for the wait to come.
                            self._ended[child_id] = child
        return ended > 0

    def _lost_node(self, job_id: str, described: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """The first node job of multi-node job ``job_id`` that failed, if one did."""
        for index in range(self.watched[job_id].nodes):
            node = described.get(f"{job_id}#{index}")
            if node is not None and node.get("status") == "FAILED":
                return node
        return None

    async def describe(self, job_ids: list[str], what: str) -> dict[str, dict[str, Any]]:
        """What ``describe_jobs`` says of these jobs, by job id (a job AWS does not know is absent)."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(job_ids), DESCRIBE_LIMIT):
            ids = job_ids[start : start + DESCRIBE_LIMIT]
            answer = await self._call(
                f"{what} ({len(ids)} job(s) of job queue {self._queue!r})",
                lambda ids=ids: self._client().describe_jobs(jobs=ids),  # type: ignore[misc]
            )
            for job in answer.get("jobs", ()):
                found[job["jobId"]] = job
        return found

    async def _list_children(self, parent: str, status: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            request: dict[str, Any] = {"arrayJobId": parent, "jobStatus": status, "maxResults": 1000}
            if token:
                request["nextToken"] = token
            answer = await self._call(
                f"list the {status.lower()} children of array job {parent}",
                lambda request=request: self._client().list_jobs(**request),  # type: ignore[misc]
            )
            found.extend(answer.get("jobSummaryList", ()))
            token = answer.get("nextToken")
            if not token:
                return found

    def _settle(self, job_id: str, result: dict[str, Any] | BaseException) -> None:
        self._live.discard(job_id)
        watch = self.watched.pop(job_id, None)
        if watch is None or watch.future.done():
            return
        if isinstance(result, BaseException):
            watch.future.set_exception(result)
        else:
            watch.future.set_result(result)
