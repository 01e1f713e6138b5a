"""``engine.File``, ``engine.Dir`` and ``engine.DataFrame``: references to data in a blob store.

Each is a frozen, tagged msgspec Struct holding only where the data is and
what it is (URI, SHA-256 digest, size), so a task can return one, the
journal records it as those few fields, and another task (or process)
receives it and fetches the bytes when it needs them.  The bytes are never
copied into the journal.

Downloads without a destination go to a cache keyed by digest
(``<home>/cache``; a memory engine's temporary folder).  Its folders are
owner-only, and a cached copy is hashed again on every hit: one that no
longer matches its digest (changed, damaged) is dropped, with a
``RuntimeWarning``, and fetched again.

Which store: an explicit ``store=`` argument; otherwise the blob store of
the current engine (``engine._context.current_engine()``).  A reference
written by a store that is not the current one (another process, another
engine) is read by opening a store from its URI (``file://`` or ``s3://``)
for the duration of the call.

No ``from __future__ import annotations`` here: msgspec resolves field
annotations in the namespace of ``cls.__module__``, which is the public
``engine`` package, so fields must hold real classes, not strings.
"""

import asyncio
import contextlib
import hashlib
import os
import pathlib
import shutil
import stat
import tempfile
import warnings
from typing import TYPE_CHECKING, Any

import msgspec

from ._blobs import (
    hash_file,
    object_uri,
    open_blob_store,
    private_folder,
    run_bounded,
    store_uri_of,
    unwritable_destination,
)
from ._errors import BlobCorrupt, BlobError, MissingDependency

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from ._blobs import BlobReader, BlobStore

__all__ = ["DataFrame", "Dir", "DirEntry", "File", "MissingDependency"]

#: Files transferred at once by Dir.from_path / Dir.download.
DIR_CONCURRENCY = 32


def _current_store() -> "BlobStore":
    from ._context import current_engine

    return current_engine().blob_store


#: What a download-cache folder is called in errors.
_CACHE = "download cache"


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser().absolute()
    from ._context import current_engine

    return current_engine().cache_dir


@contextlib.asynccontextmanager
async def _holding(store_uri: str, store: "BlobStore | None") -> "AsyncIterator[BlobStore]":
    """The store to read objects of ``store_uri`` from, closed afterwards if opened here."""
    if store is not None:
        yield store
        return
    current = _current_store()
    if current.uri == store_uri:
        yield current
        return
    # Written by another store (another engine or process): open that one.
    other = open_blob_store(store_uri, home=pathlib.Path())
    try:
        yield other
    finally:
        await other.aclose()


def _safe_name(name: str, fallback: str) -> str:
    """A single path component to save a download under; never ``..`` or a path."""
    base = pathlib.PurePosixPath(name.replace("\\", "/")).name
    return base if base not in ("", ".", "..") else fallback


def _cached_file_ok(path: pathlib.Path, digest: str, size: int) -> bool | None:
    """Whether the cached copy at ``path`` holds blob ``digest``: None when there is none.

    A copy that does not hash to its digest (or is not a plain file) is
    removed here, so the caller fetches the blob again.  Blocking.
    """
    try:
        st = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None  # making the cache's folders reports a file in the way
    if stat.S_ISREG(st.st_mode) and st.st_size == size and hash_file(path) == (digest, size):
        return True
    _drop(path)
    return False


def _cached_tree_ok(root: pathlib.Path, files: "tuple[DirEntry, ...]") -> bool | None:
    """Whether the cached tree at ``root`` is exactly ``files``: None when there is none.

    Exactly: every file there, with its content, and nothing else (no
    extra file, no link).  A tree that differs is removed.  Blocking.
    """
    if not os.path.lexists(root):
        return None
    expected = {e.path: e for e in files}
    if (
        not root.is_symlink()
        and root.is_dir()
        and _tree_shape(root, expected)
        and all(hash_file(root / rel) == (e.digest, e.size) for rel, e in expected.items())
    ):
        return True
    _drop(root)
    return False


def _tree_shape(root: pathlib.Path, expected: "dict[str, DirEntry]") -> bool:
    """Whether ``root`` holds plain files at exactly the paths of ``expected``, sizes right."""
    found = 0
    for folder, dirnames, filenames in os.walk(root):
        base = pathlib.Path(folder)
        if any((base / d).is_symlink() for d in dirnames):
            return False
        for name in filenames:
            entry = expected.get((base / name).relative_to(root).as_posix())
            st = (base / name).lstat()
            if entry is None or not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
                return False
            found += 1
    return found == len(expected)


def _drop(path: pathlib.Path) -> None:
    """Remove a damaged cache entry (a file or a tree) so that it is fetched again."""
    try:
        if path.is_dir() and not path.is_symlink():
            # Renamed away first: a concurrent download sees no entry rather than half of one.
            doomed = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=".damaged."))
            try:
                os.rename(path, doomed / path.name)
            finally:
                shutil.rmtree(doomed, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass  # another download removed it first
    except OSError as exc:
        raise BlobError(
            f"the {_CACHE} entry {path} is damaged and cannot be removed ({exc.strerror}); "
            "remove it by hand, or pass another cache_dir"
        ) from exc


def _warn_dropped(path: pathlib.Path, what: str) -> None:
    warnings.warn(
        f"the cached copy {path} of {what} no longer matches its digest (it was changed or "
        "damaged); it was removed and is downloaded again",
        RuntimeWarning,
        stacklevel=3,
    )


class File(msgspec.Struct, frozen=True, tag="engine.File"):
    """A reference to one file's bytes in a blob store.

    ``uri`` locates the object (``file:///.../<digest>`` or
    ``s3://bucket/prefix/<digest>``), ``digest`` is the SHA-256 of the
    content, ``size`` its length and ``name`` the original file name (used
    when the file is downloaded to a cache path).  Creating a File uploads
    the content unless the store already holds that digest.
    """

    uri: str
    digest: str
    size: int
    name: str = ""

    @classmethod
    async def from_path(
        cls, path: str | os.PathLike[str], *, store: "BlobStore | None" = None
    ) -> "File":
        """Upload the file at ``path`` (skipped when its digest is stored) and refer to it."""
        path = pathlib.Path(path)
        store = store if store is not None else _current_store()
        digest = await store.put_file(path)
        size = (await asyncio.to_thread(path.stat)).st_size
        return cls(store.object_uri(digest), digest, size, path.name)

    @classmethod
    async def from_bytes(
        cls, data: bytes, *, name: str = "", store: "BlobStore | None" = None
    ) -> "File":
        """Store ``data`` and refer to it."""
        store = store if store is not None else _current_store()
        digest = await store.put_bytes(data)
        return cls(store.object_uri(digest), digest, len(data), name)

    @property
    def store_uri(self) -> str:
        """The URI of the store that holds this file."""
        return store_uri_of(self.uri, self.digest)

    async def read_bytes(self, *, store: "BlobStore | None" = None) -> bytes:
        """The whole content, in memory."""
        async with _holding(self.store_uri, store) as s:
            return await s.get_bytes(self.digest)

    @contextlib.asynccontextmanager
    async def open(self, *, store: "BlobStore | None" = None) -> "AsyncIterator[BlobReader]":
        """Stream the content: ``async with f.open() as fh: await fh.read(n)``.

        The reader supports ``seek``/``tell``, ``read_range(start, end)`` and
        ``async for chunk in fh``; see :class:`engine._blobs.BlobReader`.
        """
        async with _holding(self.store_uri, store) as s, s.open(self.digest) as reader:
            if reader.size != self.size:
                raise BlobCorrupt(
                    f"blob {self.digest} in the blob store {self.store_uri} is corrupt: "
                    f"{reader.uri} holds {reader.size} bytes, not the {self.size} bytes of "
                    "the file it was stored from; delete it and store the data again (run "
                    "the action that produced it again)"
                )
            yield reader

    async def download(
        self,
        dest: str | os.PathLike[str] | None = None,
        *,
        store: "BlobStore | None" = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> pathlib.Path:
        """Write the content to a local file and return its path.

        With ``dest`` the file is written there (into it, under ``name``, if
        ``dest`` is a directory), replacing what was there.  Without, it goes
        to a cache keyed by digest (``<home>/cache/files/...``, or under
        ``cache_dir``) and is downloaded only once; treat that copy as
        read-only, as other Files with the same content share it.  A cached
        copy is hashed on every hit; one that was changed is replaced.
        """
        if dest is not None:
            target = pathlib.Path(dest)
            if await asyncio.to_thread(target.is_dir):
                target = target / _safe_name(self.name, self.digest)
        else:
            root = _cache_root(cache_dir)
            target = root / "files" / self.digest[:2] / self.digest / _safe_name(self.name, "data")
            intact = await asyncio.to_thread(_cached_file_ok, target, self.digest, self.size)
            if intact:
                return target
            if intact is False:
                _warn_dropped(target, f"blob {self.digest}")
            await asyncio.to_thread(
                private_folder, root, _CACHE, "files", self.digest[:2], self.digest
            )
        async with _holding(self.store_uri, store) as s:
            await s.get_file(self.digest, target)
        return target


class DirEntry(msgspec.Struct, frozen=True, array_like=True):
    """One file of a :class:`Dir`: its path relative to the directory, digest and size.

    Untagged and encoded as an array: it only ever appears inside
    ``Dir.files``, and big manifests stay compact.
    """

    path: str
    digest: str
    size: int

    def __post_init__(self) -> None:
        # Checked on decode too, so a forged manifest cannot write outside the
        # destination directory.
        parts = self.path.split("/")
        if self.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"Dir entry path {self.path!r} must be relative, without '..'")


class Dir(msgspec.Struct, frozen=True, tag="engine.Dir"):
    """A reference to a directory tree: a manifest of files stored in a blob store.

    ``uri`` is the store holding the files, ``files`` the manifest (relative
    POSIX path, digest, size; sorted by path), ``size`` the total bytes and
    ``digest`` the SHA-256 of the manifest, so equal trees have equal
    digests.  Only regular files are recorded: empty directories are not
    kept; symbolic links to files are stored as the files they point to,
    and symbolic links to directories are not followed.
    """

    uri: str
    digest: str
    size: int
    files: tuple[DirEntry, ...]

    @classmethod
    async def from_path(
        cls,
        path: str | os.PathLike[str],
        *,
        store: "BlobStore | None" = None,
        concurrency: int = DIR_CONCURRENCY,
    ) -> "Dir":
        """Upload every file under ``path`` (files already stored are skipped)."""
        root = pathlib.Path(path)
        if not await asyncio.to_thread(root.is_dir):
            raise BlobError(f"Dir.from_path({str(root)!r}): not a directory")
        store = store if store is not None else _current_store()
        found = await asyncio.to_thread(_list_files, root)

        async def upload(rel: str) -> DirEntry:
            full = root / rel
            digest = await store.put_file(full)
            size = (await asyncio.to_thread(full.stat)).st_size
            return DirEntry(rel, digest, size)

        entries = tuple(await run_bounded(upload, found, limit=concurrency))
        return cls.from_entries(store.uri, entries)

    @classmethod
    def from_entries(cls, uri: str, entries: tuple[DirEntry, ...]) -> "Dir":
        """A Dir of files already in the store at ``uri``."""
        entries = tuple(sorted(entries, key=lambda e: e.path))
        digest = hashlib.sha256(msgspec.msgpack.encode(entries)).hexdigest()
        return cls(uri, digest, sum(e.size for e in entries), entries)

    def walk(self) -> "Iterator[tuple[str, File]]":
        """``(relative path, File)`` for every file, sorted by path; no I/O."""
        for e in self.files:
            yield e.path, File(object_uri(self.uri, e.digest), e.digest, e.size, e.path)

    async def download(
        self,
        dest: str | os.PathLike[str] | None = None,
        *,
        store: "BlobStore | None" = None,
        cache_dir: str | os.PathLike[str] | None = None,
        concurrency: int = DIR_CONCURRENCY,
    ) -> pathlib.Path:
        """Recreate the tree locally and return its root.

        With ``dest`` the files are written under it (existing files with
        the same paths are replaced, others left alone).  Without, the tree
        goes to a cache keyed by the manifest digest (``<home>/cache/dirs/``
        or under ``cache_dir``), built in a temporary directory and renamed
        into place, so a cached tree is always complete.  A cached tree is
        checked on every hit (every file hashed, nothing extra); one that
        was changed is replaced.
        """
        if dest is not None:
            target = pathlib.Path(dest)
            await self._fetch_into(target, store, concurrency)
            return target
        dirs = await asyncio.to_thread(private_folder, _cache_root(cache_dir), _CACHE, "dirs")
        final = dirs / self.digest
        intact = await asyncio.to_thread(_cached_tree_ok, final, self.files)
        if intact:
            return final
        if intact is False:
            _warn_dropped(final, f"the tree {self.digest}")
        tmp = pathlib.Path(await asyncio.to_thread(_private_tree, dirs, self))
        try:
            await self._fetch_into(tmp, store, concurrency)
            try:
                await asyncio.to_thread(os.rename, tmp, final)
            except OSError as exc:
                # Another download finished first; its tree is identical.
                if not await asyncio.to_thread(final.is_dir):
                    raise unwritable_destination(final, self.uri, exc) from exc
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, ignore_errors=True)
        return final

    async def _fetch_into(
        self, target: pathlib.Path, store: "BlobStore | None", concurrency: int
    ) -> None:
        async with _holding(self.uri, store) as s:

            async def fetch(entry: DirEntry) -> None:
                await s.get_file(entry.digest, target.joinpath(*entry.path.split("/")))

            await run_bounded(fetch, self.files, limit=concurrency)


def _private_tree(dirs: pathlib.Path, tree: Dir) -> str:
    """A new temporary folder in ``dirs`` holding ``tree``'s folders, all 0700 (blocking).

    Made here rather than by the stores' downloads, which create missing
    folders with the umask's mode, as for any destination a user names.
    """
    try:
        tmp = tempfile.mkdtemp(dir=dirs, prefix=f".{tree.digest[:16]}.")
    except OSError as exc:
        raise unwritable_destination(dirs / tree.digest, tree.uri, exc) from exc
    for parts in sorted({tuple(e.path.split("/")[:-1]) for e in tree.files}):
        if parts:
            private_folder(pathlib.Path(tmp), _CACHE, *parts)
    return tmp


def _list_files(root: pathlib.Path) -> list[str]:
    out: list[str] = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = pathlib.Path(folder)
        for name in filenames:
            if (base / name).is_file():
                out.append((base / name).relative_to(root).as_posix())
    return sorted(out)


_EXTRA = "pip install 'shoal[dataframe]'"


def _pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or MissingDependency naming the extra."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise MissingDependency(
            f"engine.DataFrame needs pyarrow, which is not installed ({exc}); {_EXTRA}"
        ) from exc
    return pyarrow, pyarrow.parquet


def _require_pandas() -> None:
    try:
        import pandas  # noqa: F401
    except ImportError as exc:
        raise MissingDependency(
            f"engine.DataFrame.to_pandas/from_pandas need pandas, which is not installed "
            f"({exc}); {_EXTRA}"
        ) from exc


class DataFrame(msgspec.Struct, frozen=True, tag="engine.DataFrame"):
    """A reference to a table stored as one Parquet file in the blob store.

    ``await DataFrame.from_pandas(df)`` / ``from_arrow(table)`` write and
    upload it; ``await ref.to_pandas()`` / ``to_arrow()`` download it (once,
    into the cache) and read it.  Nothing is loaded until asked for.  The
    pandas index is kept (pyarrow's pandas metadata).  Needs the
    ``shoal[dataframe]`` extra; without it these methods raise
    :class:`MissingDependency`.
    """

    file: File
    num_rows: int
    columns: tuple[str, ...]

    @classmethod
    async def from_arrow(cls, table: Any, *, store: "BlobStore | None" = None) -> "DataFrame":
        """Store a ``pyarrow.Table`` as Parquet."""
        pa, pq = _pyarrow()
        if not isinstance(table, pa.Table):
            raise TypeError(f"DataFrame.from_arrow takes a pyarrow.Table, got {type(table)!r}")
        return await cls._store(table, pq, store)

    @classmethod
    async def from_pandas(cls, df: Any, *, store: "BlobStore | None" = None) -> "DataFrame":
        """Store a ``pandas.DataFrame`` as Parquet (index included)."""
        _require_pandas()
        pa, pq = _pyarrow()
        table = await asyncio.to_thread(pa.Table.from_pandas, df)
        return await cls._store(table, pq, store)

    @classmethod
    async def _store(cls, table: Any, pq: Any, store: "BlobStore | None") -> "DataFrame":
        with tempfile.TemporaryDirectory(prefix="shoal-df-") as tmp:
            path = pathlib.Path(tmp) / "data.parquet"
            await asyncio.to_thread(pq.write_table, table, path)
            file = await File.from_path(path, store=store)
        return cls(file, table.num_rows, tuple(str(c) for c in table.column_names))

    async def to_arrow(
        self,
        *,
        store: "BlobStore | None" = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Any:
        """The table as a ``pyarrow.Table``."""
        _, pq = _pyarrow()
        path = await self.file.download(store=store, cache_dir=cache_dir)
        return await asyncio.to_thread(pq.read_table, path)

    async def to_pandas(
        self,
        *,
        store: "BlobStore | None" = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Any:
        """The table as a ``pandas.DataFrame``."""
        _require_pandas()
        table = await self.to_arrow(store=store, cache_dir=cache_dir)
        return await asyncio.to_thread(table.to_pandas)
