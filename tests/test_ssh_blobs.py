"""``File``/``Dir`` data of offloaded attempts on SSH hosts, against real OpenSSH servers.

With the engine's local blob store, the blobs an attempt's arguments
reference go to the host over SFTP (once per digest) and the ones its
result references come back, checked, before the result is delivered.
The host is the rig's "honest" one (``_sshd``): it cannot see this test's
folders, so what it reads must have travelled.  With an S3 store the
host reads S3 itself; any other store is refused with what to do.
"""

from __future__ import annotations

import hashlib
import pickle
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

import _ssh_tasks as t
import engine
import offload
from _moto import moto_server, s3_bucket, s3_env  # noqa: F401
from engine.extend import encode_value
from offload._ssh_blobs import HostBlobs, referenced

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from _moto import MotoServer
    from _sshd import SSHHost, SSHRig


def lab(rig: SSHRig, host: SSHHost, **options: Any) -> offload.SSH:
    return offload.SSH(
        [host.spec], known_hosts=str(rig.known_hosts), client_keys=[str(rig.client_key)], workers=2, **options
    )


@pytest.fixture
async def eng(sshd_rig: SSHRig, honest_host: SSHHost, tmp_path: Path) -> AsyncIterator[engine.Engine]:
    """A journaled engine (its blob store: a folder under its home) whose target "lab" is the honest host."""
    async with engine.Engine(home=tmp_path / "home", targets={"lab": lab(sshd_rig, honest_host)}) as e:
        yield e


def blobs_on(eng: engine.Engine, host: SSHHost) -> HostBlobs:
    backend: offload.SSH = eng.targets["lab"]
    return backend._copies.on(backend._link(host.spec))


async def host_run(eng: engine.Engine, host: SSHHost, command: str) -> str:
    backend: offload.SSH = eng.targets["lab"]
    done = await backend._link(host.spec).run(command)
    assert done.exit_status == 0, done
    return done.stdout


# -- finding references (no server) ----------------------------------------------------------


STORE = "file:///proj/.shoal/blobs"


def test_references_to_the_store_are_found_in_msgpack_and_pickled_values() -> None:
    a, b, c, other = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
    file = engine.File(f"{STORE}/aa/{a}", a, 1, "x")
    tree = engine.Dir.from_entries(STORE, (engine.DirEntry("p/q", b, 2), engine.DirEntry("r", c, 3)))
    elsewhere = engine.File(f"file:///other/blobs/dd/{other}", other, 1)
    value = ([{"k": [file]}, tree, elsewhere, other], {"named": file})
    kind, data = encode_value(value, what="test")
    assert kind == "msgpack"
    assert referenced(kind, data, STORE) == {a, b, c}
    assert referenced(kind, data, STORE + "/") == {a, b, c}
    # Pickled (a value msgspec cannot encode): its strings are read, nothing is run.
    pickled = pickle.dumps([t.Box(file), tree, elsewhere])
    assert referenced("pickle", pickled, STORE) >= {a, b, c}
    assert other not in referenced("pickle", pickle.dumps([t.Box(file), elsewhere]), STORE)
    # Nothing of the store: nothing, and no decoding.
    assert referenced(kind, msgspec.msgpack.encode([elsewhere, "text"]), STORE) == set()
    assert referenced("msgpack", b"\xc1 not msgpack " + STORE.encode(), STORE) == set()


async def test_a_hosts_copy_keeps_blobs_in_its_folder_and_names_them_as_the_engines_store(tmp_path: Path) -> None:
    from engine._blobs import open_blob_store
    from offload._mirror import MirrorBlobStore, mirror_uri

    origin = (tmp_path / "engine blobs").as_uri()
    copy = open_blob_store(mirror_uri(str(tmp_path / "host copy"), origin), home=tmp_path)
    assert isinstance(copy, MirrorBlobStore)
    made = await engine.File.from_bytes(b"on the host", store=copy)
    assert made.store_uri == copy.uri == origin
    assert made.uri == f"{origin}/{made.digest[:2]}/{made.digest}"
    assert (tmp_path / "host copy" / made.digest[:2] / made.digest).read_bytes() == b"on the host"
    assert not (tmp_path / "engine blobs").exists()
    assert await made.read_bytes(store=copy) == b"on the host"
    with pytest.raises(engine.ConfigError, match="SHOAL_BLOB_STORE to a folder or an s3:// URI"):
        MirrorBlobStore("mirror://relative/path?of=s3://bucket")


# -- the local store, over SFTP ----------------------------------------------------------------


async def test_a_file_made_here_is_read_on_the_host(eng: engine.Engine, honest_host: SSHHost, tmp_path: Path) -> None:
    data = f"made on the engine's machine {uuid.uuid4()}\n".encode() * 1000
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    run = await eng.run(t.send_file, str(source))
    assert run.status == "succeeded", run.error
    digest = hashlib.sha256(data).hexdigest()
    assert run.result == (len(data), digest, "honest")
    copies = blobs_on(eng, honest_host)
    assert (copies.uploads, copies.uploaded_bytes) == (1, len(data))
    # It lies in the host's copy of the store, under remote_dir, in owner-only folders.
    blobs = "~/.cache/shoal/blobs"
    modes = await host_run(eng, honest_host, f"stat -c %a {blobs} {blobs}/{digest[:2]}")
    assert modes.split() == ["700", "700"]
    assert await host_run(eng, honest_host, f"stat -c %s {blobs}/{digest[:2]}/{digest}") == f"{len(data)}\n"
    # A Dir made here: each of its files goes, and the host rebuilds the tree from them.
    texts = {"top.txt": f"top {uuid.uuid4()}", "a/b/deep.txt": f"deep {uuid.uuid4()}"}
    for rel, text in texts.items():
        (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / rel).write_text(text)
    tree = await engine.Dir.from_path(tmp_path / "tree", store=eng.blob_store)
    seen = await eng.run(t.tree_of, tree)
    assert seen.status == "succeeded", seen.error
    assert seen.result == texts
    assert copies.uploads == 3


async def test_a_file_and_a_dir_made_on_the_host_come_back_with_their_bytes(
    eng: engine.Engine, honest_host: SSHHost, tmp_path: Path
) -> None:
    made = await eng.run(t.make_file, "written on the host")
    assert made.status == "succeeded", made.error
    file: engine.File = made.result
    assert file.store_uri == eng.blob_store.uri  # a reference into this engine's store
    assert await file.read_bytes(store=eng.blob_store) == b"written on the host"
    texts = {"a.txt": "alpha", "sub/b.txt": "beta", "sub/deeper/c.txt": "gamma"}
    tree_run = await eng.run(t.make_dir, texts)
    assert tree_run.status == "succeeded", tree_run.error
    tree: engine.Dir = tree_run.result
    folder = await tree.download(tmp_path / "tree", store=eng.blob_store)
    assert {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()} == texts
    copies = blobs_on(eng, honest_host)
    assert copies.downloads == 4 and copies.uploads == 0
    # The journal's record of the run gives the same references, readable here.
    again = await eng.get_run(tree_run.id)
    assert again.result == tree
    # Sent back to the host as an argument, they are not uploaded: the host has them.
    seen = await eng.run(t.tree_of, tree)
    assert seen.result == texts
    assert copies.uploads == 0


async def test_a_pickled_result_holding_a_file_brings_its_blob_back(eng: engine.Engine) -> None:
    run = await eng.run(t.make_boxed, "boxed")
    assert run.status == "succeeded", run.error
    assert isinstance(run.result, t.Box)
    assert await run.result.file.read_bytes(store=eng.blob_store) == b"boxed"


async def test_the_same_blob_in_two_attempts_and_two_runs_is_uploaded_once(
    sshd_rig: SSHRig, honest_host: SSHHost, eng: engine.Engine, tmp_path: Path
) -> None:
    import asyncio

    data = f"shared input {uuid.uuid4()}\n".encode() * 5000
    source = tmp_path / "shared.bin"
    source.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()

    @engine.task
    async def twice(path: str) -> list[Any]:
        f = await engine.File.from_path(path)
        return list(await asyncio.gather(t.digest_of(f), t.digest_of(f)))

    run = await eng.run(twice, str(source))
    assert run.status == "succeeded", run.error
    assert run.result[0] == run.result[1] == (len(data), digest, "honest")
    again = await eng.run(t.send_file, str(source))
    assert again.result == (len(data), digest, "honest")
    assert blobs_on(eng, honest_host).uploads == 1
    path = f"~/.cache/shoal/blobs/{digest[:2]}/{digest}"
    inode = await host_run(eng, honest_host, f"stat -c %i {path}")
    # Another engine, another target object (a new connection): the host has it already.
    async with engine.Engine(home=tmp_path / "other", targets={"lab": lab(sshd_rig, honest_host)}) as other:
        third = await other.run(t.send_file, str(source))
        assert third.result == (len(data), digest, "honest")
        assert blobs_on(other, honest_host).uploads == 0
        assert await host_run(other, honest_host, f"stat -c %i {path}") == inode  # not written again
        leftovers = await host_run(other, honest_host, "ls -A ~/.cache/shoal/blobs/tmp")
    assert leftovers == ""  # nothing half-sent


async def test_a_blob_changed_on_the_host_is_refused_when_it_comes_back(eng: engine.Engine) -> None:
    run = await eng.run(t.make_spoiled, "intact")
    assert run.status == "failed"
    assert isinstance(run.error, engine.BlobCorrupt)
    digest = hashlib.sha256(b"intact").hexdigest()
    assert digest in str(run.error) and "host 127.0.0.1" in str(run.error)
    assert not await eng.blob_store.exists(digest)  # nothing was filed under a name it does not match


# -- other stores --------------------------------------------------------------------------------


class Elsewhere(engine.LocalBlobStore):
    """A store that is neither a local folder store nor S3, as far as a backend can tell."""

    @property
    def uri(self) -> str:
        return "vault://team/blobs"

    def object_uri(self, digest: str) -> str:
        return f"vault://team/blobs/{digest}"


async def test_a_store_the_hosts_cannot_reach_is_refused_saying_what_to_use(
    sshd_rig: SSHRig, honest_host: SSHHost, tmp_path: Path
) -> None:
    store = Elsewhere(tmp_path / "vault")
    target = lab(sshd_rig, honest_host, remote_dir="~/.cache/shoal-vault")
    async with engine.Engine(home=tmp_path / "home", blob_store=store, targets={"lab": target}) as e:
        source = tmp_path / "data.txt"
        source.write_text("where?")
        run = await e.run(t.send_file, str(source))
        assert run.status == "failed"
        assert isinstance(run.error, engine.OffloadError)
        message = str(run.error)
        assert "vault://team/blobs" in message and "digest_of" in message
        assert "blob_store='s3://" in message and "folder" in message
        # Data by value still goes; nothing of the store went to the host.
        assert (await e.run(t.where, 2)).result[0] == 4
        listing = await target._link(honest_host.spec).run("ls ~/.cache/shoal-vault")
        assert "home" in listing.stdout.split() and "blobs" not in listing.stdout.split()


async def test_with_an_s3_store_the_host_reads_s3_itself_and_nothing_is_copied(
    sshd_rig: SSHRig, honest_host: SSHHost, tmp_path: Path, moto_server: MotoServer, s3_bucket: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    aws = {
        "AWS_ENDPOINT_URL": moto_server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    }
    target = lab(sshd_rig, honest_host, env=aws, remote_dir="~/.cache/shoal-s3")
    async with engine.Engine(home=tmp_path / "home", blob_store=f"s3://{s3_bucket}/blobs", targets={"lab": target}) as e:
        source = tmp_path / "data.txt"
        source.write_text("in the bucket")
        run = await e.run(t.send_file, str(source))
        assert run.status == "succeeded", run.error
        assert run.result == (13, hashlib.sha256(b"in the bucket").hexdigest(), "honest")
        made = await e.run(t.make_file, "from the host")
        assert made.result.uri.startswith(f"s3://{s3_bucket}/blobs/")
        assert await made.result.read_bytes(store=e.blob_store) == b"from the host"
        assert target._copies.root is None and target._copies.s3
        listing = await target._link(honest_host.spec).run("ls ~/.cache/shoal-s3")
        assert "home" in listing.stdout.split() and "blobs" not in listing.stdout.split()
