"""engine.File, engine.Dir and engine.DataFrame over both blob stores, and inside runs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import stat
import sys
import tempfile
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import msgspec
import pytest

import engine
from _moto import MotoServer, moto_server, s3_bucket, s3_env
from engine import MissingDependency
from engine._blobs import BlobStore, LocalBlobStore
from engine._errors import BlobCorrupt, BlobError, EngineError
from engine._files import DataFrame, Dir, DirEntry, File
from offload._s3 import S3BlobStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

__all__ = ["moto_server", "s3_bucket", "s3_env"]  # fixtures used by name

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[BlobStore]:
    if request.param == "local":
        async with LocalBlobStore(tmp_path / "blobs") as local:
            yield local
        return
    moto: MotoServer = request.getfixturevalue("moto_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    async with S3BlobStore(
        f"s3://{bucket}/files",
        endpoint_url=moto.endpoint,
        multipart_threshold=6 * MiB,
        part_size=5 * MiB,
    ) as s3:
        yield s3


def gets(moto: MotoServer, mark: int) -> int:
    return sum(r.method == "GET" for r in moto.since(mark))


async def test_file_round_trip(store: BlobStore, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "report.csv"
    src.write_bytes(b"a,b\n1,2\n" * 1000)
    f = await File.from_path(src, store=store)
    assert f.digest == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (f.size, f.name, f.uri) == (src.stat().st_size, "report.csv", store.object_uri(f.digest))
    assert f.store_uri == store.uri
    out = await f.download(tmp_path / "copy.csv", store=store)
    assert out == tmp_path / "copy.csv" and out.read_bytes() == src.read_bytes()
    (tmp_path / "into").mkdir()
    into = await f.download(tmp_path / "into", store=store)
    assert into == tmp_path / "into" / "report.csv" and into.read_bytes() == src.read_bytes()
    assert await f.read_bytes(store=store) == src.read_bytes()
    async with f.open(store=store) as fh:
        assert await fh.read(4) == b"a,b\n"
        assert await fh.read_range(4, 8) == b"1,2\n"
        fh.seek(-4, os.SEEK_END)
        assert await fh.read() == b"1,2\n"


async def test_download_is_cached_by_digest(
    store: BlobStore, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    f = await File.from_bytes(b"cached content", name="../../evil.txt", store=store)
    cache = tmp_path / "cache"
    first = await f.download(store=store, cache_dir=cache)
    assert first.read_bytes() == b"cached content"
    assert first.is_relative_to(cache) and first.name == "evil.txt"
    if isinstance(store, S3BlobStore):
        moto: MotoServer = request.getfixturevalue("moto_server")
        mark = moto.mark()
    else:
        assert isinstance(store, LocalBlobStore)
        await store.delete(f.digest)  # a second fetch would now fail
    second = await f.download(store=store, cache_dir=cache)
    assert second == first and second.read_bytes() == b"cached content"
    if isinstance(store, S3BlobStore):
        assert gets(moto, mark) == 0


async def test_file_is_a_reference_in_msgspec(store: BlobStore) -> None:
    f = await File.from_bytes(b"x" * 10_000, name="x.bin", store=store)
    encoded = msgspec.json.encode(f)
    assert json.loads(encoded) == {
        "type": "engine.File",
        "uri": f.uri,
        "digest": f.digest,
        "size": 10_000,
        "name": "x.bin",
    }
    assert len(encoded) < 300  # the reference, not the 10 kB of content
    both = msgspec.json.decode(encoded, type=File | Dir | DataFrame)
    assert both == f
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(f), type=File) == f
    assert File.__module__ == Dir.__module__ == DataFrame.__module__ == "engine"


async def test_dir_round_trip(store: BlobStore, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "tree"
    files = {
        "a.txt": b"top",
        "sub/b.bin": os.urandom(70_000),
        "sub/deeper/c.txt": b"deep",
        "sub/deeper/same.txt": b"top",  # same content as a.txt: stored once
        "z/empty": b"",
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "emptydir").mkdir()
    d = await Dir.from_path(src, store=store)
    assert [e.path for e in d.files] == sorted(files)
    assert d.size == sum(map(len, files.values()))
    assert len({e.digest for e in d.files}) == len(files) - 1
    walked = dict(d.walk())
    assert set(walked) == set(files)
    for rel, f in walked.items():
        assert await f.read_bytes(store=store) == files[rel]
        assert f.uri == store.object_uri(f.digest)

    out = await d.download(tmp_path / "out", store=store)
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == files

    cached = await d.download(store=store, cache_dir=tmp_path / "cache")
    assert cached.name == d.digest
    assert {p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file()} == set(
        files
    )
    assert [p.name for p in cached.parent.iterdir()] == [d.digest]  # no temp dirs left
    assert await d.download(store=store, cache_dir=tmp_path / "cache") == cached

    again = await Dir.from_path(src, store=store)
    assert again == d  # same tree, same digest
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(d), type=Dir) == d


def tamper(store: BlobStore, digest: str, data: bytes, request: pytest.FixtureRequest) -> None:
    """Replace what ``store`` holds under ``digest``, behind its back."""
    if isinstance(store, LocalBlobStore):
        pathlib.Path(unquote(urlsplit(store.object_uri(digest)).path)).write_bytes(data)
        return
    assert isinstance(store, S3BlobStore)
    client = request.getfixturevalue("moto_server").client()
    try:
        client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{digest}", Body=data)
    finally:
        client.close()


async def test_open_refuses_a_blob_of_another_size(
    store: BlobStore, request: pytest.FixtureRequest
) -> None:
    f = await File.from_bytes(b"the stored content", store=store)
    tamper(store, f.digest, b"longer, replaced content", request)
    with pytest.raises(BlobCorrupt, match=f.digest) as info:
        async with f.open(store=store):
            pass
    assert "24 bytes, not the 18 bytes" in str(info.value)
    with pytest.raises(BlobCorrupt, match=f.digest):
        await f.read_bytes(store=store)


async def test_cached_download_is_checked_on_every_hit(
    store: BlobStore, tmp_path: pathlib.Path
) -> None:
    f = await File.from_bytes(b"cached content", name="data.txt", store=store)
    cache = tmp_path / "cache"
    first = await f.download(store=store, cache_dir=cache)
    attacker = tmp_path / "elsewhere.txt"
    attacker.write_bytes(b"cached content")

    def link_elsewhere(path: pathlib.Path) -> None:
        path.unlink()
        path.symlink_to(attacker)  # right content today, anything tomorrow

    damages: list[Callable[[pathlib.Path], object]] = [
        lambda path: path.write_bytes(b"cached CONTENT"),  # same size: only the hash can tell
        lambda path: path.write_bytes(b"short"),
        link_elsewhere,
    ]
    for damage in damages:
        damage(first)
        with pytest.warns(RuntimeWarning, match="no longer matches its digest") as warned:
            again = await f.download(store=store, cache_dir=cache)
        assert str(first) in str(warned[0].message)
        assert again == first and again.read_bytes() == b"cached content"
        assert not again.is_symlink()
    assert attacker.read_bytes() == b"cached content"  # removed the link, not its target


async def test_cached_tree_is_checked_on_every_hit(
    store: BlobStore, tmp_path: pathlib.Path
) -> None:
    src = tmp_path / "tree"
    files = {"a.txt": b"alpha", "sub/b.txt": b"bravo", "sub/deep/c.txt": b"charlie"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    d = await Dir.from_path(src, store=store)
    cache = tmp_path / "cache"
    cached = await d.download(store=store, cache_dir=cache)

    def swap_folder_for_link(root: pathlib.Path) -> None:
        import shutil

        shutil.move(root / "sub", tmp_path / "moved-sub")
        (root / "sub").symlink_to(tmp_path / "moved-sub")

    damages: list[Callable[[pathlib.Path], object]] = [
        lambda root: (root / "sub" / "b.txt").write_bytes(b"BRAVO"),
        lambda root: (root / "extra.txt").write_bytes(b"not in the manifest"),
        lambda root: (root / "sub" / "deep" / "c.txt").unlink(),
        swap_folder_for_link,
    ]
    for damage in damages:
        damage(cached)
        with pytest.warns(RuntimeWarning, match="no longer matches its digest"):
            again = await d.download(store=store, cache_dir=cache)
        assert again == cached
        got = {
            p.relative_to(again).as_posix(): p.read_bytes() for p in again.rglob("*") if p.is_file()
        }
        assert got == files and not (again / "sub").is_symlink()
    assert [p.name for p in (cache / "dirs").iterdir()] == [d.digest]  # nothing left over


@pytest.fixture
def umask_0() -> Iterator[None]:
    """Run the test with umask 000, so any folder made without an explicit mode is 0777."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask_0")
async def test_download_cache_folders_are_private_whatever_the_umask(
    store: BlobStore, tmp_path: pathlib.Path
) -> None:
    src = tmp_path / "tree"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "sub" / "deep" / "c.txt").write_bytes(b"deep")
    (src / "top.txt").write_bytes(b"top")
    d = await Dir.from_path(src, store=store)
    f = await File.from_bytes(b"one file", name="one.txt", store=store)
    cache = tmp_path / "new" / "cache"
    await f.download(store=store, cache_dir=cache)
    await d.download(store=store, cache_dir=cache)
    folders = [tmp_path / "new", *(p for p in (tmp_path / "new").rglob("*") if p.is_dir())]
    assert len(folders) == 9  # new, cache, files/<2>/<digest>, dirs/<digest>/sub/deep
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {
        str(p): "0o700" for p in folders
    }


async def test_download_cache_refuses_a_folder_others_can_write(
    tmp_path: pathlib.Path,
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    f = await File.from_bytes(b"x", store=store)
    d = Dir.from_entries(store.uri, (DirEntry("x", f.digest, 1),))
    cache = tmp_path / "cache"
    (cache / "files").mkdir(parents=True)
    os.chmod(cache, 0o777)
    for download in (f.download, d.download):
        with pytest.raises(BlobError, match="can be written by other users") as info:
            await download(store=store, cache_dir=cache)
        assert f"download cache {cache} " in str(info.value)
        assert f"chmod 700 {cache}" in str(info.value)
    (tmp_path / "in-the-way").write_text("a file")
    with pytest.raises(BlobError, match="is a file, not a folder"):
        await f.download(store=store, cache_dir=tmp_path / "in-the-way")
    with pytest.raises(BlobError, match="cannot be used: Not a directory"):
        await d.download(store=store, cache_dir=tmp_path / "in-the-way" / "cache")


async def test_default_download_cache_is_the_engines(tmp_path: pathlib.Path) -> None:
    async with engine.Engine(str(tmp_path / "j.db"), home=tmp_path / "home") as eng:
        run = await eng.run(download_to_cache, b"in the cache")
        assert run.status == "succeeded"
        assert pathlib.Path(run.result).is_relative_to(tmp_path / "home" / "cache" / "files")
        assert eng.cache_dir == tmp_path / "home" / "cache"


def test_dir_manifest_cannot_escape() -> None:
    digest = "0" * 64
    for bad in ("../x", "/etc/passwd", "a/../../b", "a//b", ""):
        forged = {
            "type": "engine.Dir",
            "uri": "file:///tmp/blobs",
            "digest": digest,
            "size": 1,
            "files": [[bad, digest, 1]],
        }
        with pytest.raises(msgspec.ValidationError, match="relative"):
            msgspec.json.decode(msgspec.json.encode(forged), type=Dir)
    assert DirEntry("a/b", digest, 1).path == "a/b"


async def test_dir_from_path_needs_a_directory(store: BlobStore, tmp_path: pathlib.Path) -> None:
    with pytest.raises(engine.EngineError, match="not a directory"):
        await Dir.from_path(tmp_path / "missing", store=store)


async def test_dataframe_pandas_round_trip(store: BlobStore, tmp_path: pathlib.Path) -> None:
    import pandas as pd

    df = pd.DataFrame(
        {"x": [1, 2, 3], "name": ["a", "b", "c"]}, index=pd.Index([10, 20, 30], name="id")
    )
    ref = await DataFrame.from_pandas(df, store=store)
    assert (ref.num_rows, ref.columns) == (3, ("x", "name", "id"))
    assert len(msgspec.json.encode(ref)) < 500
    back = await ref.to_pandas(store=store, cache_dir=tmp_path / "cache")
    pd.testing.assert_frame_equal(back, df)


async def test_dataframe_arrow_round_trip(store: BlobStore, tmp_path: pathlib.Path) -> None:
    import pyarrow as pa

    table = pa.table({"a": list(range(1000)), "b": [str(i) for i in range(1000)]})
    ref = await DataFrame.from_arrow(table, store=store)
    decoded = msgspec.json.decode(msgspec.json.encode(ref), type=DataFrame)
    assert (await decoded.to_arrow(store=store, cache_dir=tmp_path / "cache")).equals(table)
    with pytest.raises(TypeError, match=r"pyarrow\.Table"):
        await DataFrame.from_arrow([1, 2], store=store)


async def test_dataframe_without_the_extra(
    store: BlobStore, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd

    ref = await DataFrame.from_pandas(pd.DataFrame({"x": [1]}), store=store)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    for call in (
        lambda: DataFrame.from_pandas(pd.DataFrame({"x": [1]}), store=store),
        lambda: ref.to_arrow(store=store, cache_dir=tmp_path),
        lambda: ref.to_pandas(store=store, cache_dir=tmp_path),
    ):
        with pytest.raises(MissingDependency, match=r"pip install 'shoal\[dataframe\]'") as info:
            await call()
        assert isinstance(info.value, EngineError) and isinstance(info.value, ImportError)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingDependency, match="need pandas"):
        await ref.to_pandas(store=store, cache_dir=tmp_path)


async def test_file_resolves_its_store_in_another_process(
    store: BlobStore, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    f = await File.from_bytes(b"made in the parent", name="msg.txt", store=store)
    env = dict(os.environ, SHOAL_HOME=str(tmp_path / "child-home"))
    env.pop("SHOAL_BLOB_STORE", None)
    if isinstance(store, S3BlobStore):
        env["AWS_ENDPOINT_URL"] = request.getfixturevalue("moto_server").endpoint
    code = (
        "import asyncio, sys, msgspec\n"
        "from engine._files import File\n"
        "f = msgspec.json.decode(sys.argv[1], type=File)\n"
        "async def main():\n"
        "    path = await f.download(sys.argv[2])\n"
        "    async with f.open() as fh:\n"
        "        assert await fh.read_range(0, 4) == b'made'\n"
        "    print(path.read_text())\n"
        "asyncio.run(main())\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        msgspec.json.encode(f).decode(),
        str(tmp_path / "got.txt"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, stderr.decode()
    assert stdout.decode().strip() == "made in the parent"


# -- inside a run ----------------------------------------------------------------


@engine.task
async def write_file(folder: str, n: int) -> File:
    path = pathlib.Path(folder) / "produced.txt"
    path.write_text("payload-" + "q" * n)
    return await File.from_path(path)


@engine.task
async def read_file(f: File) -> str:
    """Receives the reference, fetches the content, returns only its digest."""
    return hashlib.sha256(await f.read_bytes()).hexdigest()


@engine.task
async def pipeline(folder: str, n: int) -> tuple[str, File]:
    f = await write_file(folder, n)
    return await read_file(f), f


def read_journal_files(folder: pathlib.Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("journal.db*")))


@pytest.mark.parametrize("kind", ["local", "s3"])
async def test_file_passes_between_tasks(
    kind: str,
    tmp_path: pathlib.Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if kind == "s3":
        moto: MotoServer = request.getfixturevalue("moto_server")
        bucket: str = request.getfixturevalue("s3_bucket")
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
        spec = f"s3://{bucket}/run-blobs"
    else:
        spec = str(tmp_path / "run-blobs")
    content = ("payload-" + "q" * 100_000).encode()
    async with engine.Engine(
        str(tmp_path / "journal.db"), blob_store=spec, home=tmp_path / "home"
    ) as eng:
        run = await eng.run(pipeline, str(tmp_path), 100_000)
        assert run.status == "succeeded"
        received, f = run.result
        assert received == hashlib.sha256(content).hexdigest()
        assert isinstance(f, File) and f.uri.startswith(eng.blob_store.uri)
        assert await eng.blob_store.get_bytes(f.digest) == content
        local = await f.download(store=eng.blob_store, cache_dir=tmp_path / "cache")
        assert local.read_bytes() == content
    # The journal holds the reference, never the content.
    journal = read_journal_files(tmp_path)
    assert f.digest.encode() in journal
    assert b"q" * 1000 not in journal


# -- a memory engine keeps nothing -----------------------------------------------


@engine.task
async def download_to_cache(data: bytes) -> str:
    return str(await (await File.from_bytes(data)).download())


@engine.task
async def make_data(folder: str) -> tuple[File, Dir, DataFrame, str, int]:
    import pandas as pd

    src = pathlib.Path(folder)
    f = await File.from_path(src / "in.txt")
    d = await Dir.from_path(src / "tree")
    df = await DataFrame.from_pandas(pd.DataFrame({"x": [1, 2, 3]}))
    text = (await f.download()).read_text()  # through the download cache
    count = sum(p.is_file() for p in (await d.download()).rglob("*"))
    assert list((await df.to_pandas())["x"]) == [1, 2, 3]
    return f, d, df, text, count


def tree_of(root: pathlib.Path, *, skip: pathlib.Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if not p.is_relative_to(skip)}


async def test_memory_engine_leaves_nothing_on_disk(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHOAL_HOME")  # the default home: ./.shoal in the working directory
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    inputs = tmp_path / "inputs"
    (inputs / "tree" / "sub").mkdir(parents=True)
    (inputs / "in.txt").write_text("hello")
    (inputs / "tree" / "sub" / "t.txt").write_text("tree")
    before = tree_of(tmp_path, skip=system_tmp)
    async with engine.Engine(store="memory") as eng:
        run = await eng.run(make_data, str(inputs))
        f, d, df, text, count = run.result
        assert (text, count) == ("hello", 1)
        [scratch] = system_tmp.iterdir()
        assert stat.S_IMODE(scratch.stat().st_mode) == 0o700
        assert f.uri.startswith(scratch.as_uri()) and d.uri == df.file.store_uri
        assert await f.read_bytes(store=eng.blob_store) == b"hello"
        assert tree_of(tmp_path, skip=system_tmp) == before  # nothing in the working directory
    assert not (tmp_path / ".shoal").exists()
    assert list(system_tmp.iterdir()) == []  # and nothing left after close
    with pytest.raises(EngineError, match="closed"):
        _ = eng.blob_store


@pytest.mark.parametrize("how", ["argument", "environment"])
async def test_memory_engine_keeps_a_blob_store_it_is_given(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.delenv("SHOAL_HOME")
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    kept = tmp_path / "kept-blobs"
    inputs = tmp_path / "inputs"
    (inputs / "tree").mkdir(parents=True)
    (inputs / "in.txt").write_text("kept")
    (inputs / "tree" / "t.txt").write_text("tree")
    if how == "environment":
        monkeypatch.setenv("SHOAL_BLOB_STORE", str(kept))
        eng = engine.Engine(store="memory")
    else:
        eng = engine.Engine(store="memory", blob_store=kept)
    async with eng:
        run = await eng.run(make_data, str(inputs))
        f = run.result[0]
    assert f.uri == LocalBlobStore(kept).object_uri(f.digest)
    assert await LocalBlobStore(kept).get_bytes(f.digest) == b"kept"
    # Its downloads were still temporary.
    assert not (tmp_path / ".shoal").exists()
    assert list(system_tmp.iterdir()) == []
