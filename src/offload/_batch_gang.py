"""Gangs on ``offload.Batch``: one multi-node parallel job per attempt, and how it ended.

The engine side of ``@engine.task(nodes=N, offload=offload.Batch(...))``
(the nodes' side is :mod:`offload._batch_node`):

- **Job definition**: ``type="multinode"`` with ``nodeProperties``
  (``numNodes = N``, ``mainNode = 0``, one node range for the main node
  and one for the others, both with the container a single job of the
  same task would get, resources per rank), named ``shoal-<hash>`` of
  that container and N, found or registered once per shape like the
  single-node ones.  With ``job_definition=``, the container is that
  definition's.
- **Submit**: ``nodeOverrides`` (one override for every node, the command
  and environment of this attempt, as ``containerOverrides`` are for a
  single job); the handle is the job id, with the node jobs
  ``JOBID#0 .. JOBID#N-1`` as where each rank runs.
- **Outcome**: once the job ends, every rank's result is read back (its
  output delivered with its rank, rank 0's traces), and the outcome is
  rank 0's when all succeeded, else the failing rank's with ``rank`` set
  (the one the main node saw fail first).  A rank that left no outcome
  (its node failed, was reclaimed, or the job was stopped under it) is the
  whole gang's infrastructure failure, ``WorkerLost`` or ``Reclaimed``
  naming the rank: the engine retries the gang as one attempt.  The
  poller also watches the node jobs while the job runs: a node that
  failed ends the job at once (the main node would otherwise wait for it).
- At most :data:`MAX_NODES` nodes (AWS Batch's limit on a multi-node job);
  one rank per node, so ``ranks_per_host`` other than 1 is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from typing import TYPE_CHECKING, Any, Final

import msgspec

from engine.extend import Reclaimed, SubmitFailed, WorkerLost

from ._batch_jobs import job_name
from ._batch_node import GangEnd, gang_key, rank_key

if TYPE_CHECKING:
    from engine.extend import AttemptHooks, Gang, Handle, Outcome, Payload

    from ._batch import Batch
    from ._batch_job import JobResult

__all__ = ["MAX_NODES", "gang_definition", "gang_outcome", "gang_unfit", "node_overrides", "submit_gang"]

#: Nodes of one multi-node parallel job at most (AWS Batch's default limit).
MAX_NODES: Final = 1000
#: Result objects read at once when a gang's job has ended.
READS: Final = 16
RECLAIM = re.compile(r"^Host EC2\b.*\bterminated", re.IGNORECASE)


def gang_unfit(gang: Gang) -> str | None:
    """Why a gang can never run as one multi-node job, or None."""
    if gang.nodes > MAX_NODES:
        return (
            f"an AWS Batch multi-node parallel job has at most {MAX_NODES} nodes, one rank each, "
            f"and nodes={gang.nodes} asks for more"
        )
    if gang.ranks_per_host not in (None, 1):
        return (
            f"ranks_per_host={gang.ranks_per_host} has no meaning on AWS Batch, which runs one rank "
            "per node of a multi-node job: drop ranks_per_host (or set it to 1), and give each "
            "rank the resources of a node"
        )
    return None


def gang_definition(name: str, container: dict[str, Any], nodes: int) -> tuple[str, dict[str, Any]]:
    """(name, ``nodeProperties``) of the multi-node definition of ``nodes`` nodes running ``container``.

    ``name`` is the single-node definition's (or the existing one's): the
    multi-node one is named after it and the node count.
    """
    spec = repr((name, sorted(container.items()), nodes))
    gang_name = "shoal-" + hashlib.sha256(spec.encode()).hexdigest()[:20] + f"-x{nodes}"
    properties = {
        "numNodes": nodes,
        "mainNode": 0,
        "nodeRangeProperties": [
            {"targetNodes": "0", "container": container},
            {"targetNodes": "1:", "container": container},
        ],
    }
    return gang_name, properties


def container_of(described: dict[str, Any]) -> dict[str, Any]:
    """The container an existing job definition runs (a multi-node one's: its main node's)."""
    if described.get("containerProperties"):
        return dict(described["containerProperties"])
    for node_range in (described.get("nodeProperties") or {}).get("nodeRangeProperties", ()):
        start = str(node_range.get("targetNodes", "")).partition(":")[0]
        if start in ("", "0") and node_range.get("container"):
            return dict(node_range["container"])
    raise ValueError(f"job definition {described.get('jobDefinitionName')!r} names no container")


def node_overrides(overrides: dict[str, Any], nodes: int) -> dict[str, Any]:
    """``nodeOverrides`` of a submit: this attempt's container overrides on every node."""
    return {"numNodes": nodes, "nodePropertyOverrides": [{"targetNodes": "0:", "containerOverrides": overrides}]}


async def submit_gang(backend: Batch, payload: Payload, nodes: int, hooks: AttemptHooks) -> Handle:
    """Submit one attempt of a gang as a multi-node job of ``nodes`` nodes: its handle."""
    from engine.extend import Handle

    from ._batch_job import pack_payloads

    assert backend._store is not None
    if payload.bundle is not None:
        await backend._upload_bundle(payload.bundle)
    definition = await backend._definition_for(payload, nodes)
    try:
        pack = await backend._store.put_bytes(pack_payloads([payload]))
    except Exception as exc:
        raise SubmitFailed(
            f"cannot store the payload of task {payload.task!r} for job queue {backend.job_queue!r} "
            f"in {backend._area}: {exc}"
        ) from exc
    request: dict[str, Any] = {
        "jobName": job_name(payload.task),
        "jobQueue": backend.job_queue,
        "jobDefinition": definition,
        "nodeOverrides": node_overrides(backend._overrides(payload, pack, backend.master_port), nodes),
    }
    if payload.timeout is not None:
        request["timeout"] = {"attemptDurationSeconds": max(60, math.ceil(payload.timeout))}
    what = f"submit a gang of {nodes} nodes of task {payload.task!r} to job queue {backend.job_queue!r}"
    answer = await backend._call(what, lambda: backend._batch.submit_job(**request), submit=True)
    job_id: str = answer["jobId"]
    backend._live.add(job_id)
    backend._hooks[job_id] = hooks
    backend._tasks[job_id] = payload.task
    backend._gangs[job_id] = nodes
    return Handle("batch", job_id, job_id, tuple(f"{job_id}#{i}" for i in range(nodes)))


async def _results(backend: Batch, job_id: str, nodes: int) -> tuple[dict[int, JobResult], GangEnd | None]:
    """Every rank's result that the job's nodes wrote, and the main node's decision (if written)."""
    from ._batch_job import decode_result

    assert backend._store is not None
    prefix = backend._store.prefix
    gate = asyncio.Semaphore(READS)

    async def read(key: str) -> bytes | None:
        async with gate:
            return await backend._read_result(key)

    keys = [rank_key(prefix, job_id, rank) for rank in range(nodes)]
    found = await asyncio.gather(*(read(k) for k in [*keys, gang_key(prefix, job_id)]))
    results = {rank: decode_result(data) for rank, data in enumerate(found[:-1]) if data is not None}
    end = msgspec.msgpack.decode(found[-1], type=GangEnd) if found[-1] is not None else None
    return results, end


def _deliver(hooks: AttemptHooks | None, results: dict[int, JobResult]) -> None:
    """Each rank's output under the action with its rank; rank 0's traces (they stand for the gang)."""
    if hooks is None:
        return
    for rank in sorted(results):
        for stream, text in results[rank].logs:
            hooks.log(stream, text, rank)
    if 0 in results:
        for trace in results[0].traces:
            hooks.trace(*trace)


async def gang_outcome(backend: Batch, handle: Handle, job: dict[str, Any], lost: dict[str, Any] | None, nodes: int) -> Outcome:
    """How the gang of this ended multi-node job (or of a failed node ``lost``) ended; see the module docstring."""
    job_id = handle.id
    task = backend._tasks.pop(job_id, None)
    hooks = backend._hooks.pop(job_id, None)
    backend._gangs.pop(job_id, None)
    # The rank of a node that failed under the running job (None: none did).
    lost_rank = int(str(lost.get("jobId", "")).rpartition("#")[2]) if lost is not None else None
    if lost is not None:
        # The main node would wait for that rank: the job ends now.
        await backend._terminate([job_id], f"rank {lost_rank} of the gang was lost")
    results, end = await _results(backend, job_id, nodes)
    _deliver(hooks, results)
    places = [f"{job_id}#{r}" + (f" on {results[r].outcome.where}" if r in results else "") for r in range(nodes)]
    failed = [r for r in sorted(results) if not results[r].outcome.ok]
    if end is not None and end.failed in failed:
        failed.insert(0, end.failed)  # the one the main node saw fail first
    if failed:
        rank = failed[0]
        return msgspec.structs.replace(results[rank].outcome, where=places[rank], rank=rank, ranks=places)
    if lost is None and job.get("status") == "SUCCEEDED" and len(results) == nodes:
        return msgspec.structs.replace(results[0].outcome, where=places[0], rank=0, ranks=places)
    # A rank left no outcome: its node failed, or the job was stopped under it.
    node = lost if lost is not None else job
    missing = lost_rank if lost_rank is not None else next(r for r in range(nodes) if r not in results)
    reason = str(node.get("statusReason") or job.get("statusReason") or "no reason given")
    code = (node.get("container") or {}).get("exitCode")
    what = f"rank {missing} of {nodes} (node job {job_id}#{missing}) of AWS Batch job {job_id}"
    what += f" of task {task!r}" if task else ""
    if RECLAIM.search(reason):
        raise Reclaimed(f"{what} was stopped by a spot reclaim: {reason}; the gang is retried")
    tail = await backend._log_tail(f"{job_id}#{missing}", None)
    raise WorkerLost(
        f"{what} (job queue {backend.job_queue!r}) ended without an outcome: {reason}"
        + (f" (exit code {code})" if code is not None else "")
        + f"; the gang is retried as one attempt{tail}"
    )
