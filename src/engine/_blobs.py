"""Content-addressed blob stores: the protocol, the local directory store, selection.

A blob is an immutable byte string named by the hex SHA-256 digest of its
content.  Every store files a blob under its digest, so storing the same
content twice stores it once, and a digest names the same bytes in every
store.  ``engine.File``, ``engine.Dir`` and the journal's large outputs all
live in the engine's blob store.

Two stores ship: :class:`LocalBlobStore` (a directory, the default, under
``<home>/blobs``) and ``offload._s3.S3BlobStore`` (``s3://bucket/prefix``).
:func:`open_blob_store` picks one from a setting.

What a store gives back is checked against the digest it was asked for, on
every read: ``get_bytes`` and ``get_file`` hash what they read before they
return or rename it into place, and a :class:`BlobReader` hashes what it
reads in order from the start and compares at the end of a full read.  A
store is a folder or a bucket that something else may write to, and the
journal and the download cache trust what it returns; a blob whose content
no longer matches its name raises :class:`~engine.BlobCorrupt` instead of
being returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pathlib
import re
import tempfile
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote, urlsplit

from ._errors import BlobCorrupt, BlobError, BlobNotFound, ConfigError
from ._home import private_dir

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType
    from typing import Self

__all__ = [
    "BlobReader",
    "BlobStore",
    "LocalBlobStore",
    "check_digest",
    "corrupt_blob",
    "object_uri",
    "open_blob_store",
    "private_folder",
    "run_bounded",
    "store_uri_of",
    "unwritable_destination",
]

T = TypeVar("T")
R = TypeVar("R")

#: Bytes read per hashing/copying step: big enough to amortise a system call
#: and a thread hop, small enough to keep memory flat for huge files.
CHUNK = 1 << 20

#: Bytes hashed on the event loop; a larger piece is hashed in a worker thread
#: (hashlib releases the GIL), so a streamed read never blocks the loop for long.
HASH_ON_LOOP = 1 << 16

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a lower-case hex SHA-256 digest, else raise BlobError.

    Checked before a digest becomes part of a path or an object key, so a
    forged reference cannot point outside the store.
    """
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise BlobError(
            f"{digest!r} is not a blob digest (64 lower-case hex characters of SHA-256); "
            "use the digest returned by put_bytes/put_file"
        )
    return digest


def corrupt_blob(digest: str, actual: str, *, store: str, where: str) -> BlobCorrupt:
    """The error for blob ``digest`` of the store ``store`` whose content hashes to ``actual``.

    ``where`` locates the damaged copy (a path or an object URI).
    """
    return BlobCorrupt(
        f"blob {digest} in the blob store {store} is corrupt: its content ({where}) hashes to "
        f"{actual}, so it was changed or damaged after it was stored; delete it and store the "
        "data again (run the action that produced it again, or restore it from a copy)"
    )


def private_folder(base: pathlib.Path, what: str, *parts: str) -> pathlib.Path:
    """``base / parts...`` as an owner-only folder; every folder made on the way is 0700.

    ``base`` and each folder below it are checked by ``private_dir`` (created
    0700 with any missing parents if missing, refused if others can write
    to it).  Raises BlobError naming the folder and what to do.  Blocking.
    """
    path = private_dir(base, what, BlobError)
    for part in parts:
        path = private_dir(path / part, what, BlobError)
    return path


def hash_file(path: pathlib.Path) -> tuple[str, int]:
    """SHA-256 hex digest and size of a file, read in chunks (blocking)."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


async def run_bounded(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], *, limit: int
) -> list[R]:
    """``[await fn(x) for x in items]`` with at most ``limit`` calls in flight, in order.

    The first failure cancels the calls still running and is raised itself
    (not wrapped in an ExceptionGroup), so callers see the BlobError.
    Workers pull from one iterator, so memory does not grow with ``items``.
    """
    indexed = iter(enumerate(items))
    results: dict[int, R] = {}

    async def worker() -> None:
        for i, item in indexed:
            results[i] = await fn(item)

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(max(1, limit)):
                tg.create_task(worker())
    except BaseExceptionGroup as group:
        # Only the first real failure matters; the rest are its consequences
        # (cancellations of sibling workers).
        raise group.exceptions[0] from None
    return [results[i] for i in range(len(results))]


class BlobReader:
    """An async, seekable reader of one blob; bytes are fetched in ranges.

    ``read(n)`` returns up to ``n`` bytes from the current position (all the
    rest when ``n < 0``) and ``b""`` at the end; ``seek``/``tell`` move the
    position without I/O; ``read_range(start, end)`` fetches ``[start, end)``
    without moving it.  Small sequential reads are served from a read-ahead
    buffer of ``chunk_size`` bytes, so a loop of ``read(100)`` does not cost
    one request each.  ``async for chunk in fh`` streams the rest.

    Given the blob's ``digest``, the reader hashes the bytes it fetches in
    order from the start, so a full read (``read()`` to the end, ``async
    for``, in-order ranges) is checked without a second pass: the read that
    reaches the end raises :class:`~engine.BlobCorrupt` instead of
    returning its bytes when the whole does not hash to ``digest``, and so
    does every read after it.  Ranges read out of order cannot be checked
    one by one (a digest covers the whole blob); ``await fh.verify()``
    reads what was not hashed yet and checks the whole.  ``verified`` is
    true once the whole blob has been checked.
    """

    def __init__(
        self,
        *,
        uri: str,
        size: int,
        fetch: Callable[[int, int], Awaitable[bytes]],
        chunk_size: int = CHUNK,
        digest: str | None = None,
        store_uri: str = "",
    ) -> None:
        self.uri = uri
        self.size = size
        self._fetch = fetch
        self._chunk_size = chunk_size
        self._pos = 0
        # Invariant: _buf holds the blob's bytes [_buf_start, _buf_start + len(_buf)).
        self._buf = b""
        self._buf_start = 0
        self._digest = digest
        self._store_uri = store_uri
        # Invariant: _hash holds the SHA-256 state of the blob's bytes [0, _hashed);
        # it advances only under _hash_lock, so concurrent range reads feed it in
        # order.  _verified is set once _hashed == size and the digest matched.
        self._hash = hashlib.sha256() if digest is not None else None
        self._hashed = 0
        self._hash_lock = asyncio.Lock()
        self._verified = False

    @property
    def verified(self) -> bool:
        """Whether the whole blob has been read and found to match its digest."""
        return self._verified

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position like ``io.IOBase.seek``; beyond the end reads return ``b""``."""
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence!r}")
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset} in {self.uri}")
        self._pos = base + offset
        return self._pos

    async def _get(self, start: int, end: int) -> bytes:
        """Fetch ``[start, end)``, hashing it if it extends the hashed prefix."""
        data = await self._fetch(start, end)
        if self._hash is not None and start <= self._hashed < start + len(data):
            async with self._hash_lock:
                # Checked again: another read may have hashed these bytes meanwhile.
                if start <= self._hashed < start + len(data):
                    piece = memoryview(data)[self._hashed - start :]
                    if len(piece) > HASH_ON_LOOP:
                        await asyncio.to_thread(self._hash.update, piece)
                    else:
                        self._hash.update(piece)
                    self._hashed = start + len(data)
        self._check()
        return data

    def _check(self) -> None:
        """Compare the digest once the whole blob is hashed; raise BlobCorrupt on a mismatch."""
        if self._hash is None or self._verified or self._hashed < self.size:
            return
        actual = self._hash.hexdigest()
        if actual != self._digest:
            assert self._digest is not None
            raise corrupt_blob(self._digest, actual, store=self._store_uri, where=self.uri)
        self._verified = True

    async def verify(self) -> None:
        """Read what no read has hashed yet and check the whole blob against its digest.

        Raises :class:`~engine.BlobCorrupt` on a mismatch; a no-op for a
        reader made without a digest, or once ``verified``.
        """
        while self._hash is not None and self._hashed < self.size:
            await self._get(self._hashed, min(self.size, self._hashed + self._chunk_size))
        self._check()

    async def read_range(self, start: int, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the blob (``end`` clamped to its size)."""
        end = self.size if end is None else min(end, self.size)
        if start < 0 or start > end:
            raise ValueError(f"bad range [{start}, {end}) for {self.uri} of {self.size} bytes")
        # Found corrupt before (or empty, so whole before any byte is read): say so.
        self._check()
        if start == end:
            return b""
        return await self._get(start, end)

    async def read(self, n: int = -1) -> bytes:
        self._check()
        end = self.size if n < 0 else min(self.size, self._pos + n)
        if self._pos >= end:
            return b""
        buf_end = self._buf_start + len(self._buf)
        if not (self._buf_start <= self._pos and end <= buf_end):
            # Refill from the position, reading ahead at least one chunk.
            fetch_end = min(self.size, max(end, self._pos + self._chunk_size))
            self._buf = await self._get(self._pos, fetch_end)
            self._buf_start = self._pos
        lo = self._pos - self._buf_start
        data = self._buf[lo : lo + (end - self._pos)]
        self._pos += len(data)
        return data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read(self._chunk_size):
            yield chunk


@runtime_checkable
class BlobStore(Protocol):
    """Where blobs live.  Keys are hex SHA-256 digests of the content.

    Every method is async and safe to call concurrently.  Construction does
    no I/O (stores connect on first use); ``aclose()`` releases connections,
    and ``async with store:`` calls it.
    """

    @property
    def uri(self) -> str:
        """The store's location: ``file:///...`` or ``s3://bucket/prefix``."""
        ...

    def object_uri(self, digest: str) -> str:
        """The URI of the blob ``digest`` in this store."""
        ...

    async def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its digest.  Skips the transfer if already stored."""
        ...

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        """Store the concatenation of ``chunks``; return its digest."""
        ...

    async def put_file(self, path: str | os.PathLike[str]) -> str:
        """Store a file's content; return its digest.  Skips the transfer if already stored."""
        ...

    async def get_bytes(self, digest: str) -> bytes:
        """The blob's content; raises BlobNotFound if it is not stored.

        Raises BlobCorrupt if what is stored does not hash to ``digest``.
        """
        ...

    async def get_file(self, digest: str, dest: str | os.PathLike[str]) -> None:
        """Write the blob to ``dest`` atomically (a temporary file renamed into place).

        The copy is renamed into place only if it hashes to ``digest``;
        otherwise BlobCorrupt is raised and ``dest`` is left as it was.
        """
        ...

    def open(self, digest: str) -> AbstractAsyncContextManager[BlobReader]:
        """``async with store.open(d) as r:`` reads the blob in ranges.

        The reader is given ``digest``, so a full read is checked at its end.
        """
        ...

    async def exists(self, digest: str) -> bool: ...

    async def size(self, digest: str) -> int:
        """The blob's size in bytes; raises BlobNotFound if it is not stored."""
        ...

    async def delete(self, digest: str) -> None:
        """Remove the blob; deleting a blob that is not there is not an error."""
        ...

    def list_digests(self, prefix: str = "") -> AsyncIterator[str]:
        """Digests of stored blobs starting with ``prefix``, in ascending order."""
        ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class ClosingStore:
    """``async with store: ...`` closes the store (``aclose``) at the end."""

    async def aclose(self) -> None:
        """Release what the store holds (connections, clients)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class LocalBlobStore(ClosingStore):
    """Blobs as files in a directory: ``<root>/<first 2 hex>/<digest>``.

    Writes go to a temporary file in ``<root>/tmp``, are flushed to disk
    (``durable=True``, the default, also fsyncs the directory so the rename
    survives a crash) and renamed into place, so a reader never sees a
    partial blob and a crash leaves at most a stray temporary file.
    Every folder is owner-only (0700, whatever the umask), an existing one
    that other users can write to is refused, and blobs are owner-only
    (0600).  Reads are checked against the digest (see the module's
    docstring).  A stored blob whose size is wrong is written again by
    the next put of its content.  Blocking file work runs in worker
    threads, one hop per call.
    """

    def __init__(self, root: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.root = pathlib.Path(root).expanduser().absolute()
        self.durable = durable

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def object_uri(self, digest: str) -> str:
        return self._path(digest).as_uri()

    def _path(self, digest: str) -> pathlib.Path:
        check_digest(digest)
        return self.root / digest[:2] / digest

    def _missing(self, digest: str) -> BlobNotFound:
        return BlobNotFound(
            f"blob {digest} is not in the local blob store {self.uri} "
            f"(no file {self._path(digest)}): it was deleted, or it was written to another "
            "blob store; point the engine's blob_store at the store that holds it"
        )

    def _corrupt(self, digest: str, actual: str) -> BlobCorrupt:
        return corrupt_blob(digest, actual, store=self.uri, where=str(self._path(digest)))

    def _folder(self, name: str) -> pathlib.Path:
        """The store's folder ``name`` (``tmp`` or a shard), made or checked private."""
        return private_folder(self.root, "blob store", name)

    def _holds(self, digest: str, size: int) -> bool:
        """Whether blob ``digest`` is stored with the right size (blocking).

        A stored file of another size is damaged: writing the blob again
        replaces it.  Equal sizes are trusted here, as hashing every stored
        blob on every put would double the cost of storing known content;
        reads check the content.
        """
        try:
            return self._path(digest).stat().st_size == size
        except (FileNotFoundError, NotADirectoryError):
            return False  # not stored (or no store yet): writing it reports what is wrong
        except OSError as exc:
            raise BlobError(
                f"cannot look up blob {digest} in the local blob store {self.uri}: {exc}; "
                f"check the permissions of {self.root}, or choose another blob_store"
            ) from exc

    def _fsync_dir(self, path: pathlib.Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write(self, digest: str, write: Callable[[Any], str]) -> None:
        """Write a blob via ``write(fileobj) -> digest`` into a temp file, then rename.

        ``write`` returns the digest of what it wrote, so a source that
        changed between hashing and copying is caught, not filed wrongly.
        """
        final = self._path(digest)
        tmp_dir = self._folder("tmp")
        self._folder(digest[:2])
        try:
            # mkstemp creates the file 0600, and the rename keeps that mode.
            fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=digest[:16] + ".")
        except OSError as exc:
            raise self._unwritable(digest, exc) from exc
        tmp = pathlib.Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                written = write(fh)
                fh.flush()
                if self.durable:
                    os.fsync(fh.fileno())
            if written != digest:
                raise BlobError(
                    f"content changed while it was stored in {self.uri}: expected sha256 "
                    f"{digest}, wrote {written}; do not modify a file while it is uploaded"
                )
            os.replace(tmp, final)
            if self.durable:
                self._fsync_dir(final.parent)
        except OSError as exc:
            raise self._unwritable(digest, exc) from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _unwritable(self, digest: str, exc: OSError) -> BlobError:
        return BlobError(
            f"cannot write blob {digest} to the local blob store {self.uri}: {exc}; check the "
            f"free space and permissions of {self.root}, or choose another blob_store"
        )

    def _put_bytes_sync(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self._holds(digest, len(data)):

            def write(fh: Any) -> str:
                fh.write(data)
                return digest

            self._write(digest, write)
        return digest

    async def put_bytes(self, data: bytes) -> str:
        return await asyncio.to_thread(self._put_bytes_sync, bytes(data))

    def _put_file_sync(self, path: pathlib.Path) -> str:
        try:
            # Hash first: when the blob is already stored nothing is written.
            digest, size = hash_file(path)
            if not self._holds(digest, size):

                def write(fh: Any) -> str:
                    h = hashlib.sha256()
                    with path.open("rb") as src:
                        while chunk := src.read(CHUNK):
                            h.update(chunk)
                            fh.write(chunk)
                    return h.hexdigest()

                self._write(digest, write)
        except FileNotFoundError as exc:
            raise BlobNotFound(f"cannot store {path} in {self.uri}: no such file") from exc
        except OSError as exc:
            raise BlobError(f"cannot store {path} in {self.uri}: {exc}") from exc
        return digest

    async def put_file(self, path: str | os.PathLike[str]) -> str:
        return await asyncio.to_thread(self._put_file_sync, pathlib.Path(path))

    def _spool_file(self) -> tuple[int, pathlib.Path]:
        tmp_dir = self._folder("tmp")
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="stream.")
        return fd, pathlib.Path(name)

    def _adopt(self, tmp: pathlib.Path, digest: str, size: int) -> None:
        """Rename a complete, synced temp file to the blob ``digest`` unless it is stored."""
        if self._holds(digest, size):
            return
        final = self._path(digest)
        self._folder(digest[:2])
        os.replace(tmp, final)
        if self.durable:
            self._fsync_dir(final.parent)

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        """Spool ``chunks`` to a temporary file while hashing, then file it under its digest."""
        fd, tmp = await asyncio.to_thread(self._spool_file)
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(out.flush)
                if self.durable:
                    await asyncio.to_thread(os.fsync, out.fileno())
            digest = h.hexdigest()
            await asyncio.to_thread(self._adopt, tmp, digest, size)
            return digest
        except OSError as exc:
            raise BlobError(
                f"cannot write a streamed blob to the local blob store {self.uri}: {exc}; "
                f"check the free space and permissions of {self.root}, or choose another "
                "blob_store"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _get_bytes_sync(self, digest: str) -> bytes:
        try:
            data = self._path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise self._missing(digest) from exc
        except OSError as exc:
            raise BlobError(f"cannot read blob {self.object_uri(digest)}: {exc}") from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise self._corrupt(digest, actual)
        return data

    async def get_bytes(self, digest: str) -> bytes:
        return await asyncio.to_thread(self._get_bytes_sync, digest)

    def _get_file_sync(self, digest: str, dest: pathlib.Path) -> None:
        src = self._path(digest)
        try:
            fin = src.open("rb")
        except FileNotFoundError as exc:
            raise self._missing(digest) from exc
        except OSError as exc:
            raise BlobError(f"cannot read blob {self.object_uri(digest)}: {exc}") from exc
        with fin:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            except OSError as exc:
                raise unwritable_destination(dest, self.object_uri(digest), exc) from exc
            tmp = pathlib.Path(tmp_name)
            try:
                # Copied and hashed in one pass; only a copy that matches is renamed
                # into place, so ``dest`` never holds corrupt content.
                h = hashlib.sha256()
                with os.fdopen(fd, "wb") as out:
                    while chunk := fin.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                actual = h.hexdigest()
                if actual != digest:
                    raise self._corrupt(digest, actual)
                os.replace(tmp, dest)
            except OSError as exc:
                raise unwritable_destination(dest, self.object_uri(digest), exc) from exc
            finally:
                tmp.unlink(missing_ok=True)

    async def get_file(self, digest: str, dest: str | os.PathLike[str]) -> None:
        await asyncio.to_thread(self._get_file_sync, digest, pathlib.Path(dest))

    @contextlib.asynccontextmanager
    async def open(self, digest: str) -> AsyncIterator[BlobReader]:
        path = self._path(digest)
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise self._missing(digest) from exc
        try:
            size = os.fstat(fd).st_size

            async def fetch(start: int, end: int) -> bytes:
                data = await asyncio.to_thread(os.pread, fd, end - start, start)
                if len(data) != end - start:
                    raise BlobCorrupt(
                        f"blob {digest} in the blob store {self.uri} is corrupt: {path} "
                        f"shrank to fewer than {end} bytes while it was read; delete it and "
                        "store the data again (run the action that produced it again)"
                    )
                return data

            yield BlobReader(
                uri=path.as_uri(), size=size, fetch=fetch, digest=digest, store_uri=self.uri
            )
        finally:
            os.close(fd)

    async def exists(self, digest: str) -> bool:
        return await asyncio.to_thread(self._path(digest).exists)

    async def size(self, digest: str) -> int:
        try:
            st = await asyncio.to_thread(self._path(digest).stat)
        except FileNotFoundError as exc:
            raise self._missing(digest) from exc
        return st.st_size

    async def delete(self, digest: str) -> None:
        await asyncio.to_thread(self._path(digest).unlink, missing_ok=True)

    def _list_sync(self, prefix: str) -> list[str]:
        if not self.root.is_dir():
            return []
        out: list[str] = []
        for shard in sorted(os.listdir(self.root)):
            # A shard holds digests starting with its two characters, so a
            # prefix rules whole shards out without listing them.
            if len(shard) != 2 or not shard.startswith(prefix[:2]):
                continue
            out.extend(
                name
                for name in sorted(os.listdir(self.root / shard))
                if name.startswith(prefix) and _DIGEST_RE.fullmatch(name)
            )
        return out

    async def list_digests(self, prefix: str = "") -> AsyncIterator[str]:
        for digest in await asyncio.to_thread(self._list_sync, prefix):
            yield digest

    async def aclose(self) -> None:
        """Nothing to release: the local store holds no open files between calls."""


def unwritable_destination(dest: pathlib.Path, source: str, exc: OSError) -> BlobError:
    """The error for a download of ``source`` that cannot be written to ``dest``."""
    return BlobError(
        f"cannot write {dest} from {source}: {exc.strerror or exc}; choose a destination in a "
        "folder you can write to (a file in the way of a folder is not replaced)"
    )


def _local_root(spec: str) -> pathlib.Path:
    if spec.startswith("file://"):
        parts = urlsplit(spec)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"blob store {spec!r}: file:// URIs must name a local path")
        return pathlib.Path(unquote(parts.path))
    return pathlib.Path(spec)


def open_blob_store(
    spec: str | os.PathLike[str] | BlobStore | None, *, home: pathlib.Path
) -> BlobStore:
    """The blob store a setting names.  Cheap: nothing connects until first use.

    - ``None`` or ``""``: a :class:`LocalBlobStore` under ``home / "blobs"``.
    - ``"s3://bucket/prefix"``: an S3 store (``offload._s3.S3BlobStore``),
      with credentials, region and endpoint from the standard AWS
      environment and config files (``AWS_ENDPOINT_URL`` included).
    - any other string or path (``file://`` URIs too): a local store there.
    - an object with the :class:`BlobStore` methods: used as is.
    """
    if spec is None or spec == "":
        return LocalBlobStore(home / "blobs")
    if isinstance(spec, str) and "://" in spec and not spec.startswith("file://"):
        # Other schemes are implemented elsewhere (s3:// in offload), found
        # by name: engine must not import offload or botocore at import time.
        from ._registry import blob_store_class

        store: BlobStore = blob_store_class(spec)(spec)
        return store
    if isinstance(spec, str | os.PathLike):
        return LocalBlobStore(_local_root(os.fspath(spec)))
    if isinstance(spec, BlobStore):
        return spec
    raise ConfigError(
        f"blob_store takes an s3:// URI, a directory path or a BlobStore object, got {spec!r}"
    )


def object_uri(store_uri: str, digest: str) -> str:
    """The URI of blob ``digest`` in the store at ``store_uri`` (``store.object_uri(digest)``).

    Knows the layouts of the shipped stores (local: ``<root>/<2 hex>/<digest>``,
    S3: ``<prefix>/<digest>``); other stores are taken to use ``<uri>/<digest>``.
    """
    check_digest(digest)
    base = store_uri.rstrip("/")
    if base.startswith("file://"):
        return f"{base}/{digest[:2]}/{digest}"
    return f"{base}/{digest}"


def store_uri_of(uri: str, digest: str) -> str:
    """The URI of the store holding the object ``uri``: the inverse of :func:`object_uri`."""
    check_digest(digest)
    if not uri.endswith("/" + digest):
        raise BlobError(f"blob URI {uri!r} does not end with its digest {digest}")
    base = uri[: -len(digest) - 1]
    if base.startswith("file://"):
        root, _, shard = base.rpartition("/")
        if shard != digest[:2]:
            raise BlobError(f"blob URI {uri!r} does not follow the local blob store's layout")
        return root
    return base
