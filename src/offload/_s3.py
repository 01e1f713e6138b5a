"""The S3 blob store (aiobotocore): ``s3://bucket/prefix``.

Blobs are objects ``<prefix>/<sha256 hex digest>``.  Credentials, region and
endpoint come from the standard AWS environment and config files; an
explicit ``endpoint_url`` wins, then ``AWS_ENDPOINT_URL_S3``, then
``AWS_ENDPOINT_URL`` (for MinIO, moto, LocalStack...).

aiobotocore is imported when the store first connects, not when it is
built, so ``Engine(blob_store="s3://...")`` stays cheap.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import pathlib
import random
import tempfile
import zlib
from typing import TYPE_CHECKING, Any, TypeVar

from engine import BlobCorrupt, BlobError, BlobNotFound, ConfigError
from engine.extend import (
    CHUNK,
    Backoff,
    BlobReader,
    ClosingStore,
    check_digest,
    corrupt_blob,
    hash_file,
    run_bounded,
    unwritable_destination,
)

from ._errors_map import error_code, is_retryable, map_s3_error, map_s3_errors

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

__all__ = ["S3BlobStore"]

T = TypeVar("T")

MiB = 1 << 20
#: S3 rejects multipart parts smaller than this (except the last one).
MIN_PART_SIZE = 5 * MiB


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``"s3://bucket/a/b/"`` -> ``("bucket", "a/b")``."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"{uri!r} is not an S3 URI; write s3://bucket/prefix")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ConfigError(f"S3 URI {uri!r} names no bucket; write s3://bucket/prefix")
    return bucket, prefix.strip("/")


class S3BlobStore(ClosingStore):
    """Blobs in S3 under ``s3://bucket/prefix``.

    - Uploads above ``multipart_threshold`` bytes are multipart uploads of
      ``part_size`` parts, ``max_concurrency`` parts in flight; a failed or
      cancelled upload is aborted, so it never leaves a visible object (nor
      stored parts).  Downloads of large blobs are concurrent range reads.
    - An upload first asks whether the digest is stored (HEAD); if it is,
      with the right size, nothing is transferred.
    - Every read is checked against the digest: ``get_bytes`` and
      ``get_file`` before they return (``get_file`` renames its download
      into place only then), ``open()`` readers at the end of a full read
      (see ``BlobReader``).  A mismatch raises ``BlobCorrupt``.
    - Every upload request carries the CRC32 of its body (parts too, as boto3
      sends them), which S3 checks; the payload itself is not signed
      (``UNSIGNED-PAYLOAD``), and no ``Expect: 100-continue`` round trip
      precedes a body.
    - Throttling (SlowDown, 429...), 5xx answers and dropped connections
      are retried ``max_attempts`` times in all, with exponential backoff
      and jitter (``backoff * 2**n`` seconds, at most ``max_delay``);
      botocore's own retries are switched off so attempts do not multiply.
      ``sleep`` is injectable so tests need not wait.
    - Every failure is a ``BlobError`` (``BlobNotFound`` for a missing
      object) naming the operation, the object URI and the endpoint.

    The client is created on first use and bound to that event loop;
    ``aclose()`` closes it.
    """

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        multipart_threshold: int = 8 * MiB,
        part_size: int = 8 * MiB,
        max_concurrency: int = 10,
        max_connections: int = 64,
        max_attempts: int = 5,
        backoff: float = 0.1,
        max_delay: float = 5.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        session: Any = None,
    ) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        if part_size < MIN_PART_SIZE:
            raise ConfigError(f"S3 part_size must be at least 5 MiB, got {part_size} bytes")
        if multipart_threshold < 1 or max_concurrency < 1 or max_attempts < 1:
            raise ConfigError(
                "S3 multipart_threshold, max_concurrency and max_attempts must be >= 1"
            )
        self.endpoint_url = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        self.region_name = region_name
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.max_connections = max(max_connections, max_concurrency)
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_delay = max_delay
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._sleep = sleep
        self._session = session
        self._rng = random.Random()
        self._backoff = Backoff(0.75 * backoff, 0.75 * max_delay, jitter=1 / 3)
        # Invariant: _client is None or open and owned by _stack; both are set
        # together, once, under _connect_lock.
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._connect_lock = asyncio.Lock()
        # Set once a HeadBucket has succeeded: later 404s then mean "no such key".
        self._bucket_seen = False

    def __repr__(self) -> str:
        return f"S3BlobStore({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def _endpoint(self) -> str:
        return self.endpoint_url or "AWS default"

    def _key(self, digest: str) -> str:
        check_digest(digest)
        return f"{self.prefix}/{digest}" if self.prefix else digest

    def object_uri(self, digest: str) -> str:
        return f"s3://{self.bucket}/{self._key(digest)}"

    # -- plumbing -----------------------------------------------------------

    async def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is None:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import get_session

                config = AioConfig(
                    retries={"total_max_attempts": 1},
                    max_pool_connections=self.max_connections,
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                    # We name blobs by SHA-256 and check downloads ourselves.
                    # Uploads carry a CRC32 that _upload computes (off the
                    # event loop for big bodies), so botocore computes none...
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    # ...and need not sign the payload either: signing hashes
                    # every body again, on the event loop.  boto3 skips it over
                    # https when a checksum is sent; the CRC covers plain http.
                    s3={"payload_signing_enabled": False},
                )
                session = self._session or get_session()
                stack = contextlib.AsyncExitStack()
                with map_s3_errors(action="connect to", uri=self.uri, endpoint=self._endpoint):
                    try:
                        client = await stack.enter_async_context(
                            session.create_client(
                                "s3",
                                endpoint_url=self.endpoint_url,
                                region_name=self.region_name,
                                config=config,
                            )
                        )
                    except ValueError as exc:
                        await stack.aclose()
                        raise BlobError(
                            f"cannot create an S3 client for {self.uri} with endpoint "
                            f"{self._endpoint}: {exc}; check endpoint_url / AWS_ENDPOINT_URL"
                        ) from exc
                # botocore asks for "Expect: 100-continue" on every upload: a
                # round trip before each body is sent.  Our bodies are in
                # memory, at most a part long, and go to keys we own, so an
                # early refusal would save little; skip the wait.
                client.meta.events.register_last("before-call.s3", _no_expect_header)
                self._stack, self._client = stack, client
        return self._client

    def _delay(self, attempt: int) -> float:
        # Half to all of the step (3/4 of it, give or take a third): the
        # retries of many parts of one transfer spread well apart.
        return self._backoff.delay(attempt, self._rng)

    async def _call(self, action: str, uri: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """``await fn(client)``, retried on transient failures, errors mapped to BlobError."""
        client = await self._connect()
        attempt = 1
        while True:
            try:
                return await fn(client)
            except Exception as exc:
                if attempt < self.max_attempts and is_retryable(exc):
                    await self._sleep(self._delay(attempt))
                    attempt += 1
                    continue
                if isinstance(exc, BlobError):
                    raise
                raise map_s3_error(
                    exc, action=action, uri=uri, endpoint=self._endpoint, attempts=attempt
                ) from exc

    async def _head(self, digest: str) -> dict[str, Any] | None:
        """HeadObject's answer, or None when there is no such object."""
        key = self._key(digest)
        uri = self.object_uri(digest)

        async def head(client: Any) -> dict[str, Any] | None:
            from botocore.exceptions import ClientError

            try:
                result: dict[str, Any] = await client.head_object(Bucket=self.bucket, Key=key)
                return result
            except ClientError as exc:
                code, status = error_code(exc)
                if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        found = await self._call("look up", uri, head)
        if found is None and not self._bucket_seen:
            # HEAD answers a bare 404 for a missing bucket as for a missing key;
            # ask once so a wrong bucket is reported as such, not as "not stored".
            await self._call("open bucket", self.uri, self._head_bucket)
            self._bucket_seen = True
        return found

    async def _head_bucket(self, client: Any) -> None:
        from botocore.exceptions import ClientError

        try:
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if error_code(exc)[1] == 404:
                raise BlobError(
                    f"open {self.uri} (S3 endpoint {self._endpoint}) failed: bucket "
                    f"{self.bucket!r} does not exist; create it, or point blob_store "
                    "(SHOAL_BLOB_STORE, [tool.shoal] blob_store) at an existing bucket"
                ) from exc
            raise

    async def _get_range(self, digest: str, start: int, end: int) -> bytes:
        key = self._key(digest)

        async def get(client: Any) -> bytes:
            resp = await client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
            )
            async with resp["Body"] as body:
                data: bytes = await body.read()
            return data

        data = await self._call(f"read bytes {start}-{end - 1} of", self.object_uri(digest), get)
        if len(data) != end - start:
            raise BlobCorrupt(
                f"blob {digest} in the blob store {self.uri} is corrupt: reading bytes "
                f"{start}-{end - 1} of {self.object_uri(digest)} gave {len(data)} bytes, so the "
                "object is shorter than when it was looked up; delete it and store the data "
                "again (run the action that produced it again)"
            )
        return data

    # -- writing ------------------------------------------------------------

    async def _upload(
        self, digest: str, size: int, read: Callable[[int, int], Awaitable[bytes]]
    ) -> None:
        key = self._key(digest)
        uri = self.object_uri(digest)
        if size <= self.multipart_threshold:
            data = await read(0, size)
            crc = await _crc32_of(data)
            await self._call(
                "upload",
                uri,
                lambda c: c.put_object(Bucket=self.bucket, Key=key, Body=data, ChecksumCRC32=crc),
            )
            return
        # CRC32 parts, like boto3's transfers: S3 checks each part as it
        # arrives, and the completed object's checksum is built from them.
        created = await self._call(
            "start multipart upload of",
            uri,
            lambda c: c.create_multipart_upload(
                Bucket=self.bucket, Key=key, ChecksumAlgorithm="CRC32"
            ),
        )
        upload_id: str = created["UploadId"]
        try:
            ranges = [
                (n, start, min(start + self.part_size, size))
                for n, start in enumerate(range(0, size, self.part_size), start=1)
            ]

            async def upload_part(part: tuple[int, int, int]) -> dict[str, Any]:
                number, start, end = part
                body = await read(start, end)
                crc = await _crc32_of(body)
                resp = await self._call(
                    f"upload part {number} of",
                    uri,
                    lambda c: c.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                        ChecksumCRC32=crc,
                    ),
                )
                return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumCRC32": crc}

            parts = await run_bounded(upload_part, ranges, limit=self.max_concurrency)
            await self._call(
                "complete multipart upload of",
                uri,
                lambda c: c.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except BaseException as exc:
            # Shielded: a cancelled upload must still be aborted, or its parts
            # linger (and are billed) with no object to show for them.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._abort(key, upload_id, exc))
            raise

    async def _abort(self, key: str, upload_id: str, cause: BaseException) -> None:
        try:
            await self._call(
                "abort multipart upload of",
                f"s3://{self.bucket}/{key}",
                lambda c: c.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id),
            )
        except BlobError as exc:
            cause.add_note(
                f"aborting multipart upload {upload_id} also failed ({exc}); remove it with "
                "`aws s3api abort-multipart-upload` or a bucket lifecycle rule"
            )

    async def put_bytes(self, data: bytes) -> str:
        data = bytes(data)
        digest = await asyncio.to_thread(_sha256, data) if len(data) > CHUNK else _sha256(data)
        if not _holds(await self._head(digest), len(data)):

            async def read(start: int, end: int) -> bytes:
                return data[start:end]

            await self._upload(digest, len(data), read)
        return digest

    async def put_file(self, path: str | os.PathLike[str]) -> str:
        path = pathlib.Path(path)
        try:
            # One thread hop hashes the file and keeps a small one's content:
            # exactly the bytes hashed are uploaded, with no second read.
            digest, size, content = await asyncio.to_thread(
                _hash_small_file, path, min(CHUNK, self.multipart_threshold)
            )
        except FileNotFoundError as exc:
            raise BlobNotFound(f"cannot store {path} in {self.uri}: no such file") from exc
        except OSError as exc:
            raise BlobError(f"cannot store {path} in {self.uri}: {exc}") from exc
        if _holds(await self._head(digest), size):
            return digest
        if content is not None:

            async def read_content(start: int, end: int) -> bytes:
                return content[start:end]

            await self._upload(digest, size, read_content)
            return digest
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:

            async def read(start: int, end: int) -> bytes:
                data = await asyncio.to_thread(os.pread, fd, end - start, start)
                if len(data) != end - start:
                    raise BlobError(
                        f"{path} shrank while it was uploaded to {self.uri}; "
                        "do not modify a file while it is uploaded"
                    )
                return data

            await self._upload(digest, size, read)
        finally:
            os.close(fd)
        return digest

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        """Spool ``chunks`` to a local temporary file, then upload it as :meth:`put_file`.

        The key is the content's digest, which is known only at the end of the
        stream, and S3 cannot rename; spooling costs local disk, not requests.
        """
        fd, name = await asyncio.to_thread(tempfile.mkstemp, prefix="shoal-s3-")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    await asyncio.to_thread(out.write, chunk)
            return await self.put_file(name)
        finally:
            await asyncio.to_thread(pathlib.Path(name).unlink, missing_ok=True)

    # -- reading ------------------------------------------------------------

    def _verify(self, actual: str, digest: str) -> None:
        if actual != digest:
            raise corrupt_blob(digest, actual, store=self.uri, where=self.object_uri(digest))

    def _missing(self, digest: str) -> BlobNotFound:
        return BlobNotFound(
            f"blob {digest} is not in {self.uri} (no object {self.object_uri(digest)} at "
            f"S3 endpoint {self._endpoint}): it was deleted, or it was written to another "
            "blob store; point the engine's blob_store at the store that holds it"
        )

    async def size(self, digest: str) -> int:
        head = await self._head(digest)
        if head is None:
            raise self._missing(digest)
        return int(head["ContentLength"])

    async def exists(self, digest: str) -> bool:
        return await self._head(digest) is not None

    async def get_bytes(self, digest: str) -> bytes:
        key = self._key(digest)

        async def get(client: Any) -> bytes:
            resp = await client.get_object(Bucket=self.bucket, Key=key)
            async with resp["Body"] as body:
                data: bytes = await body.read()
            return data

        try:
            data = await self._call("download", self.object_uri(digest), get)
        except BlobNotFound as exc:
            raise self._missing(digest) from exc
        actual = await asyncio.to_thread(_sha256, data) if len(data) > CHUNK else _sha256(data)
        self._verify(actual, digest)
        return data

    async def get_file(self, digest: str, dest: str | os.PathLike[str]) -> None:
        """Download to a temp file next to ``dest`` (ranges in parallel), check, rename."""
        dest = pathlib.Path(dest)
        size = await self.size(digest)
        try:
            fd, tmp_name = await asyncio.to_thread(_temp_next_to, dest)
        except OSError as exc:
            raise unwritable_destination(dest, self.object_uri(digest), exc) from exc
        tmp = pathlib.Path(tmp_name)
        try:
            try:
                step = self.part_size

                async def fetch(start: int) -> None:
                    data = await self._get_range(digest, start, min(start + step, size))
                    await asyncio.to_thread(os.pwrite, fd, data, start)

                await run_bounded(fetch, range(0, size, step), limit=self.max_concurrency)
            finally:
                os.close(fd)
            # Parts arrive out of order, so the whole is hashed once it is written
            # (from the page cache), before it is renamed into place.
            actual, _ = await asyncio.to_thread(hash_file, tmp)
            self._verify(actual, digest)
            await asyncio.to_thread(os.replace, tmp, dest)
        except OSError as exc:
            raise unwritable_destination(dest, self.object_uri(digest), exc) from exc
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)

    @contextlib.asynccontextmanager
    async def open(self, digest: str) -> AsyncIterator[BlobReader]:
        size = await self.size(digest)

        async def fetch(start: int, end: int) -> bytes:
            return await self._get_range(digest, start, end)

        # Read ahead a whole part: one request per part_size of sequential reads.
        yield BlobReader(
            uri=self.object_uri(digest),
            size=size,
            fetch=fetch,
            chunk_size=self.part_size,
            digest=digest,
            store_uri=self.uri,
        )

    async def delete(self, digest: str) -> None:
        key = self._key(digest)
        await self._call(
            "delete",
            self.object_uri(digest),
            lambda c: c.delete_object(Bucket=self.bucket, Key=key),
        )

    async def list_digests(self, prefix: str = "") -> AsyncIterator[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        client = await self._connect()
        paginator = client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=base + prefix)
        with map_s3_errors(action="list", uri=self.uri, endpoint=self._endpoint):
            async for page in pages:
                for item in page.get("Contents", ()):
                    name = item["Key"][len(base) :]
                    # Only our own objects: direct children named by a digest.
                    with contextlib.suppress(BlobError):
                        yield check_digest(name)

    # -- lifetime -----------------------------------------------------------

    async def aclose(self) -> None:
        """Close the client and its connections; the store reconnects if used again."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()
            # Closed connections finish closing in callbacks on the loop; let
            # them run, or a loop closed right after warns about their sockets.
            await asyncio.sleep(0)


def _holds(head: dict[str, Any] | None, size: int) -> bool:
    """Whether HeadObject's answer shows the blob stored with the right size.

    An object of another size is damaged; uploading the blob replaces it.
    """
    return head is not None and int(head.get("ContentLength", -1)) == size


def _temp_next_to(dest: pathlib.Path) -> tuple[int, str]:
    """A new temporary file in ``dest``'s folder (made if missing), to rename to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")


def _no_expect_header(params: dict[str, Any], **_: Any) -> None:
    params.get("headers", {}).pop("Expect", None)


def _hash_small_file(path: pathlib.Path, limit: int) -> tuple[str, int, bytes | None]:
    """SHA-256 digest, size and (when at most ``limit`` bytes) content of a file (blocking)."""
    with path.open("rb") as fh:
        if os.fstat(fh.fileno()).st_size <= limit:
            content = fh.read()
            if len(content) <= limit:
                return _sha256(content), len(content), content
    digest, size = hash_file(path)
    return digest, size, None


def _crc32(data: bytes) -> str:
    """The base64 CRC32 that S3 checks an upload's body against (``ChecksumCRC32``)."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


async def _crc32_of(data: bytes) -> str:
    # zlib releases the GIL for large buffers: hash big parts off the loop.
    return await asyncio.to_thread(_crc32, data) if len(data) > CHUNK else _crc32(data)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
