"""What an AWS Batch job of shoal runs: one attempt, read from S3, its result written back.

The engine side (:mod:`offload._batch`) packs the payloads of one array
job into one *pack* (a content-addressed object under ``storage``) and
submits ``python -m offload.worker --batch STORAGE --pack DIGEST``.  Each
job (or array child, by ``AWS_BATCH_JOB_ARRAY_INDEX``) then:

1. reads its payload from the pack with two range reads (its offsets, then
   its bytes), never the whole pack;
2. runs it with the worker's own attempt runner
   (:func:`engine.extend.serve`) over an in-process channel instead
   of pipes: the code bundle it asks for is read from ``storage``, what it
   prints and logs is written to this process's stdout/stderr (CloudWatch
   Logs) and kept, traces are kept;
3. writes a :class:`JobResult` (the outcome, the traces, the output) to
   ``STORAGE/results/<AWS_BATCH_JOB_ID>``, where the engine finds it by
   the job id it recorded, after a crash too.

A task that raises still ends the job with status 0 (its exception is in
the result); the job fails only when the attempt could not run or its
result could not be written, and then the engine reports the status
reason and the exit code.

Pack layout: ``n + 1`` big-endian 64-bit offsets (absolute), then the ``n``
msgpack-encoded payloads; payload ``i`` spans ``offsets[i]:offsets[i+1]``.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from typing import TYPE_CHECKING, Any, Final

import msgspec

from engine.extend import Done, Log, NeedBundle, Outcome, Payload, Start, Trace

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from ._s3 import S3BlobStore

__all__ = ["JobResult", "pack_payloads", "result_key", "run_job"]

OFFSET: Final = struct.Struct(">Q")
#: Exit status of a job whose attempt could not be read, run or reported.
EXIT_FAILED: Final = 2


class JobResult(msgspec.Struct, frozen=True):
    """What a job leaves in S3 for the engine: how its attempt ended."""

    outcome: Outcome
    #: Traces that succeeded during the attempt: (key, name, kind, data).
    traces: list[tuple[str, str, str, bytes]] = []
    #: What it printed and logged: (stream, text), in order.
    logs: list[tuple[str, str]] = []


_payload_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(Payload)
_result_decoder = msgspec.msgpack.Decoder(JobResult)


def pack_payloads(payloads: list[Payload]) -> bytes:
    """The pack of one job's payloads (see the module docstring)."""
    bodies = [_payload_encoder.encode(p) for p in payloads]
    offset = OFFSET.size * (len(bodies) + 1)
    offsets = []
    for body in bodies:
        offsets.append(offset)
        offset += len(body)
    offsets.append(offset)
    return b"".join(OFFSET.pack(o) for o in offsets) + b"".join(bodies)


def result_key(prefix: str, job_id: str) -> str:
    """The S3 key of the result of job ``job_id`` (an array child: ``PARENT:INDEX``)."""
    return f"{prefix}/results/{job_id}" if prefix else f"results/{job_id}"


def decode_result(data: bytes) -> JobResult:
    return _result_decoder.decode(data)


async def read_payload(store: S3BlobStore, pack: str, index: int) -> Payload:
    """Payload ``index`` of a pack, by two range reads."""
    start = OFFSET.size * index
    bounds = await store._get_range(pack, start, start + 2 * OFFSET.size)
    begin, end = OFFSET.unpack_from(bounds)[0], OFFSET.unpack_from(bounds, OFFSET.size)[0]
    return _payload_decoder.decode(await store._get_range(pack, begin, end))


class JobChannel:
    """The worker loop's transport inside a job: one Start in, one Done out, nothing over a wire.

    It stands in for :class:`engine.extend.Frames` (it is an
    ``engine.extend.Channel``): the worker asks it for a code bundle, which it reads from
    S3; output and traces are kept for the result, output written to
    this process's stdout/stderr as well (the job's CloudWatch stream).
    """

    def __init__(self, payload: Payload, store: S3BlobStore) -> None:
        self.store = store
        self.outcome: Outcome | None = None
        self.traces: list[tuple[str, str, str, bytes]] = []
        self.logs: list[tuple[str, str]] = []
        # Invariant: holds what the worker has yet to receive; None ends the stream.
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._inbox.put_nowait(Start(1, payload))
        self._fetches: set[asyncio.Task[None]] = set()

    async def send(self, message: Any) -> None:
        self.post(message)

    def post(self, message: Any) -> None:
        if isinstance(message, Log):
            self.logs.append((message.stream, message.text))
            fd = 2 if message.stream == "stderr" else 1
            os.write(fd, message.text.encode(errors="replace"))
        elif isinstance(message, Trace):
            self.traces.append((message.key, message.name, message.kind, message.data))
        elif isinstance(message, Done):
            self.outcome = message.outcome
            self._inbox.put_nowait(None)
        elif isinstance(message, NeedBundle):
            task = asyncio.get_running_loop().create_task(self._fetch(message.digest))
            self._fetches.add(task)
            task.add_done_callback(self._fetches.discard)

    async def _fetch(self, digest: str) -> None:
        from engine.extend import BundleData

        try:
            data = await self.store.get_bytes(digest)
        except Exception as exc:
            # The worker checks the bundle's digest: empty data fails the
            # attempt with an error naming the bundle; say why here too.
            os.write(2, f"cannot read code bundle {digest} from {self.store.uri}: {exc}\n".encode())
            data = b""
        self._inbox.put_nowait(BundleData(digest, data))

    async def drain(self) -> None:
        return None

    async def recv(self) -> Any:
        return await self._inbox.get()

    async def each(self, handle: Callable[[Any], bool]) -> None:
        while (message := await self.recv()) is not None and handle(message):
            pass

    async def aclose(self) -> None:
        for task in list(self._fetches):
            task.cancel()


async def run_job(storage: str, pack: str, cache: Path) -> int:
    """Run this job's attempt and write its result; the job's exit status."""
    from engine.extend import serve

    from ._s3 import S3BlobStore
    from .worker import BundleDir

    job_id = os.environ.get("AWS_BATCH_JOB_ID", "")
    if not job_id:
        sys.stderr.write("offload.worker --batch runs inside an AWS Batch job: AWS_BATCH_JOB_ID is not set\n")
        return EXIT_FAILED
    index = int(os.environ.get("AWS_BATCH_JOB_ARRAY_INDEX", "0"))
    store = S3BlobStore(storage)
    try:
        payload = await read_payload(store, pack, index)
        if payload.blob_store:
            os.environ["SHOAL_BLOB_STORE"] = payload.blob_store
        channel = JobChannel(payload, store)
        await serve(channel, BundleDir(cache))
        if channel.outcome is None:
            sys.stderr.write(f"job {job_id}: the attempt ended without an outcome\n")
            return EXIT_FAILED
        result = JobResult(channel.outcome, channel.traces, channel.logs)
        key = result_key(store.prefix, job_id)
        body = msgspec.msgpack.encode(result)
        await store._call(
            "write the result to",
            f"s3://{store.bucket}/{key}",
            lambda c: c.put_object(Bucket=store.bucket, Key=key, Body=body),
        )
    except Exception as exc:
        sys.stderr.write(f"job {job_id} (pack {pack}, index {index}) failed: {type(exc).__name__}: {exc}\n")
        return EXIT_FAILED
    finally:
        await store.aclose()
    return 0
