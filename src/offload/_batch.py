"""``offload.Batch``: attempts as AWS Batch jobs (aiobotocore), array jobs for fan-outs.

How an attempt travels (see :mod:`offload._batch_job` for the job's side):

- **Storage**: under ``storage`` (``s3://bucket/prefix``; default the
  engine's S3 blob store), in ``<prefix>/batch/``: code bundles and payload
  packs as content-addressed objects (a bundle is uploaded once per
  digest), results under ``results/<job id>``.  A local blob store and no
  ``storage=`` is a ``ConfigError``: jobs cannot read this machine.
- **Job definitions**: one per (image, vCPUs, memory, GPUs, python, job
  role), named ``shoal-<hash>``; found with ``describe_job_definitions`` or
  registered once, then remembered.  ``job_definition=`` uses an existing
  one, and resources then travel as ``resourceRequirements`` overrides.
- **Batched submits**: :meth:`Batch.submit` calls of the same task with the
  same resources, timeout, bundle and environment are gathered for
  :data:`GATHER_WINDOW` seconds after the first one, the window extended
  while more keep arriving (up to :data:`GATHER_MAX`): an ``engine.map`` or
  ``gather`` fan-out reaches ``submit`` over several loop turns, because
  each action is admitted and encoded first.  The gathered attempts go out
  as one array job per ``max_array_size`` (``arrayProperties.size``), a
  lone one as a plain job.  Each attempt's handle is ``JOBID:INDEX`` (an
  array child) or ``JOBID``.
- **Polling**: one poller per backend (:mod:`offload._batch_poll`).  Each round asks ``describe_jobs``
  about at most 100 job ids per call: plain jobs, and the *parents* of
  array jobs, whose status summary says when children have ended; only
  then are the ended children listed (``list_jobs(arrayJobId=...,
  jobStatus=...)``).  The interval starts at ``poll_interval`` and grows
  by half while nothing changes, up to 4x; throttling and 5xx answers are
  retried with backoff.
- **Failures**: a job that failed with a ``statusReason`` of a spot
  reclaim ("Host EC2 ... terminated") is :class:`~engine.extend.Reclaimed`,
  retried by the engine as an infrastructure failure.  A task's own
  exception is in the job's result (the job succeeds).  A job that failed
  without a result (out of memory, an image that cannot be pulled, a
  non-zero exit) is an :class:`~engine.OffloadError` with its status
  reason, exit code and the end of its CloudWatch log.
- **Logs**: what the attempt printed and logged comes back with its result
  and is delivered to the action's capture once the job ends; the same
  lines are in the job's CloudWatch Logs stream.
- **Cancel**: ``terminate_job`` of the attempt's own job id, so one
  cancelled item does not stop its siblings; when every unfinished child
  of an array job is cancelled at once, the parent is terminated instead
  (one call).  ``aclose()`` terminates every job this backend submitted
  and has not seen end.
- **Re-attach**: the engine commits each handle before it waits; after a
  crash, :meth:`Batch.reattach` looks the job up by that id: still queued
  or running, or succeeded, it is waited for (a succeeded job gives its
  result); gone or failed, it is submitted again.

- **Gangs** (``nodes=N``): one multi-node parallel job per attempt, see
  :mod:`offload._batch_gang` (and :mod:`offload._batch_node` for the
  nodes' side).

Every botocore/aiohttp error is mapped here to an ``OffloadError`` naming
the queue or the job; nothing else in shoal knows botocore.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

import msgspec

from engine import ConfigError, OffloadError
from engine.extend import Outcome, Reclaimed, SubmitFailed

from ._batch_jobs import Submit, definition, job_name, requirements_of
from ._batch_poll import JobPoller
from ._errors_map import (
    error_code,
    is_aws_error,
    is_retryable,
    map_batch_error,
    mapped_batch_errors,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from engine.extend import AttemptHooks, BackendContext, Gang, Handle, Payload

    from ._s3 import S3BlobStore

__all__ = ["GATHER_MAX", "GATHER_WINDOW", "Batch"]

T = TypeVar("T")

#: Seconds a first submit waits for others of its kind to join its array job.
GATHER_WINDOW: Final = 0.02
#: Longest a submit waits while more keep arriving.
GATHER_MAX: Final = 0.25
#: Attempts per AWS call when it is throttled or fails transiently, and the backoff.
CALL_ATTEMPTS: Final = 8
CALL_BACKOFF: Final = 0.1
CALL_MAX_DELAY: Final = 5.0
#: How many attempts may be in flight on the target at once (the queue, not
#: this process, decides how many run).
CAPACITY: Final = 100_000
#: CloudWatch Logs group of AWS Batch jobs.
LOG_GROUP: Final = "/aws/batch/job"
#: A spot reclaim, as AWS Batch words it: "Host EC2 (instance i-...) terminated."
RECLAIM = re.compile(r"^Host EC2\b.*\bterminated", re.IGNORECASE)


class Batch:
    """Run offloaded attempts as AWS Batch jobs in ``job_queue`` (see the module docstring).

    ``image`` (a job definition is registered for it) or ``job_definition``
    (an existing one) must be given.  ``python`` is the interpreter in the
    image, which must have shoal installed (the same version).
    ``region``/``endpoint_url`` default to the standard AWS configuration;
    ``retries`` bounds infrastructure retries (spot reclaims, failed
    submits) per attempt; ``env`` is set in every job; ``job_role_arn`` is
    the IAM role the jobs run as; ``master_port`` is where rank 0 of a gang
    listens on the main node of its multi-node job (``MASTER_PORT``).
    """

    kind: ClassVar[str] = "batch"
    reattachable: ClassVar[bool] = True

    def __init__(
        self,
        job_queue: str,
        *,
        image: str | None = None,
        job_definition: str | None = None,
        storage: str | None = None,
        python: str = "python",
        region: str | None = None,
        endpoint_url: str | None = None,
        array: bool = True,
        max_array_size: int = 10000,
        poll_interval: float = 5.0,
        retries: int = 3,
        job_role_arn: str | None = None,
        env: dict[str, str] | None = None,
        master_port: int = 29500,
    ) -> None:
        if not isinstance(job_queue, str) or not job_queue.strip():
            raise ConfigError(
                "offload.Batch needs a job_queue: the name or ARN of an AWS Batch job queue "
                "(offload.Batch('my-queue', image=...))"
            )
        if not image and not job_definition:
            raise ConfigError(
                f"offload.Batch({job_queue!r}) needs image= (a job definition is registered for "
                "it) or job_definition= (an existing one)"
            )
        if image and job_definition:
            raise ConfigError(
                f"offload.Batch({job_queue!r}) got both image= and job_definition=; the job "
                "definition names its own image: give one of them"
            )
        if storage is not None and not storage.startswith("s3://"):
            raise ConfigError(
                f"offload.Batch({job_queue!r}): storage={storage!r} is not an S3 URI; write "
                "s3://bucket/prefix"
            )
        if not 2 <= max_array_size <= 10_000:
            raise ConfigError(
                f"offload.Batch({job_queue!r}): max_array_size must be 2 to 10000 (AWS Batch's "
                f"limits on an array job), got {max_array_size}"
            )
        if not poll_interval > 0:
            raise ConfigError(f"offload.Batch({job_queue!r}): poll_interval must be > 0 seconds")
        if retries < 0:
            raise ConfigError(f"offload.Batch({job_queue!r}): retries must be >= 0")
        if isinstance(master_port, bool) or not isinstance(master_port, int) or not 1 <= master_port <= 65535:
            raise ConfigError(
                f"offload.Batch({job_queue!r}): master_port must be a TCP port, 1 to 65535 (rank 0 "
                f"of a gang listens on it on the main node), got {master_port!r}"
            )
        self.job_queue = job_queue
        self.image = image
        self.job_definition = job_definition
        self.storage = storage
        self.python = python
        self.region = region
        self.endpoint_url = endpoint_url
        self.array = array
        self.max_array_size = max_array_size
        self.poll_interval = poll_interval
        self.retries = retries
        self.job_role_arn = job_role_arn
        self.env = dict(env or {})
        self.master_port = master_port
        self._rng = random.Random()
        self._reset()

    def _reset(self) -> None:
        # Everything below belongs to one opening (one engine), and is
        # rebuilt by the next open().
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._stack: contextlib.AsyncExitStack | None = None
        self._batch: Any = None
        self._logs: Any = None
        self._store: S3BlobStore | None = None
        self._area = ""
        # Invariant: a digest is in _bundles once its upload has been
        # started (the future settles when it is stored): never uploaded twice.
        self._bundles: dict[str, asyncio.Future[None]] = {}
        # Job definition ARNs by (vcpus, memory MiB, gpus, nodes; 0: not a
        # multi-node one), found or registered once.
        self._definitions: dict[tuple[int, ...], asyncio.Future[str]] = {}
        # What describe_job_definitions said of job_definition= (at open).
        self._described: dict[str, Any] = {}
        # Invariant: each key's list holds the submits gathered for one
        # flush that has not started; the flush task pops it.
        self._gathering: dict[tuple[Any, ...], list[Submit]] = {}
        self._flushes: set[asyncio.Task[None]] = set()
        # Invariant: every job id submitted by this backend and not yet seen
        # ended is in _live (aclose terminates them); the poller holds the
        # waits of the ones someone waits for.
        self._live: set[str] = set()
        self._hooks: dict[str, AttemptHooks] = {}
        self._tasks: dict[str, str] = {}
        # Node counts of the multi-node jobs (gangs) among them, by job id.
        self._gangs: dict[str, int] = {}
        self._poller = JobPoller(
            call=self._call,
            client=lambda: self._batch,
            queue=self.job_queue,
            interval=self.poll_interval,
            sleep=lambda seconds: self._sleep(seconds),
            live=self._live,
        )
        self._bundle_path: Callable[[str], Any] | None = None
        self._cancels: set[str] = set()
        self._cancelling: asyncio.Task[None] | None = None
        self._opened = False

    @property
    def _rounds(self) -> int:
        """Poll rounds made since open() (what the benchmark divides calls by)."""
        return self._poller.rounds

    def __repr__(self) -> str:
        what = f"image={self.image!r}" if self.image else f"job_definition={self.job_definition!r}"
        return f"offload.Batch({self.job_queue!r}, {what})"

    # -- the backend protocol --------------------------------------------------

    def capacity(self) -> int:
        return CAPACITY

    def unfit(self, cpu: float, gpu: int) -> str | None:
        return None  # the queue's compute environments decide; AWS says so at submit

    async def __aenter__(self) -> Batch:
        from pathlib import Path

        from engine.extend import BackendContext

        await self.open(BackendContext(home=Path.cwd() / ".shoal" / "offload" / "batch"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self, context: BackendContext) -> None:
        if self._opened:
            raise OffloadError(
                f"{self!r} is already open in an engine; a backend object serves one engine at a "
                "time: close that engine first, or give this one its own offload.Batch"
            )
        self._reset()
        self._opened = True
        if context.sleep is not None:
            self._sleep = context.sleep
        self._bundle_path = context.bundle_path
        storage = self.storage or context.blob_store
        if not storage or not storage.startswith("s3://"):
            raise ConfigError(
                f"{self!r} needs an S3 location for payloads, results and code bundles, and the "
                f"engine's blob store is {storage or 'local'}: pass storage='s3://bucket/prefix' "
                "to offload.Batch, or give the engine an S3 blob store (blob_store='s3://...', "
                "SHOAL_BLOB_STORE, [tool.shoal] blob_store)"
            )
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        from ._s3 import S3BlobStore

        area = storage.rstrip("/") + "/batch"
        self._store = S3BlobStore(area, endpoint_url=self.endpoint_url, region_name=self.region, sleep=self._sleep)
        self._area = area
        config = AioConfig(retries={"total_max_attempts": 1}, max_pool_connections=32)
        session = get_session()
        stack = self._stack = contextlib.AsyncExitStack()
        with mapped_batch_errors(f"connect to AWS Batch for job queue {self.job_queue!r}"):
            try:
                self._batch = await stack.enter_async_context(
                    session.create_client("batch", region_name=self.region, endpoint_url=self.endpoint_url, config=config)
                )
                self._logs = await stack.enter_async_context(
                    session.create_client("logs", region_name=self.region, endpoint_url=self.endpoint_url, config=config)
                )
            except ValueError as exc:
                raise OffloadError(
                    f"cannot create an AWS Batch client for job queue {self.job_queue!r}: {exc}; "
                    "check region= and endpoint_url="
                ) from exc
        queues = await self._call(
            f"look up job queue {self.job_queue!r}",
            lambda: self._batch.describe_job_queues(jobQueues=[self.job_queue]),
        )
        found = [q for q in queues.get("jobQueues", ()) if q.get("jobQueueName") == self.job_queue or q.get("jobQueueArn") == self.job_queue]
        if not found:
            raise OffloadError(
                f"AWS Batch job queue {self.job_queue!r} does not exist in region "
                f"{self._batch.meta.region_name}; create it, or name an existing one in job_queue="
            )
        if self.job_definition is not None:
            defs = await self._call(
                f"look up job definition {self.job_definition!r}",
                lambda: self._batch.describe_job_definitions(jobDefinitions=[self.job_definition], status="ACTIVE"),
            )
            found_defs = defs.get("jobDefinitions") or []
            if found_defs:
                self._described = max(found_defs, key=lambda d: d.get("revision", 0))
            else:
                raise OffloadError(
                    f"AWS Batch job definition {self.job_definition!r} (for job queue "
                    f"{self.job_queue!r}) does not exist or is not ACTIVE; register it, or give "
                    "image= instead so that shoal registers one"
                )
        try:
            await self._store.exists("0" * 64)  # says which bucket is missing, if it is
        except Exception as exc:
            raise OffloadError(f"{self!r} cannot use its storage {area}: {exc}") from exc

    async def submit(self, payload: Payload, hooks: AttemptHooks) -> Handle:
        if self._batch is None:
            raise OffloadError(f"{self!r} is not open; it is opened by the engine that uses it")
        key = (
            payload.task,
            payload.fn,
            payload.cpu,
            payload.memory,
            payload.gpu,
            payload.timeout,
            payload.bundle,
            tuple(sorted(payload.env.items())),
        )
        submit = Submit(payload, hooks, asyncio.get_running_loop().create_future())
        waiting = self._gathering.get(key)
        if waiting is None:
            waiting = self._gathering[key] = []
            task = asyncio.get_running_loop().create_task(self._flush_later(key))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        waiting.append(submit)
        try:
            return await asyncio.shield(submit.future)
        except asyncio.CancelledError:
            submit.cancelled = True
            if submit.future.done() and not submit.future.cancelled() and submit.future.exception() is None:
                # Submitted as this was cancelled: it must not run on.
                await self.cancel(submit.future.result())
            raise

    async def wait(self, handle: Handle) -> Outcome:
        nodes = self._gangs.get(handle.id)
        if nodes is not None:
            from ._batch_gang import gang_outcome

            watch = self._poller.watch(handle.id, nodes)
            ended: dict[str, Any] = await asyncio.shield(watch.future)
            return await gang_outcome(self, handle, ended, watch.lost, nodes)
        watch = self._poller.watch(handle.id)
        job: dict[str, Any] = await asyncio.shield(watch.future)
        return await self._outcome(handle, job)

    async def cancel(self, handle: Handle) -> None:
        self._gangs.pop(handle.id, None)
        if handle.id not in self._live or self._batch is None:
            return
        self._cancels.add(handle.id)
        if self._cancelling is None or self._cancelling.done():
            self._cancelling = asyncio.get_running_loop().create_task(self._cancel_soon())
        await asyncio.shield(self._cancelling)

    async def reattach(self, handle: Handle) -> Handle | None:
        if self._batch is None:
            raise OffloadError(f"{self!r} is not open; it is opened by the engine that uses it")
        found = await self._poller.describe([handle.id], f"look up job {handle.id}")
        job = found.get(handle.id)
        if job is not None and job.get("nodeProperties"):
            # A gang's multi-node job: a failed one may hold a rank's outcome
            # (a task's exception fails the main node), so it is read too.
            nodes = int(job["nodeProperties"].get("numNodes") or 0)
            self._gangs[handle.id] = nodes
            self._live.add(handle.id)
            return msgspec.structs.replace(handle, ranks=tuple(f"{handle.id}#{i}" for i in range(nodes)))
        if job is None or job.get("status") == "FAILED":
            return None  # gone, or failed without a result: submitted again
        self._live.add(handle.id)
        return handle

    async def aclose(self) -> None:
        if not self._opened:
            return
        self._opened = False
        for task in list(self._flushes):
            task.cancel()
        await asyncio.gather(*self._flushes, return_exceptions=True)
        for submits in self._gathering.values():
            for submit in submits:
                if not submit.future.done():
                    submit.future.set_exception(OffloadError(f"{self!r} was closed before the job was submitted"))
        self._gathering.clear()
        await self._poller.stop()
        if self._live and self._batch is not None:
            # Nothing this engine submitted may run on after it.
            with contextlib.suppress(Exception):
                await self._terminate(sorted(self._live), "the shoal engine that submitted it closed")
        self._poller.close(lambda job_id: OffloadError(f"{self!r} was closed while job {job_id} ran"))
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.aclose()
        if self._stack is not None:
            with contextlib.suppress(Exception):
                await self._stack.aclose()
        self._batch = self._logs = self._stack = self._store = None

    # -- gangs (see _batch_gang) ------------------------------------------------

    def gang_unfit(self, gang: Gang, cpu: float, gpu: int) -> str | None:
        from ._batch_gang import gang_unfit

        return gang_unfit(gang)

    async def submit_gang(self, payload: Payload, gang: Gang, hooks: AttemptHooks) -> Handle:
        """Submit the gang's attempt as one multi-node parallel job of ``gang.nodes`` nodes."""
        if self._batch is None:
            raise OffloadError(f"{self!r} is not open; it is opened by the engine that uses it")
        from ._batch_gang import submit_gang

        submitting = asyncio.ensure_future(submit_gang(self, payload, gang.nodes, hooks))
        try:
            return await asyncio.shield(submitting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                # Submitted as this was cancelled: it must not run on.
                await self.cancel(await submitting)
            raise

    # -- AWS calls ------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], *, submit: bool = False) -> T:
        """``await fn()``, retried when throttled or failing transiently; errors mapped."""
        attempt = 1
        while True:
            try:
                return await fn()
            except Exception as exc:
                if not is_aws_error(exc):
                    raise
                if attempt < CALL_ATTEMPTS and is_retryable(exc):
                    delay = min(CALL_BACKOFF * 2.0 ** (attempt - 1), CALL_MAX_DELAY)
                    await self._sleep(delay * (0.5 + 0.5 * self._rng.random()))
                    attempt += 1
                    continue
                raise map_batch_error(exc, what, attempts=attempt, submit=submit) from exc

    # -- submitting -------------------------------------------------------------

    async def _flush_later(self, key: tuple[Any, ...]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        seen = 0
        while True:
            await asyncio.sleep(GATHER_WINDOW)
            count = len(self._gathering.get(key, ()))
            if count == seen or loop.time() - started >= GATHER_MAX:
                break
            seen = count
        submits = [s for s in self._gathering.pop(key, ()) if not s.cancelled]
        if not submits:
            return
        try:
            await self._submit_all(submits)
        except BaseException as exc:
            for submit in submits:
                if not submit.future.done():
                    submit.future.set_exception(exc if isinstance(exc, Exception) else OffloadError(f"submitting to {self.job_queue!r} was interrupted"))
            if not isinstance(exc, Exception):
                raise

    async def _submit_all(self, submits: list[Submit]) -> None:
        first = submits[0].payload
        if first.bundle is not None:
            await self._upload_bundle(first.bundle)
        definition = await self._definition_for(first)
        size = self.max_array_size if self.array else 1
        chunks = [submits[i : i + size] for i in range(0, len(submits), size)]
        await asyncio.gather(*(self._submit_chunk(chunk, definition) for chunk in chunks))

    async def _submit_chunk(self, chunk: list[Submit], definition: str) -> None:
        from ._batch_job import pack_payloads

        assert self._store is not None
        payloads = [s.payload for s in chunk]
        first = payloads[0]
        try:
            pack = await self._store.put_bytes(pack_payloads(payloads))
        except Exception as exc:
            error = SubmitFailed(
                f"cannot store the payload of task {first.task!r} for job queue {self.job_queue!r} "
                f"in {self._area}: {exc}"
            )
            for submit in chunk:
                submit.future.set_exception(error)
            return
        request: dict[str, Any] = {
            "jobName": job_name(first.task),
            "jobQueue": self.job_queue,
            "jobDefinition": definition,
            "containerOverrides": self._overrides(first, pack),
        }
        if len(chunk) > 1:
            request["arrayProperties"] = {"size": len(chunk)}
        if first.timeout is not None:
            # AWS stops the job by itself if this process dies (at least 60 s, as AWS requires).
            request["timeout"] = {"attemptDurationSeconds": max(60, math.ceil(first.timeout))}
        what = f"submit {len(chunk)} attempt(s) of task {first.task!r} to job queue {self.job_queue!r}"
        try:
            answer = await self._call(what, lambda: self._batch.submit_job(**request), submit=True)
        except OffloadError as exc:
            for submit in chunk:
                submit.future.set_exception(exc)
            return
        job_id: str = answer["jobId"]
        from engine.extend import Handle

        for index, submit in enumerate(chunk):
            child = f"{job_id}:{index}" if len(chunk) > 1 else job_id
            self._live.add(child)
            self._hooks[child] = submit.hooks
            self._tasks[child] = submit.payload.task
            submit.future.set_result(Handle("batch", child, where=child))
        cancelled = [f"{job_id}:{i}" if len(chunk) > 1 else job_id for i, s in enumerate(chunk) if s.cancelled]
        if cancelled:
            await self._terminate(cancelled, "cancelled while it was submitted")

    def _overrides(self, payload: Payload, pack: str, master_port: int | None = None) -> dict[str, Any]:
        """Container overrides of a job; with ``master_port``, of each node of a gang's job."""
        assert self._store is not None
        env = {**self.env, **payload.env}
        command = [self.python, "-m", "offload.worker", "--batch", self._area, "--pack", pack]
        if master_port is not None:
            command += ["--master-port", str(master_port)]
        overrides: dict[str, Any] = {"command": command}
        if env:
            overrides["environment"] = [{"name": k, "value": v} for k, v in sorted(env.items())]
        if self.job_definition is not None and master_port is None:
            # A gang's definition is registered with its resources (per rank).
            overrides["resourceRequirements"] = requirements_of(payload)
        return overrides

    async def _upload_bundle(self, digest: str) -> None:
        pending = self._bundles.get(digest)
        if pending is None:
            pending = self._bundles[digest] = asyncio.get_running_loop().create_future()
            try:
                assert self._store is not None and self._bundle_path is not None
                if not await self._store.exists(digest):
                    await self._store.put_file(self._bundle_path(digest))
            except Exception as exc:
                del self._bundles[digest]
                error = SubmitFailed(f"cannot upload code bundle {digest[:12]} to {self._area}: {exc}")
                pending.set_exception(error)
                pending.exception()
                raise error from exc
            pending.set_result(None)
        await asyncio.shield(pending)

    async def _definition_for(self, payload: Payload, nodes: int = 0) -> str:
        """The job definition for this payload's resources; ``nodes``: the multi-node one of a gang."""
        if self.job_definition is not None and not nodes:
            return self.job_definition
        requirements = requirements_of(payload)
        key = tuple(int(float(r["value"])) for r in requirements)
        while len(key) < 3:
            key = (*key, 0)
        key = (*key, nodes)
        found = self._definitions.get(key)
        if found is None:
            found = self._definitions[key] = asyncio.get_running_loop().create_future()
            try:
                arn = await self._find_or_register(requirements, nodes)
            except BaseException as exc:
                del self._definitions[key]
                found.set_exception(exc)
                found.exception()
                raise
            found.set_result(arn)
        return await asyncio.shield(found)

    async def _find_or_register(self, requirements: list[dict[str, str]], nodes: int = 0) -> str:
        if self.job_definition is not None:
            from ._batch_gang import container_of

            # A gang of an existing definition: its container, with each rank's resources.
            name = str(self._described.get("jobDefinitionArn") or self.job_definition)
            try:
                container = container_of(self._described)
            except ValueError as exc:
                raise OffloadError(f"{self!r} cannot run a gang: {exc}") from exc
            kept = [r for r in container.get("resourceRequirements") or () if r.get("type") not in ("VCPU", "MEMORY", "GPU")]
            container = {k: v for k, v in container.items() if k not in ("vcpus", "memory")}
            container["resourceRequirements"] = kept + requirements
        else:
            name, container = definition(self.image, requirements, self.python, self.job_role_arn, self.env)
        registration: dict[str, Any] = {"type": "container", "containerProperties": container}
        if nodes:
            from ._batch_gang import gang_definition

            name, node_properties = gang_definition(name, container, nodes)
            registration = {"type": "multinode", "nodeProperties": node_properties}
        existing = await self._call(
            f"look up job definition {name}",
            lambda: self._batch.describe_job_definitions(jobDefinitionName=name, status="ACTIVE"),
        )
        defs = existing.get("jobDefinitions") or []
        if defs:
            latest = max(defs, key=lambda d: d.get("revision", 0))
            return str(latest["jobDefinitionArn"])
        registered = await self._call(
            f"register job definition {name} (image {container.get('image')!r})",
            lambda: self._batch.register_job_definition(jobDefinitionName=name, **registration),
        )
        return str(registered["jobDefinitionArn"])

    # -- results ----------------------------------------------------------------

    async def _outcome(self, handle: Handle, job: dict[str, Any]) -> Outcome:
        from ._batch_job import decode_result, result_key

        assert self._store is not None
        store = self._store
        job_id = handle.id
        task = self._tasks.pop(job_id, None)
        hooks = self._hooks.pop(job_id, None)
        status = job.get("status")
        reason = str(job.get("statusReason") or "")
        if status == "FAILED" and RECLAIM.search(reason):
            raise Reclaimed(
                f"AWS Batch job {job_id} (job queue {self.job_queue!r}) was stopped by a spot "
                f"reclaim: {reason}; the attempt is retried"
            )
        key = result_key(store.prefix, job_id)
        data = await self._read_result(key)
        if data is not None:
            result = decode_result(data)
            if hooks is not None:
                for stream, text in result.logs:
                    hooks.log(stream, text)
                for trace in result.traces:
                    hooks.trace(*trace)
            outcome = result.outcome
            import msgspec

            return msgspec.structs.replace(outcome, where=job_id)
        container = job.get("container") or {}
        code = container.get("exitCode")
        tail = await self._log_tail(job_id, container.get("logStreamName"))
        what = f"task {task!r}" if task else "an attempt"
        if status == "SUCCEEDED":
            raise OffloadError(
                f"AWS Batch job {job_id} of {what} (job queue {self.job_queue!r}) succeeded but left "
                f"no result at s3://{store.bucket}/{key}; is shoal installed in the image with "
                f"python={self.python!r}?{tail}"
            )
        raise OffloadError(
            f"AWS Batch job {job_id} of {what} (job queue {self.job_queue!r}) failed without a "
            f"result: {reason or 'no reason given'}"
            + (f" (exit code {code})" if code is not None else "")
            + f"; check the image, the job's memory and its log stream{tail}"
        )

    async def _read_result(self, key: str) -> bytes | None:
        assert self._store is not None
        store = self._store

        async def get(client: Any) -> bytes | None:
            from botocore.exceptions import ClientError

            try:
                answer = await client.get_object(Bucket=store.bucket, Key=key)
            except ClientError as exc:
                code, status = error_code(exc)
                if status == 404 or code in ("NoSuchKey", "404"):
                    return None
                raise
            async with answer["Body"] as body:
                data: bytes = await body.read()
            return data

        return await store._call("read the result", f"s3://{store.bucket}/{key}", get)

    async def _log_tail(self, job_id: str, stream: str | None, lines: int = 20) -> str:
        """The end of a job's CloudWatch log, for an error message ("" when there is none)."""
        if self._logs is None:
            return ""
        if not stream:
            with contextlib.suppress(Exception):
                described = await self._poller.describe([job_id], f"look up job {job_id}")
                stream = ((described.get(job_id) or {}).get("container") or {}).get("logStreamName")
        if not stream:
            return ""
        try:
            answer = await self._call(
                f"read the log of job {job_id}",
                lambda: self._logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream, limit=lines, startFromHead=False),
            )
        except OffloadError:
            return ""
        text = "\n".join(str(e.get("message", "")) for e in answer.get("events", ()))
        return f"; the end of its log ({LOG_GROUP} {stream}):\n{text}" if text else ""

    # -- cancelling -------------------------------------------------------------

    async def _cancel_soon(self) -> None:
        await asyncio.sleep(0)  # cancels of one turn (a cancelled gather) go together
        ids, self._cancels = sorted(self._cancels), set()
        await self._terminate(ids, "cancelled by the shoal engine that submitted it")

    async def _terminate(self, job_ids: list[str], reason: str) -> None:
        targets: list[str] = []
        by_parent: dict[str, list[str]] = {}
        for job_id in job_ids:
            if ":" in job_id:
                by_parent.setdefault(job_id.split(":", 1)[0], []).append(job_id)
            else:
                targets.append(job_id)
        for parent, children in by_parent.items():
            rest = {j for j in self._live if j.startswith(parent + ":")} - set(children)
            # Every unfinished child is going: one call for the parent stops them all.
            targets.extend([parent] if not rest else children)
        for job_id in job_ids:
            self._live.discard(job_id)
            self._poller.forget(job_id)

        async def terminate(job_id: str) -> None:
            await self._call(
                f"terminate job {job_id} of job queue {self.job_queue!r}",
                lambda: self._batch.terminate_job(jobId=job_id, reason=reason),
            )

        await asyncio.gather(*(terminate(j) for j in targets))
