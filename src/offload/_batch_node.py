"""One node of a gang's AWS Batch multi-node job: its rank, and its outcome stored by rank.

A gang (``@engine.task(nodes=N)``) sent to ``offload.Batch`` is one
multi-node parallel job of N nodes, each running ``python -m offload.worker
--batch STORAGE --pack DIGEST --master-port PORT``.  On each node:

- the rank is ``AWS_BATCH_JOB_NODE_INDEX`` (the main node, index 0, is
  rank 0), the world size ``AWS_BATCH_JOB_NUM_NODES``, the master address
  ``AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS`` (AWS sets it on the
  other nodes only: the main node uses its own address), the master port
  the target's ``master_port``; the attempt runs with that
  :class:`~engine.Cluster` (``engine.cluster()``, ``RANK``...);
- every rank writes its :class:`~offload._batch_job.JobResult` to
  ``STORAGE/results/<job id>/rank-<i>``, then an empty marker
  ``.../ended/<i>-ok`` or ``.../ended/<i>-failed``;
- the main node waits for every other rank's marker before it exits: AWS
  Batch stops the other nodes when the main node exits, and the job's
  status is the main node's.  It exits at once, failing
  (:data:`EXIT_RANK_FAILED`), when its own attempt or another rank's
  fails, having written :class:`GangEnd` (which rank failed first) to
  ``.../gang``; with every rank done well it writes ``GangEnd()`` and exits 0.

A node that dies without an outcome leaves no marker: the main node would
wait for it until the attempt's timeout, so the engine watches the node
jobs (``JOBID#i``) too and ends the job itself (see ``_batch_poll``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import TYPE_CHECKING, Any, Final

import msgspec

from engine.extend import Cluster

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping
    from pathlib import Path

    from ._s3 import S3BlobStore

__all__ = [
    "EXIT_RANK_FAILED",
    "GangEnd",
    "ended_prefix",
    "gang_key",
    "gang_prefix",
    "node_cluster",
    "rank_key",
    "run_node",
]

#: Exit status of the main node when a rank's attempt failed (the job then FAILED).
EXIT_RANK_FAILED: Final = 3
#: Seconds between the main node's looks at the other ranks' markers.
RANKS_POLL: Final = 0.5


class GangEnd(msgspec.Struct, frozen=True):
    """What the main node decided: the rank whose failure ended the gang, or None (all succeeded)."""

    failed: int | None = None


def gang_prefix(prefix: str, job_id: str) -> str:
    """The S3 key prefix of a multi-node job's outcomes (``.../results/<job id>/``)."""
    return f"{prefix}/results/{job_id}/" if prefix else f"results/{job_id}/"


def rank_key(prefix: str, job_id: str, rank: int) -> str:
    return f"{gang_prefix(prefix, job_id)}rank-{rank}"


def ended_prefix(prefix: str, job_id: str) -> str:
    return f"{gang_prefix(prefix, job_id)}ended/"


def gang_key(prefix: str, job_id: str) -> str:
    return f"{gang_prefix(prefix, job_id)}gang"


def own_address() -> str:
    """This node's IPv4 address, as the other nodes reach it (its hostname's, as on AWS Batch's awsvpc)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def node_cluster(env: Mapping[str, str], master_port: int) -> tuple[str, Cluster]:
    """(the job id, this node's Cluster) from AWS Batch's variables of a multi-node job.

    Raises ``ValueError`` naming the variable when one is missing or wrong.
    """
    job = env.get("AWS_BATCH_JOB_ID", "").split("#", 1)[0]
    if not job:
        raise ValueError("AWS_BATCH_JOB_ID is not set: this runs inside an AWS Batch job")
    numbers = {}
    for name in ("AWS_BATCH_JOB_NODE_INDEX", "AWS_BATCH_JOB_NUM_NODES"):
        try:
            numbers[name] = int(env[name])
        except (KeyError, ValueError):
            raise ValueError(
                f"{name} is {env.get(name)!r}: --master-port runs one node of an AWS Batch "
                "multi-node job, where AWS Batch sets it"
            ) from None
    rank, world = numbers["AWS_BATCH_JOB_NODE_INDEX"], numbers["AWS_BATCH_JOB_NUM_NODES"]
    main = int(env.get("AWS_BATCH_JOB_MAIN_NODE_INDEX", "0") or 0)
    if main != 0 or not 0 <= rank < world:
        raise ValueError(
            f"node {rank} of {world} with main node {main}: shoal's multi-node jobs have their "
            "main node at index 0"
        )
    master = env.get("AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS") or own_address()
    # One rank per node: hosts name each rank's node job, which AWS can describe.
    hosts = [f"{job}#{i}" for i in range(world)]
    return job, Cluster.layout(hosts, master, master_port)[rank]


async def _put(store: S3BlobStore, key: str, body: bytes) -> None:
    await store._call(
        "write to", f"s3://{store.bucket}/{key}", lambda c: c.put_object(Bucket=store.bucket, Key=key, Body=body)
    )


async def _ended(store: S3BlobStore, job: str) -> dict[int, bool]:
    """The ranks that have written their marker: rank -> whether it succeeded."""
    prefix = ended_prefix(store.prefix, job)
    found: dict[int, bool] = {}
    token: str | None = None
    while True:
        request: dict[str, str] = {"Bucket": store.bucket, "Prefix": prefix}
        if token:
            request["ContinuationToken"] = token

        def page(client: Any, request: dict[str, str] = request) -> Awaitable[dict[str, Any]]:
            answer: Awaitable[dict[str, Any]] = client.list_objects_v2(**request)
            return answer

        answer = await store._call("list", f"s3://{store.bucket}/{prefix}", page)
        for item in answer.get("Contents", ()):
            rank, _, how = item["Key"][len(prefix) :].partition("-")
            if rank.isdigit():
                found[int(rank)] = how == "ok"
        token = answer.get("NextContinuationToken")
        if not token:
            return found


async def _first_failure(store: S3BlobStore, job: str, world: int) -> int | None:
    """Wait until every rank but 0 has ended: the lowest that failed first, or None if none did."""
    while True:
        ended = await _ended(store, job)
        failed = sorted(r for r, ok in ended.items() if not ok and r != 0)
        if failed:
            return failed[0]
        if all(ended.get(r) for r in range(1, world)):
            return None
        await asyncio.sleep(RANKS_POLL)


def _leave(code: int, why: str) -> None:
    """Exit now, with the attempt still running: it may be a sync function in a thread that nothing can stop."""
    sys.stderr.write(why + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


async def run_node(storage: str, pack: str, cache: Path, master_port: int) -> int:
    """Run this node's rank of the gang and write its outcome; the node's exit status."""
    from engine.extend import serve

    from ._batch_job import EXIT_FAILED, JobChannel, JobResult, read_payload
    from ._s3 import S3BlobStore
    from .worker import BundleDir

    try:
        job, cluster = node_cluster(os.environ, master_port)
    except ValueError as exc:
        sys.stderr.write(f"offload.worker --batch --master-port: {exc}\n")
        return EXIT_FAILED
    rank = cluster.rank
    store = S3BlobStore(storage)
    attempt: asyncio.Future[int] | None = None
    try:
        payload = await read_payload(store, pack, 0)
        if payload.blob_store:
            os.environ["SHOAL_BLOB_STORE"] = payload.blob_store
        # Rank 0 alone replays the recorded traces (and reports new ones).
        mine = msgspec.structs.replace(payload, cluster=cluster, traces=payload.traces if rank == 0 else {})
        channel = JobChannel(mine, store)
        attempt = asyncio.ensure_future(serve(channel, BundleDir(cache)))
        others = asyncio.ensure_future(_first_failure(store, job, cluster.world_size)) if rank == 0 else None
        await asyncio.wait([t for t in (attempt, others) if t is not None], return_when=asyncio.FIRST_COMPLETED)
        if not attempt.done():
            assert others is not None
            failed = others.result()
            if failed is not None:
                # Another rank failed while this one still runs: the gang ends now.
                await _put(store, gang_key(store.prefix, job), msgspec.msgpack.encode(GangEnd(failed)))
                _leave(EXIT_RANK_FAILED, f"job {job}: rank {failed} failed; the main node stops the gang")
        await attempt
        if channel.outcome is None:
            sys.stderr.write(f"job {job} rank {rank}: the attempt ended without an outcome\n")
            return EXIT_FAILED
        ok = channel.outcome.ok
        result = JobResult(channel.outcome, channel.traces, channel.logs)
        await _put(store, rank_key(store.prefix, job, rank), msgspec.msgpack.encode(result))
        await _put(store, f"{ended_prefix(store.prefix, job)}{rank}-{'ok' if ok else 'failed'}", b"")
        if others is None:
            return 0  # not the main node: its outcome is written, the main node decides
        if not ok:
            others.cancel()
            await _put(store, gang_key(store.prefix, job), msgspec.msgpack.encode(GangEnd(0)))
            return EXIT_RANK_FAILED
        failed = await others
        await _put(store, gang_key(store.prefix, job), msgspec.msgpack.encode(GangEnd(failed)))
        return 0 if failed is None else EXIT_RANK_FAILED
    except Exception as exc:
        message = f"job {job} rank {rank} (pack {pack}) failed: {type(exc).__name__}: {exc}"
        if attempt is not None and not attempt.done():
            _leave(EXIT_FAILED, message)
        sys.stderr.write(message + "\n")
        return EXIT_FAILED
    finally:
        await store.aclose()
