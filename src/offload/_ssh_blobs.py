"""``File``/``Dir`` blobs of the engine's local blob store, copied to and from SSH hosts.

An engine whose blob store is a folder on its machine (the default,
``<home>/blobs``, or a ``file://`` store) cannot expect its hosts to read
that folder.  So ``offload.SSH`` copies blobs itself, over the SFTP session
of each host's connection:

- **Out.** Before an attempt is sent, every blob of the engine's store that
  its arguments reference (``File``, each file of a ``Dir``, the file of a
  ``DataFrame``) is put into the host's copy of the store,
  ``<remote_dir>/blobs/<2 hex>/<digest>``, once per host per digest: a
  blob that is there already (with the right size) is not sent again, in
  this run or the next, and attempts needing the same blob at the same
  time wait for one upload.  A blob is written to ``blobs/tmp`` and renamed
  into place, so a reader never sees part of one.
- **On the host.** The workers' blob store is a
  :class:`~offload._mirror.MirrorBlobStore` of that folder, which speaks
  for the engine's store: references have the same URIs on both sides.
- **Back.** Before a result is delivered, every blob of the engine's store
  that it references and that this machine does not hold is fetched from
  the host's copy (SFTP get into the store's ``tmp``), checked against its
  SHA-256 and only then renamed into the engine's store.

With an S3 blob store nothing is copied (the workers get
``SHOAL_BLOB_STORE`` and read S3 themselves); with any other store an
attempt whose arguments or result reference one of its blobs fails with
``engine.OffloadError``, saying what to use instead.

How references are found: the encoded value is searched, never run.  A
msgpack value is decoded untyped and walked (a ``File`` is a map tagged
``engine.File``, a ``Dir`` one tagged ``engine.Dir`` with its manifest);
a pickled one is read with :mod:`pickletools` (the strings it holds: a
``File``'s object URI, or a ``Dir``'s store URI beside its entries'
digests).  A value that does not mention the store's URI at all, the usual
case, costs one substring search.  A digest found that is in neither
store is left alone: reading it then says which blob is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickletools
import re
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlsplit

import msgspec

from engine import OffloadError
from engine.extend import corrupt_blob, hash_file, private_folder, run_bounded

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import asyncssh

    from engine.extend import Outcome, Payload

    from ._ssh_link import _Link

__all__ = ["BlobCopies", "HostBlobs", "referenced"]

#: Blobs copied at once per host (each an SFTP transfer of its own, many requests in flight).
PARALLEL: Final = 8
#: SFTP requests in flight per transfer, each of the server's largest block
#: (OpenSSH: 255 KiB), so 16 MiB in flight: asyncssh's default (16 requests,
#: 4 MiB) would hold a link with 40 ms round trips to about 100 MiB/s.
MAX_REQUESTS: Final = 64

_DIGEST = re.compile(r"[0-9a-f]{64}")
_ANY = msgspec.msgpack.Decoder()


def referenced(kind: str, data: bytes, store_uri: str) -> set[str]:
    """Digests of blobs of the store at ``store_uri`` that an encoded value (``encode_value``) references."""
    store_uri = store_uri.rstrip("/")
    if not store_uri or store_uri.encode() not in data:
        return set()
    if kind == "pickle":
        return _in_pickle(data, store_uri)
    try:
        value = _ANY.decode(data)
    except msgspec.DecodeError:
        return _in_strings(_strings_of_bytes(data), store_uri)
    found: set[str] = set()
    _walk(value, store_uri, found)
    return found


def _walk(value: Any, store_uri: str, found: set[str]) -> None:
    # Iterative: a deeply nested value must not exhaust the stack.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            tag = item.get("type")
            if tag == "engine.File":
                digest = item.get("digest")
                if isinstance(digest, str) and item.get("uri") == _object_uri(store_uri, digest):
                    found.add(digest)
            elif tag == "engine.Dir" and item.get("uri") == store_uri:
                for entry in item.get("files") or ():
                    if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], str) \
                            and _DIGEST.fullmatch(entry[1]):
                        found.add(entry[1])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _object_uri(store_uri: str, digest: str) -> str:
    return f"{store_uri}/{digest[:2]}/{digest}"


def _in_pickle(data: bytes, store_uri: str) -> set[str]:
    try:
        strings = [arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)]
    except Exception:  # not a pickle after all: search its bytes
        strings = list(_strings_of_bytes(data))
    return _in_strings(strings, store_uri)


def _strings_of_bytes(data: bytes) -> Iterator[str]:
    pattern = rb"file://[^\x00-\x20\"'\\]+|[0-9a-f]{64}"
    for match in re.finditer(pattern, data):
        yield match.group().decode("utf-8", "replace")


def _in_strings(strings: Iterable[str], store_uri: str) -> set[str]:
    """A ``File``'s object URI names its digest; a ``Dir``'s store URI brings every digest beside it."""
    strings = list(strings)
    prefix = store_uri + "/"
    found = {
        s[-64:]
        for s in strings
        if s.startswith(prefix) and _DIGEST.fullmatch(s[-64:]) and s == _object_uri(store_uri, s[-64:])
    }
    if store_uri in strings:
        found.update(s for s in strings if _DIGEST.fullmatch(s))
    return found


class HostBlobs:
    """The blobs of the engine's local store on one host: sent once per digest, brought back checked."""

    def __init__(self, link: _Link, root: Path) -> None:
        self.link = link
        #: The engine's local store (``<root>/<2 hex>/<digest>``).
        self.root = root
        #: Blobs sent to the host, and their bytes (one already there is not counted).
        self.uploads = 0
        self.uploaded_bytes = 0
        #: Blobs brought back from the host into the engine's store, and their bytes.
        self.downloads = 0
        self.downloaded_bytes = 0
        # Invariant: ``_there`` maps each digest that is in the host's copy,
        # or being put there, over the connection ``_of``, to the task that
        # put it there or found it there; a failed one is dropped (tried
        # again by the next attempt that needs it).  Another connection may
        # be another boot of the host (a tmpfs gone): it starts afresh.
        self._there: dict[str, asyncio.Future[None]] = {}
        self._of: Any = None
        # Folders of the host's copy made over the connection ``_of``.
        self._folders: set[str] = set()
        # Invariant: ``_coming`` holds the fetch of each digest being brought
        # back now (results that name the same blob wait for one fetch).
        self._coming: dict[str, asyncio.Task[None]] = {}
        # At most PARALLEL transfers per host at once: a Dir of many files
        # must not open thousands of SFTP transfers together.
        self._turn = asyncio.Semaphore(PARALLEL)

    def _local(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def _fresh(self) -> None:
        if self._of is not self.link._conn:
            self._of = self.link._conn
            self._there = {}
            self._folders = set()

    async def send(self, digests: Iterable[str]) -> None:
        """Make sure each blob is in the host's copy (those this machine holds; others are left to fail there)."""
        wanted = sorted(digests)
        sizes = await asyncio.to_thread(self._sizes, wanted)
        self._fresh()
        tasks: list[asyncio.Future[None]] = []
        for digest, size in zip(wanted, sizes, strict=True):
            if size is None:
                continue
            task = self._there.get(digest)
            if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
                task = asyncio.get_running_loop().create_task(self._put(digest, size))
                self._there[digest] = task
            tasks.append(task)
        await self._all(tasks)

    def _sizes(self, digests: list[str]) -> list[int | None]:
        sizes: list[int | None] = []
        for digest in digests:
            try:
                sizes.append(self._local(digest).stat().st_size)
            except OSError:
                sizes.append(None)
        return sizes

    async def _all(self, tasks: list[asyncio.Future[None]]) -> None:
        """Wait for every task (shielded: another attempt may wait for the same blob); the first failure is raised."""
        for task in tasks:
            await asyncio.shield(task)

    async def _put(self, digest: str, size: int) -> None:
        async with self._turn:
            sftp, folder = await self._session()
            remote = f"{folder}/{digest[:2]}/{digest}"
            if await self._size_there(sftp, remote) == size:
                return
            await self._folder(sftp, f"{folder}/tmp")
            await self._folder(sftp, f"{folder}/{digest[:2]}")
            part = f"{folder}/tmp/{digest[:16]}.{secrets.token_hex(4)}.part"
            try:
                with self._sftp_errors(f"uploading blob {digest[:12]} ({size} bytes) to {remote}"):
                    await sftp.put(str(self._local(digest)), part, max_requests=MAX_REQUESTS)
                    await sftp.posix_rename(part, remote)
            except Exception:
                with contextlib.suppress(Exception):  # best effort: a part left there only takes space
                    await sftp.remove(part)
                raise
            self.uploads += 1
            self.uploaded_bytes += size

    async def fetch(self, digests: Iterable[str]) -> None:
        """Bring each blob this machine lacks from the host's copy into the engine's store, checked."""
        wanted = sorted(digests)
        sizes = await asyncio.to_thread(self._sizes, wanted)
        missing = [d for d, size in zip(wanted, sizes, strict=True) if size is None]
        if missing:
            self._fresh()
            await run_bounded(self._get, missing, limit=PARALLEL)

    async def _get(self, digest: str) -> None:
        task = self._coming.get(digest)
        if task is None:
            task = self._coming[digest] = asyncio.get_running_loop().create_task(self._get_now(digest))
            task.add_done_callback(lambda done: self._coming.pop(digest, None))
        await asyncio.shield(task)

    async def _get_now(self, digest: str) -> None:
        async with self._turn:
            await self._get_one(digest)

    async def _get_one(self, digest: str) -> None:
        sftp, folder = await self._session()
        remote = f"{folder}/{digest[:2]}/{digest}"
        size = await self._size_there(sftp, remote)
        if size is None:
            return  # not made there either: reading it says which blob is missing
        tmp_dir = await asyncio.to_thread(private_folder, self.root, "blob store", "tmp")
        fd, name = await asyncio.to_thread(tempfile.mkstemp, dir=tmp_dir, prefix=f"{digest[:16]}.")
        os.close(fd)
        tmp = Path(name)
        try:
            with self._sftp_errors(f"fetching blob {digest[:12]} ({size} bytes) from {remote}"):
                await sftp.get(remote, str(tmp), max_requests=MAX_REQUESTS)
            await asyncio.to_thread(self._adopt, tmp, digest, remote)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        self.downloads += 1
        self.downloaded_bytes += size
        if digest not in self._there:  # the host has it: never sent back there
            there: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            there.set_result(None)
            self._there[digest] = there

    def _adopt(self, tmp: Path, digest: str, remote: str) -> None:
        """Rename a fetched blob into the engine's store once it hashes to its digest (blocking)."""
        actual, _ = hash_file(tmp)
        if actual != digest:
            raise corrupt_blob(
                digest, actual, store=f"{self.root.as_uri()} (its copy on host {self.link.host})",
                where=f"{remote} on host {self.link.host}",
            )
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        shard = private_folder(self.root, "blob store", digest[:2])
        os.replace(tmp, shard / digest)
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- the SFTP side ----------------------------------------------------------------

    async def _session(self) -> tuple[asyncssh.SFTPClient, str]:
        facts = await self.link.prepare()
        return await self.link.sftp(), f"{facts.dir}/blobs"

    async def _size_there(self, sftp: asyncssh.SFTPClient, path: str) -> int | None:
        import asyncssh

        with self.link._mapped(f"looking for blob {path}"):
            try:
                attrs = await sftp.stat(path)
            except asyncssh.SFTPNoSuchFile:
                return None
        return attrs.size

    async def _folder(self, sftp: asyncssh.SFTPClient, path: str) -> None:
        """Make a folder of the host's copy, owner-only, once per connection."""
        if path in self._folders:
            return
        import asyncssh

        with self._sftp_errors(f"making the folder {path}"):
            await sftp.makedirs(path, attrs=asyncssh.SFTPAttrs(permissions=0o700), exist_ok=True)
        self._folders.add(path)

    @contextlib.contextmanager
    def _sftp_errors(self, doing: str) -> Iterator[None]:
        """A refusal of the host's SFTP server is an OffloadError (not retried); a lost connection, HostLost."""
        import asyncssh

        link = self.link
        with link._mapped(doing):
            try:
                yield
            except asyncssh.SFTPConnectionLost:
                raise
            except asyncssh.SFTPError as exc:
                raise OffloadError(
                    f"host {link.host}: {doing} failed: {exc.reason or exc}; check the free "
                    f"space and permissions of offload.SSH remote_dir={link.target.remote_dir!r} "
                    f"there, or give remote_dir= another folder"
                ) from exc


class BlobCopies:
    """What ``offload.SSH`` does with the ``File``/``Dir`` blobs of its attempts, by the engine's store (see the module)."""

    def __init__(self, store_uri: str | None) -> None:
        self.store_uri = (store_uri or "").rstrip("/")
        #: The engine's local store folder, when that is what the store is (else None).
        self.root: Path | None = None
        if self.store_uri.startswith("file://"):
            parts = urlsplit(self.store_uri)
            self.root = Path(unquote(parts.path))
        # Invariant: one HostBlobs per link of the open target, made when first needed.
        self._hosts: dict[_Link, HostBlobs] = {}

    @property
    def s3(self) -> bool:
        return self.store_uri.startswith("s3://")

    def on(self, link: _Link) -> HostBlobs:
        """The blobs of one host (its counters say what was sent and fetched)."""
        assert self.root is not None
        blobs = self._hosts.get(link)
        if blobs is None:
            blobs = self._hosts[link] = HostBlobs(link, self.root)
        return blobs

    def worker_env(self) -> dict[str, str]:
        """What the workers' environment needs for their blob store: an S3 store's URI."""
        return {"SHOAL_BLOB_STORE": self.store_uri} if self.s3 else {}

    def worker_args(self) -> list[str]:
        """What ``python -m offload.worker`` needs for it: a local store is copied under its cache."""
        return ["--blobs-of", self.store_uri] if self.root is not None else []

    def needed(self, payload: Payload) -> set[str]:
        """The blobs to send for an attempt; refuses blobs of a store that can be neither sent nor read there."""
        if self.s3:
            return set()
        if self.root is None:
            if self._mentioned(payload.args):
                raise self._refusal(payload, "its arguments reference")
            return set()
        return referenced(payload.args_kind, payload.args, self.store_uri)

    async def send(self, link: _Link, digests: set[str]) -> None:
        if digests:
            await self.on(link).send(digests)

    async def bring_back(self, link: _Link, payload: Payload, outcome: Outcome) -> None:
        """Fetch the blobs a result references that this machine lacks (before it is delivered)."""
        if self.s3 or not outcome.ok:
            return
        if self.root is None:
            if self._mentioned(outcome.value):
                raise self._refusal(payload, "its result references")
            return
        found = referenced(outcome.value_kind, outcome.value, self.store_uri)
        if found:
            await self.on(link).fetch(found)

    def _mentioned(self, data: bytes) -> bool:
        # Another store lays its blobs out as it likes: any mention of it counts.
        return bool(self.store_uri) and self.store_uri.encode() in data

    def _refusal(self, payload: Payload, what: str) -> OffloadError:
        return OffloadError(
            f"attempt {payload.attempt} of action {payload.key} of task {payload.task!r}: {what} "
            f"engine.File or engine.Dir data of the blob store {self.store_uri}, which offload.SSH "
            f"hosts can neither read (as they read an s3:// store) nor be sent (as blobs of a local "
            f"folder store are, over SFTP); give the engine blob_store='s3://bucket/prefix' or a "
            f"folder, or pass the data by value"
        )
