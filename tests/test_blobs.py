"""Blob stores: the same behaviour from the local store and from S3 (a real moto server)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import stat
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

import engine
from _moto import KEY, REGION, MotoServer, moto_server, s3_bucket, s3_env
from engine._blobs import BlobStore, LocalBlobStore, open_blob_store, run_bounded
from engine._errors import BlobCorrupt, BlobError, BlobNotFound, ConfigError, EngineError
from offload._s3 import S3BlobStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

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
    #: Replace what the store holds under a digest, behind the store's back.
    tamper: Callable[[str, bytes], None]


def local_snapshot(root: pathlib.Path) -> object:
    return sorted(
        (str(p), p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
    )


@pytest.fixture(params=["local", "s3"])
async def backend(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Backend]:
    if request.param == "local":
        root = tmp_path / "blobs"

        def overwrite(digest: str, data: bytes) -> None:
            (root / digest[:2] / digest).write_bytes(data)

        async with LocalBlobStore(root) as local:
            yield Backend("local", local, lambda: local_snapshot(root), overwrite)
        return
    moto: MotoServer = request.getfixturevalue("moto_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    start = moto.mark()

    def put_object(digest: str, data: bytes) -> None:
        client = moto.client()
        try:
            client.put_object(Bucket=bucket, Key=f"blobs/{digest}", Body=data)
        finally:
            client.close()

    async with make_s3(moto, bucket) as s3:
        yield Backend("s3", s3, lambda: sum(r.is_write for r in moto.since(start)), put_object)


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


# -- what is read back is checked ----------------------------------------------


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


async def test_tampered_blob_is_refused_by_every_read(
    backend: Backend, tmp_path: pathlib.Path
) -> None:
    store = backend.store
    data = random_bytes(100_000, seed=11)
    digest = await store.put_bytes(data)
    backend.tamper(digest, flip_last_byte(data))  # same size: only the hash can tell
    with pytest.raises(engine.BlobCorrupt) as info:
        await store.get_bytes(digest)
    message = str(info.value)
    assert digest in message and store.uri in message
    assert "delete it and store the data again" in message
    assert isinstance(info.value, BlobError)
    with pytest.raises(BlobCorrupt, match=digest):
        await store.get_file(digest, tmp_path / "out" / "copy.bin")
    assert list((tmp_path / "out").iterdir()) == []  # nothing renamed into place, no temp left
    async with store.open(digest) as reader:
        with pytest.raises(BlobCorrupt, match=digest):
            await reader.read()
        assert not reader.verified
        with pytest.raises(BlobCorrupt, match=digest):  # and it stays refused
            await reader.read_range(0, 10)
    async with store.open(digest) as reader:
        with pytest.raises(BlobCorrupt, match=digest):
            async for _ in reader:
                pass


async def test_streamed_read_is_checked_at_its_end(backend: Backend) -> None:
    store = backend.store
    data = random_bytes(3 * MiB + 5, seed=12)  # several read-ahead chunks on the local store
    digest = await store.put_bytes(data)
    async with store.open(digest) as reader:
        assert b"".join([chunk async for chunk in reader]) == data
        assert reader.verified
    async with store.open(digest) as reader:
        # In-order ranges feed the hash too.
        step = 700_000
        got = [await reader.read_range(i, i + step) for i in range(0, len(data), step)]
        assert b"".join(got) == data and reader.verified
    async with store.open(digest) as reader:
        # Out-of-order ranges cannot be checked one by one: verify() checks the whole.
        assert await reader.read_range(len(data) - 10) == data[-10:]
        assert not reader.verified
        await reader.verify()
        assert reader.verified

    backend.tamper(digest, flip_last_byte(data))
    async with store.open(digest) as reader:
        seen: list[bytes] = []
        with pytest.raises(BlobCorrupt, match=digest):
            async for chunk in reader:
                seen.append(chunk)
        # What came before the end was handed out; the end never was.
        assert len(b"".join(seen)) < len(data)
        assert data.startswith(b"".join(seen))
    async with store.open(digest) as reader:
        assert await reader.read_range(0, 10) == data[:10]  # a prefix cannot be judged yet
        with pytest.raises(BlobCorrupt, match=digest):
            await reader.verify()


async def test_blob_of_wrong_size_is_refused_and_stored_again(backend: Backend) -> None:
    store = backend.store
    data = random_bytes(50_000, seed=13)
    digest = await store.put_bytes(data)
    backend.tamper(digest, data[:-100])
    with pytest.raises(BlobCorrupt, match=digest):
        await store.get_bytes(digest)
    async with store.open(digest) as reader:
        with pytest.raises(BlobCorrupt, match=digest):
            await reader.read()
    # Storing the content again replaces the damaged copy.
    assert await store.put_bytes(data) == digest
    assert await store.get_bytes(digest) == data
    backend.tamper(digest, b"")
    with pytest.raises(BlobCorrupt, match=digest):
        await store.get_bytes(digest)


async def test_local_blob_that_shrinks_while_read(tmp_path: pathlib.Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = random_bytes(3 * MiB, seed=14)
    digest = await store.put_bytes(data)
    async with store.open(digest) as reader:
        assert await reader.read(10) == data[:10]
        os.truncate(tmp_path / "blobs" / digest[:2] / digest, MiB)
        with pytest.raises(BlobCorrupt, match="shrank"):
            await reader.read()


async def test_download_into_a_file_in_the_way(backend: Backend, tmp_path: pathlib.Path) -> None:
    digest = await backend.store.put_bytes(b"content")
    (tmp_path / "plain-file").write_text("in the way")
    dest = tmp_path / "plain-file" / "sub" / "out.bin"
    with pytest.raises(BlobError, match="cannot write") as info:
        await backend.store.get_file(digest, dest)
    assert str(dest) in str(info.value)
    assert "choose a destination" in str(info.value)


class Payload:
    """A value msgspec cannot encode, so the journal pickles it (in a blob, when large)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class Planted:
    """What a tampered blob unpickles to: unpickling it writes a file."""

    def __init__(self, mark: pathlib.Path) -> None:
        self.mark = mark

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.write_text, (self.mark, "unpickled"))


FAIL_AFTER_PAYLOAD = {"on": True}


@engine.task
async def big_payload(n: int) -> Payload:
    return Payload(b"p" * n)


@engine.task
async def uses_payload(n: int) -> int:
    payload = await big_payload(n)
    if FAIL_AFTER_PAYLOAD["on"]:
        raise RuntimeError("failed after the payload was recorded")
    return len(payload.data)


@pytest.mark.parametrize("damage", ["replaced", "deleted"])
async def test_unreadable_output_blob_runs_the_action_again_on_resume(
    tmp_path: pathlib.Path, damage: str
) -> None:
    import pickle

    n = 400_000  # over the journal's inline limit: the pickled output goes to a blob
    blobs = tmp_path / "blobs"
    FAIL_AFTER_PAYLOAD["on"] = True
    async with engine.Engine(str(tmp_path / "j.db"), blob_store=blobs) as eng:
        first = await eng.run(uses_payload, n)
    assert first.status == "failed"
    [digest] = [d async for d in LocalBlobStore(blobs).list_digests()]
    mark = tmp_path / "mark"
    if damage == "replaced":
        (blobs / digest[:2] / digest).write_bytes(pickle.dumps(Planted(mark)))
    else:
        (blobs / digest[:2] / digest).unlink()
    FAIL_AFTER_PAYLOAD["on"] = False
    async with engine.Engine(str(tmp_path / "j.db"), blob_store=blobs) as eng:
        with pytest.warns(UserWarning, match="runs again: its recorded output cannot be read"):
            again = await eng.resume(first.id)
    assert not mark.exists()  # the replaced blob was refused before anything unpickled it
    # Treated as never recorded: the action ran again and the run completed.
    assert again.status == "succeeded", again.error
    assert again.result == n


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
    itself = LocalBlobStore(blocker)
    with pytest.raises(BlobError, match=f"blob store {blocker} is a file, not a folder"):
        await itself.put_bytes(b"x")


@pytest.fixture
def umask_0() -> Iterator[None]:
    """Run the test with umask 000, so any folder made without an explicit mode is 0777."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_0")
async def test_local_folders_are_private_whatever_the_umask(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "new" / "home" / "blobs"
    store = LocalBlobStore(root)
    digest = await store.put_bytes(b"private")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"streamed"

    streamed = await store.put_stream(chunks())
    big = tmp_path / "big.bin"
    big.write_bytes(random_bytes(2 * MiB, seed=15))
    from_file = await store.put_file(big)
    made = [tmp_path / "new", tmp_path / "new" / "home", root, root / "tmp"]
    made += [root / d[:2] for d in (digest, streamed, from_file)]
    assert {str(p): oct(mode(p)) for p in made} == {str(p): "0o700" for p in made}
    for d in (digest, streamed, from_file):
        assert mode(root / d[:2] / d) == 0o600


@pytest.mark.parametrize("folder", ["root", "tmp", "shard"])
async def test_local_store_refuses_a_folder_others_can_write(
    tmp_path: pathlib.Path, folder: str
) -> None:
    root = tmp_path / "blobs"
    store = LocalBlobStore(root)
    digest = await store.put_bytes(b"first")
    loose = {"root": root, "tmp": root / "tmp", "shard": root / sha(b"second")[:2]}[folder]
    loose.mkdir(exist_ok=True)
    os.chmod(loose, 0o777)
    with pytest.raises(BlobError, match="can be written by other users") as info:
        await store.put_bytes(b"second")
    assert f"chmod 700 {loose}" in str(info.value)
    assert not await store.exists(sha(b"second"))
    assert await store.get_bytes(digest) == b"first"  # reads are checked by content instead


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
        with pytest.raises(BlobCorrupt, match="corrupt"):
            await store.get_bytes(digest)
        with pytest.raises(BlobCorrupt, match="corrupt"):
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
    assert issubclass(BlobCorrupt, BlobError) and engine.BlobCorrupt is BlobCorrupt
    assert BlobCorrupt.__module__ == "engine"
    assert KEY == "testing" and REGION == "us-east-1"
