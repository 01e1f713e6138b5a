"""Blob stores: the same behaviour from the local store and from S3 (a real moto server)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from _moto import KEY, REGION, MotoServer, moto_server, s3_bucket, s3_env
from engine._blobs import BlobStore, LocalBlobStore, open_blob_store, run_bounded
from engine._errors import BlobError, BlobNotFound, ConfigError, EngineError
from offload._s3 import S3BlobStore

if TYPE_CHECKING:
    import pathlib
    from collections.abc import AsyncIterator, Callable

__all__ = ["moto_server", "s3_bucket", "s3_env"]  # fixtures used by name

MiB = 1 << 20
#: The S3 store under test splits uploads above 6 MiB into 5 MiB parts (S3's minimum).
THRESHOLD = 6 * MiB
PART = 5 * MiB


async def no_sleep(delay: float) -> None:
    """Backoff without waiting; the delays are what tests look at."""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_s3(moto: MotoServer, bucket: str, prefix: str = "blobs", **kw: object) -> S3BlobStore:
    options: dict[str, object] = {
        "endpoint_url": moto.endpoint,
        "multipart_threshold": THRESHOLD,
        "part_size": PART,
        "sleep": no_sleep,
    }
    options.update(kw)
    return S3BlobStore(f"s3://{bucket}/{prefix}", **options)  # type: ignore[arg-type]


@dataclass
class Backend:
    kind: str
    store: BlobStore
    #: A value that changes whenever the store writes something.
    writes: Callable[[], object]


def local_snapshot(root: pathlib.Path) -> object:
    return sorted(
        (str(p), p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
    )


@pytest.fixture(params=["local", "s3"])
async def backend(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Backend]:
    if request.param == "local":
        root = tmp_path / "blobs"
        async with LocalBlobStore(root) as local:
            yield Backend("local", local, lambda: local_snapshot(root))
        return
    moto: MotoServer = request.getfixturevalue("moto_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    start = moto.mark()
    async with make_s3(moto, bucket) as s3:
        yield Backend("s3", s3, lambda: sum(r.is_write for r in moto.since(start)))


def random_bytes(n: int, seed: int = 0) -> bytes:
    # Pseudo-random so content does not compress or repeat across tests.
    import random

    return random.Random(seed).randbytes(n)


async def test_bytes_round_trip(backend: Backend) -> None:
    store = backend.store
    data = b"hello blob store"
    digest = await store.put_bytes(data)
    assert digest == sha(data)
    assert await store.exists(digest)
    assert await store.size(digest) == len(data)
    assert await store.get_bytes(digest) == data
    assert store.object_uri(digest).startswith(store.uri)
    assert store.object_uri(digest).endswith(digest)


async def test_empty_blob(backend: Backend) -> None:
    digest = await backend.store.put_bytes(b"")
    assert await backend.store.get_bytes(digest) == b""
    async with backend.store.open(digest) as reader:
        assert await reader.read() == b""


async def test_large_file_round_trip(
    backend: Backend, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    data = random_bytes(2 * PART + 12345, seed=1)  # > threshold: three parts on S3
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    if backend.kind == "s3":
        moto: MotoServer = request.getfixturevalue("moto_server")
        mark = moto.mark()
    digest = await backend.store.put_file(src)
    assert digest == sha(data)
    if backend.kind == "s3":
        assert sum(r.is_upload_part for r in moto.since(mark)) == 3
    dest = tmp_path / "out" / "big.bin"
    await backend.store.get_file(digest, dest)
    assert dest.read_bytes() == data
    assert await backend.store.get_bytes(digest) == data
    # No temporary files left next to the destination.
    assert sorted(p.name for p in dest.parent.iterdir()) == ["big.bin"]


async def test_put_bytes_large_is_multipart_too(backend: Backend) -> None:
    data = random_bytes(THRESHOLD + 1, seed=2)
    digest = await backend.store.put_bytes(data)
    assert await backend.store.get_bytes(digest) == data


async def test_stream_round_trip(backend: Backend) -> None:
    pieces = [random_bytes(1000, seed=i) for i in range(50)]

    async def chunks() -> AsyncIterator[bytes]:
        for piece in pieces:
            await asyncio.sleep(0)
            yield piece

    digest = await backend.store.put_stream(chunks())
    assert digest == sha(b"".join(pieces))
    assert await backend.store.get_bytes(digest) == b"".join(pieces)


async def test_failed_stream_stores_nothing(backend: Backend) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"partial"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        await backend.store.put_stream(chunks())
    assert [d async for d in backend.store.list_digests()] == []


async def test_range_reads(backend: Backend) -> None:
    data = random_bytes(3 * MiB + 17, seed=3)
    digest = await backend.store.put_bytes(data)
    async with backend.store.open(digest) as reader:
        assert reader.size == len(data)
        assert await reader.read_range(10, 20) == data[10:20]
        assert await reader.read_range(len(data) - 5, len(data) + 100) == data[-5:]
        assert await reader.read_range(7, 7) == b""
        assert reader.tell() == 0  # read_range does not move the position
        assert await reader.read(100) == data[:100]
        assert await reader.read(50) == data[100:150]
        reader.seek(-10, os.SEEK_END)
        assert await reader.read() == data[-10:]
        assert await reader.read() == b""
        reader.seek(MiB + 3)
        assert await reader.read(2 * MiB) == data[MiB + 3 : 3 * MiB + 3]
        reader.seek(0)
        assert b"".join([c async for c in reader]) == data
        with pytest.raises(ValueError, match="negative seek"):
            reader.seek(-1)


async def test_missing_blob(backend: Backend, tmp_path: pathlib.Path) -> None:
    store = backend.store
    digest = sha(b"never stored")
    assert not await store.exists(digest)
    with pytest.raises(BlobNotFound, match=digest) as info:
        await store.get_bytes(digest)
    assert store.uri in str(info.value)
    assert isinstance(info.value, LookupError)
    with pytest.raises(BlobNotFound, match=digest):
        await store.size(digest)
    with pytest.raises(BlobNotFound, match=digest):
        await store.get_file(digest, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(BlobNotFound, match=digest):
        async with store.open(digest):
            pass


async def test_bad_digest_is_refused(backend: Backend) -> None:
    for bad in ("../../etc/passwd", "ABC", sha(b"x").upper(), sha(b"x") + "/x"):
        with pytest.raises(BlobError, match="not a blob digest"):
            await backend.store.get_bytes(bad)


async def test_delete_and_list_by_prefix(backend: Backend) -> None:
    store = backend.store
    digests = {await store.put_bytes(f"blob {i}".encode()) for i in range(20)}
    listed = [d async for d in store.list_digests()]
    assert listed == sorted(digests)
    some = sorted(digests)[3]
    prefix = some[:1]
    assert [d async for d in store.list_digests(prefix)] == sorted(
        d for d in digests if d.startswith(prefix)
    )
    assert [d async for d in store.list_digests(some)] == [some]
    await store.delete(some)
    await store.delete(some)  # deleting what is gone is not an error
    assert not await store.exists(some)
    assert some not in [d async for d in store.list_digests()]


async def test_second_upload_of_same_content_transfers_nothing(
    backend: Backend, tmp_path: pathlib.Path
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(random_bytes(THRESHOLD + 100, seed=4))
    small = tmp_path / "small.txt"
    small.write_bytes(b"small")
    first = (await backend.store.put_file(big), await backend.store.put_file(small))
    before = backend.writes()
    assert before  # the first uploads did write
    copy = tmp_path / "copy.bin"
    copy.write_bytes(big.read_bytes())
    again = (await backend.store.put_file(copy), await backend.store.put_bytes(b"small"))
    assert again == first
    assert backend.writes() == before


async def test_concurrent_puts_of_same_content(backend: Backend) -> None:
    data = random_bytes(200_000, seed=5)
    digests = await asyncio.gather(*(backend.store.put_bytes(data) for _ in range(10)))
    assert set(digests) == {sha(data)}
    assert [d async for d in backend.store.list_digests()] == [sha(data)]
    assert await backend.store.get_bytes(sha(data)) == data


async def test_put_file_missing_source(backend: Backend, tmp_path: pathlib.Path) -> None:
    with pytest.raises(BlobNotFound, match="no such file"):
        await backend.store.put_file(tmp_path / "nope")


# -- local store specifics ---------------------------------------------------


async def test_local_layout_and_permissions(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "home" / "blobs"
    store = LocalBlobStore(root)
    assert not root.exists()  # constructing does no I/O
    digest = await store.put_bytes(b"private")
    path = root / digest[:2] / digest
    assert path.read_bytes() == b"private"
    assert store.object_uri(digest) == path.as_uri()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (root, root / digest[:2], root / "tmp"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert list((root / "tmp").iterdir()) == []  # temp file renamed away


async def test_local_refuses_file_changed_during_copy(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine._blobs as blobs

    src = tmp_path / "src"
    src.write_bytes(b"original")
    real = blobs.hash_file

    def hash_then_modify(path: pathlib.Path) -> tuple[str, int]:
        result = real(path)
        path.write_bytes(b"modified after hashing")
        return result

    monkeypatch.setattr(blobs, "hash_file", hash_then_modify)
    store = LocalBlobStore(tmp_path / "blobs")
    with pytest.raises(BlobError, match="content changed"):
        await store.put_file(src)
    assert [d async for d in store.list_digests()] == []


async def test_local_unwritable_root(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = LocalBlobStore(blocker / "blobs")
    with pytest.raises(BlobError, match=str(blocker)):
        await store.put_bytes(b"x")


# -- S3 specifics --------------------------------------------------------------


async def test_s3_retries_throttling_with_backoff(moto_server: MotoServer, s3_bucket: str) -> None:
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    moto_server.fail(r"^PUT ", status=503, code="SlowDown", times=2)
    moto_server.fail(r"^GET ", status=500, code="InternalError", times=1)
    async with make_s3(moto_server, s3_bucket, sleep=record, backoff=0.5, max_delay=60) as store:
        digest = await store.put_bytes(b"retried")
        assert await store.get_bytes(digest) == b"retried"
    assert len(delays) == 3
    # Exponential with jitter in [0.5, 1] of the nominal 0.5 s, 1 s, 0.5 s.
    assert 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0 and 0.25 <= delays[2] <= 0.5


async def test_s3_gives_up_after_max_attempts(moto_server: MotoServer, s3_bucket: str) -> None:
    moto_server.fail(r"^PUT ", status=503, code="SlowDown", times=-1)
    async with make_s3(moto_server, s3_bucket, max_attempts=3) as store:
        with pytest.raises(BlobError, match="after 3 attempts") as info:
            await store.put_bytes(b"never")
    message = str(info.value)
    assert f"s3://{s3_bucket}/blobs/{sha(b'never')}" in message
    assert "SlowDown" in message
    assert info.value.__cause__ is not None


async def test_s3_client_errors_are_not_retried(moto_server: MotoServer, s3_bucket: str) -> None:
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    moto_server.fail(r"^PUT ", status=400, code="InvalidRequest", times=1)
    async with make_s3(moto_server, s3_bucket, sleep=record) as store:
        with pytest.raises(BlobError, match="InvalidRequest"):
            await store.put_bytes(b"bad")
    assert delays == []



def assert_bucket_empty(moto_server: MotoServer, bucket: str) -> None:
    """No object and no unfinished multipart upload is left in ``bucket``."""
    client = moto_server.client()
    try:
        assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    finally:
        client.close()

async def test_s3_failed_multipart_upload_is_aborted(
    moto_server: MotoServer, s3_bucket: str, tmp_path: pathlib.Path
) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(random_bytes(2 * PART + 1, seed=6))
    moto_server.fail(
        lambda r: r.is_upload_part and "partNumber=2" in r.query,
        status=500,
        code="InternalError",
        times=-1,
    )
    mark = moto_server.mark()
    async with make_s3(moto_server, s3_bucket, max_attempts=2) as store:
        with pytest.raises(BlobError, match="upload part 2"):
            await store.put_file(src)
        assert not await store.exists(sha(src.read_bytes()))
    assert_bucket_empty(moto_server, s3_bucket)
    assert any(r.method == "DELETE" and "uploadId=" in r.query for r in moto_server.since(mark))


async def test_s3_cancelled_multipart_upload_is_aborted(
    moto_server: MotoServer, s3_bucket: str, tmp_path: pathlib.Path
) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(random_bytes(3 * PART, seed=7))
    # Stall every part so the upload is surely in flight when cancelled.
    stall = moto_server.fail(lambda r: r.is_upload_part, status=200, code="", times=-1, delay=0.3)
    async with make_s3(moto_server, s3_bucket) as store:
        task = asyncio.create_task(store.put_file(src))
        assert await asyncio.to_thread(stall.seen.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        moto_server.clear_faults()
        assert not await store.exists(sha(src.read_bytes()))
    assert_bucket_empty(moto_server, s3_bucket)


async def test_s3_small_upload_costs_one_lookup_and_one_put(
    moto_server: MotoServer, s3_bucket: str, tmp_path: pathlib.Path
) -> None:
    src = tmp_path / "small.txt"
    src.write_bytes(b"a small file")
    async with make_s3(moto_server, s3_bucket) as store:
        await store.exists(sha(b"warm up"))  # connects and checks the bucket once
        mark = moto_server.mark()
        digest = await store.put_file(src)
        assert [r.method for r in moto_server.since(mark)] == ["HEAD", "PUT"]
        mark = moto_server.mark()
        assert await store.put_file(src) == digest
        assert await store.put_bytes(b"a small file") == digest
        assert [r.method for r in moto_server.since(mark)] == ["HEAD", "HEAD"]


async def test_s3_uploads_carry_crc32_and_skip_100_continue(
    moto_server: MotoServer, s3_bucket: str, tmp_path: pathlib.Path
) -> None:
    import base64
    import zlib

    def crc32(data: bytes) -> str:
        return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()

    small = b"checked by S3"
    big = random_bytes(2 * PART + 7, seed=8)
    src = tmp_path / "big.bin"
    src.write_bytes(big)
    mark = moto_server.mark()
    async with make_s3(moto_server, s3_bucket) as store:
        await store.put_bytes(small)
        digest = await store.put_file(src)
        assert await store.get_bytes(digest) == big
    puts = [r for r in moto_server.since(mark) if r.method == "PUT"]
    assert len(puts) == 4  # one object, three parts (sent concurrently, in any order)
    parts = [big[i : i + PART] for i in range(0, len(big), PART)]
    sent = {r.query: r.header("x-amz-checksum-crc32") for r in puts}
    assert sent.pop("") == crc32(small)
    assert {int(q.split("partNumber=")[1].split("&")[0]): v for q, v in sent.items()} == {
        n: crc32(p) for n, p in enumerate(parts, start=1)
    }
    for r in puts:
        assert r.header("expect") is None  # no round trip before the body
        assert r.header("x-amz-content-sha256") == "UNSIGNED-PAYLOAD"
    created = [r for r in moto_server.since(mark) if r.method == "POST" and "uploads" in r.query]
    assert [r.header("x-amz-checksum-algorithm") for r in created] == ["CRC32"]


async def test_s3_wrong_bucket(moto_server: MotoServer, s3_env: None) -> None:
    uri = "s3://no-such-bucket-here/blobs"
    async with make_s3(moto_server, "no-such-bucket-here") as store:
        for call in (
            lambda: store.put_bytes(b"x"),
            lambda: store.get_bytes(sha(b"x")),
            lambda: store.exists(sha(b"x")),
        ):
            with pytest.raises(
                BlobError, match="bucket 'no-such-bucket-here' does not exist"
            ) as info:
                await call()
            assert uri in str(info.value)
            assert not isinstance(info.value, BlobNotFound)


async def test_s3_missing_credentials(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with make_s3(moto_server, s3_bucket) as store:
        with pytest.raises(BlobError, match="no AWS credentials") as info:
            await store.put_bytes(b"x")
    assert f"s3://{s3_bucket}/blobs/" in str(info.value)
    assert "AWS_ACCESS_KEY_ID" in str(info.value)


async def test_s3_unreachable_endpoint(s3_env: None) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    async with S3BlobStore(
        "s3://bucket/p", endpoint_url=endpoint, max_attempts=3, sleep=record
    ) as store:
        with pytest.raises(BlobError, match="cannot reach the S3 endpoint") as info:
            await store.get_bytes(sha(b"x"))
    assert f"s3://bucket/p/{sha(b'x')}" in str(info.value)
    assert endpoint in str(info.value)
    assert len(delays) == 2  # connection failures are retried


async def test_s3_endpoint_from_environment(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    async with S3BlobStore(f"s3://{s3_bucket}") as store:
        assert store.endpoint_url == moto_server.endpoint
        digest = await store.put_bytes(b"via env")
        assert store.object_uri(digest) == f"s3://{s3_bucket}/{digest}"
    client = moto_server.client()
    try:
        assert client.get_object(Bucket=s3_bucket, Key=digest)["Body"].read() == b"via env"
    finally:
        client.close()


async def test_s3_detects_corrupt_object(
    moto_server: MotoServer, s3_bucket: str, tmp_path: pathlib.Path
) -> None:
    digest = sha(b"the real content")
    client = moto_server.client()
    try:
        client.put_object(Bucket=s3_bucket, Key=f"blobs/{digest}", Body=b"something else!")
    finally:
        client.close()
    async with make_s3(moto_server, s3_bucket) as store:
        with pytest.raises(BlobError, match="corrupt"):
            await store.get_bytes(digest)
        with pytest.raises(BlobError, match="corrupt"):
            await store.get_file(digest, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_s3_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="5 MiB"):
        S3BlobStore("s3://b/p", part_size=MiB)
    with pytest.raises(ConfigError, match="names no bucket"):
        S3BlobStore("s3:///p")


# -- selection -------------------------------------------------------------------


def test_open_blob_store(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = open_blob_store(None, home=tmp_path)
    assert isinstance(default, LocalBlobStore) and default.root == tmp_path / "blobs"
    assert not (tmp_path / "blobs").exists()
    there = open_blob_store(str(tmp_path / "elsewhere"), home=tmp_path)
    assert isinstance(there, LocalBlobStore) and there.root == tmp_path / "elsewhere"
    uri = open_blob_store((tmp_path / "u").as_uri(), home=tmp_path)
    assert isinstance(uri, LocalBlobStore) and uri.root == tmp_path / "u"
    assert isinstance(open_blob_store(tmp_path / "p", home=tmp_path), LocalBlobStore)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3 = open_blob_store("s3://bucket/some/prefix/", home=tmp_path)
    assert isinstance(s3, S3BlobStore)
    assert (s3.bucket, s3.prefix, s3.uri) == ("bucket", "some/prefix", "s3://bucket/some/prefix")
    assert s3.endpoint_url == "http://127.0.0.1:9"
    assert open_blob_store(there, home=tmp_path) is there
    with pytest.raises(ConfigError, match="unknown scheme"):
        open_blob_store("gs://bucket", home=tmp_path)
    with pytest.raises(ConfigError, match="BlobStore"):
        open_blob_store(42, home=tmp_path)  # type: ignore[arg-type]


def test_engine_does_not_import_offload_or_botocore() -> None:
    code = (
        "import sys, pathlib, engine._blobs, engine._files\n"
        "engine._blobs.open_blob_store(None, home=pathlib.Path('.'))\n"
        "bad = [m for m in ('offload', 'aiobotocore', 'botocore', 'pandas', 'pyarrow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_run_bounded_keeps_order_and_limit() -> None:
    running = peak = 0

    async def work(x: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (x % 3))
        running -= 1
        return x * 2

    assert await run_bounded(work, range(50), limit=4) == [x * 2 for x in range(50)]
    assert peak == 4

    async def fail_on_7(x: int) -> int:
        if x == 7:
            raise BlobError("seven")
        await asyncio.sleep(0)
        return x

    with pytest.raises(BlobError, match="seven"):  # the error itself, not an ExceptionGroup
        await run_bounded(fail_on_7, range(20), limit=3)


def test_errors_are_engine_errors() -> None:
    assert issubclass(BlobNotFound, BlobError) and issubclass(BlobError, EngineError)
    assert KEY == "testing" and REGION == "us-east-1"
