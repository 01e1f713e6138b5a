"""The code bundle: what goes in, that it is deterministic, and how workers find tasks in it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import engine
from engine._config import load_config
from engine._loader import load_file
from engine.extend import FunctionRef
from offload._bundle import (
    MAX_FILE_SIZE,
    Bundle,
    abuild_bundle,
    build_bundle,
    bundle_cached,
    function_ref,
    unpack_bundle,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content))
    return root


def members(bundle: Bundle) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(bundle.path, "r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def files_of(bundle: Bundle) -> set[str]:
    return {name for name, m in members(bundle).items() if m.isfile()}


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


PROJECT: dict[str, str | bytes] = {
    "flow.py": "import engine\n\n@engine.task\ndef double(x: int) -> int:\n    return 2 * x\n",
    "pkg/__init__.py": "",
    "pkg/mod.py": "VALUE = 1\n",
    "pkg/sub/deep.py": "DEEP = 2\n",
    "data/config.json": '{"a": 1}\n',
    "run.sh": "#!/bin/sh\necho hi\n",
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = write(tmp_path / "proj", PROJECT)
    (root / "run.sh").chmod(0o755)
    return root


# -- determinism -------------------------------------------------------------


def test_the_same_tree_gives_the_same_digest_whenever_and_however_it_was_written(
    tmp_path: Path, project: Path
) -> None:
    first = build_bundle(project, dest=tmp_path / "out1")
    # The same files written elsewhere, later, under another umask, with other mtimes.
    old = os.umask(0o077)
    try:
        again = write(tmp_path / "elsewhere" / "proj", PROJECT)
        (again / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    for i, path in enumerate(sorted(again.rglob("*"))):
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    assert (again / "flow.py").stat().st_mode & 0o077 == 0
    second = build_bundle(again, dest=tmp_path / "out2")
    assert second.digest == first.digest
    assert second.path.read_bytes() == first.path.read_bytes()
    assert first.digest == hashlib.sha256(first.path.read_bytes()).hexdigest()
    assert first.path == tmp_path / "out1" / f"{first.digest}.tar.gz"
    assert first.size == first.path.stat().st_size
    assert first.files == len(PROJECT)

    # Normalised metadata: what a worker unpacks does not depend on who packed it.
    info = members(first)
    assert list(info) == sorted(info, key=lambda n: n.split("/"))
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in info.values()} == {(0, 0, 0, "", "")}
    assert info["flow.py"].mode == 0o644
    assert info["run.sh"].mode == 0o755
    assert info["pkg"].isdir() and info["pkg"].mode == 0o755
    # gzip header: mtime 0 and no file name (flag byte 0).
    header = first.path.read_bytes()[:10]
    assert header[3] == 0 and header[4:8] == b"\0\0\0\0"


def test_a_changed_file_changes_the_digest(tmp_path: Path, project: Path) -> None:
    before = build_bundle(project, dest=tmp_path / "out")
    (project / "pkg" / "mod.py").write_text("VALUE = 2\n")
    after = build_bundle(project, dest=tmp_path / "out")
    assert after.digest != before.digest
    (project / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (project / "pkg" / "mod.py").chmod(0o755)
    assert build_bundle(project, dest=tmp_path / "out").digest not in (before.digest, after.digest)


def test_an_existing_bundle_file_is_kept_and_nothing_is_left_behind(
    tmp_path: Path, project: Path
) -> None:
    dest = tmp_path / "out"
    first = build_bundle(project, dest=dest)
    inode = first.path.stat().st_ino
    second = build_bundle(project, dest=dest)
    assert second == first
    assert first.path.stat().st_ino == inode
    assert sorted(p.name for p in dest.iterdir()) == [f"{first.digest}.tar.gz"]


def test_work_files_left_by_a_dead_process_are_swept_and_fresh_ones_kept(
    tmp_path: Path, project: Path
) -> None:
    dest, cache = tmp_path / "out", tmp_path / "cache"
    bundle = build_bundle(project, dest=dest)
    unpack_bundle(bundle.path.read_bytes(), bundle.digest, cache)
    bundles = cache / "bundles"
    left = [dest / ".bundle-dead.part", bundles / ".0123456789abcdef-dead"]
    kept = [bundles / ".0123456789abcdef-busy", dest / ".keep", bundles / ".keep"]
    left[0].write_bytes(b"half a bundle")
    write(left[1], {"half.py": ""})
    kept[0].mkdir()
    for path in kept[1:]:
        path.write_text("not shoal's")
    for path in [*left, *kept[1:]]:
        os.utime(path, (0, 2 * 3600))  # older than any live build or unpack
    other = build_bundle(project, exclude=["data/"], dest=dest)
    unpack_bundle(other.path.read_bytes(), other.digest, cache)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [".keep", *(f"{b.digest}.tar.gz" for b in (bundle, other))]
    )
    assert sorted(p.name for p in bundles.iterdir()) == sorted(
        [".0123456789abcdef-busy", ".keep", bundle.digest, other.digest]
    )


def test_an_unwritable_destination_is_an_offload_error(tmp_path: Path, project: Path) -> None:
    (tmp_path / "home").write_text("a file where a folder should be")
    with pytest.raises(
        engine.OffloadError, match=r"cannot write the code bundle of .* under .*home"
    ):
        build_bundle(project, dest=tmp_path / "home" / "bundles")


async def test_abuild_bundle_builds_the_same_bundle_from_the_event_loop(
    tmp_path: Path, project: Path
) -> None:
    built = await abuild_bundle(project, exclude=["data/"], dest=tmp_path / "out")
    assert built == build_bundle(project, exclude=["data/"], dest=tmp_path / "out")
    assert "data/config.json" not in files_of(built)


# -- what goes in ------------------------------------------------------------

IGNORED_TREE: dict[str, str | bytes] = {
    ".gitignore": "*.log\n/build/\nsecret/\n!secret/keep.py\n!important.log\ndocs/**/*.tmp\n",
    "main.py": "",
    "important.log": "kept by a negation\n",
    "debug.log": "",
    "build/out.py": "",
    "a/build/kept.py": "",
    "secret/keep.py": "",
    "secret/inner/a.py": "",
    "docs/x/y/z.tmp": "",
    "docs/x/y/z.md": "",
    "pkg/.gitignore": "generated_*.py\n!keep.log\n",
    "pkg/generated_1.py": "",
    "pkg/real.py": "",
    "pkg/keep.log": "",
    "pkg/sub/keep.log": "",
    "pkg/sub/other.log": "",
    "pkg/sub/generated_2.py": "",
    "other/generated_3.py": "",
}


def test_gitignore_files_are_honoured_as_git_honours_them(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("git is missing")
        pytest.skip("git is not installed")
    root = write(tmp_path / "proj", IGNORED_TREE)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    kept_by_git = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    bundled = files_of(build_bundle(root, dest=tmp_path / "out"))
    assert bundled == set(kept_by_git)
    # What that comparison rests on, spelled out.
    assert {"important.log", "a/build/kept.py", "pkg/keep.log", "pkg/sub/keep.log"} <= bundled
    assert not {"debug.log", "build/out.py", "secret/keep.py", "pkg/generated_1.py"} & bundled
    assert "other/generated_3.py" in bundled  # a nested .gitignore rules only its own folder


def test_bundle_exclude_patterns_apply_after_the_gitignore_files(tmp_path: Path) -> None:
    root = write(tmp_path / "proj", IGNORED_TREE)
    bundle = build_bundle(
        root, exclude=["docs/", "pkg/real.py", "!debug.log", "*.md"], dest=tmp_path / "out"
    )
    bundled = files_of(bundle)
    assert "debug.log" in bundled  # brought back by a negation
    assert not {"docs/x/y/z.md", "pkg/real.py"} & bundled
    assert "main.py" in bundled
    assert "docs" not in members(bundle)  # a folder left with nothing is not an entry


def test_the_gitignore_files_above_the_root_count_inside_a_git_work_tree(tmp_path: Path) -> None:
    repo = write(
        tmp_path / "repo",
        {
            ".gitignore": "*.csv\nsrc/pkg/local_*\n",
            "src/pkg/__init__.py": "",
            "src/pkg/table.csv": "a,b\n",
            "src/pkg/local_settings.py": "",
            "src/pkg/tasks.py": "",
        },
    )
    (repo / ".git").mkdir()
    assert files_of(build_bundle(repo / "src", dest=tmp_path / "out")) == {
        "pkg/__init__.py",
        "pkg/tasks.py",
    }
    # Outside a work tree the folders above are not the project's.
    shutil.rmtree(repo / ".git")
    assert "pkg/table.csv" in files_of(build_bundle(repo / "src", dest=tmp_path / "out"))


def test_environments_caches_and_outside_links_are_always_left_out(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside", {"secret.py": "TOKEN = 1\n", "d/x.py": ""})
    root = write(
        tmp_path / "proj",
        {
            "app.py": "",
            ".venv/lib/site.py": "",
            "venv/bin/activate": "",
            "env3/pyvenv.cfg": "home = /usr/bin\n",
            "env3/lib/y.py": "",
            "__pycache__/app.cpython-311.pyc": b"\0",
            "pkg/__pycache__/m.cpython-311.pyc": b"\0",
            "pkg/stray.pyc": b"\0",
            "pkg/m.py": "",
            ".git/config": "",
            ".shoal/shoal.db": b"\0",
            ".mypy_cache/x.json": "",
            ".pytest_cache/v": "",
            ".ruff_cache/v": "",
            ".nox/s/x.py": "",
            ".tox/e/x.py": "",
            "node_modules/a/index.js": "",
        },
    )
    (root / "out_file.py").symlink_to(outside / "secret.py")
    (root / "out_dir").symlink_to(outside / "d")
    (root / "dangling.py").symlink_to(root / "nowhere.py")
    (root / "alias.py").symlink_to(root / "pkg" / "m.py")
    (root / "pkg" / "loop").symlink_to(root)  # a cycle
    (root / "pkg" / "m.py").write_text("M = 1\n")
    bundle = build_bundle(root, dest=root / ".shoal" / "bundles")
    assert files_of(bundle) == {"app.py", "alias.py", "pkg/m.py"}
    info = members(bundle)
    assert info["alias.py"].isfile() and not any(m.issym() or m.islnk() for m in info.values())
    cache = tmp_path / "cache"
    assert (
        unpack_bundle(bundle.path.read_bytes(), bundle.digest, cache) / "alias.py"
    ).read_text() == "M = 1\n"


def test_a_file_over_the_limit_is_a_config_error_naming_it(tmp_path: Path, project: Path) -> None:
    (project / "data" / "weights.bin").write_bytes(b"\0" * (MAX_FILE_SIZE + 1))
    with pytest.raises(engine.ConfigError) as caught:
        build_bundle(project, dest=tmp_path / "out")
    message = str(caught.value)
    assert "data/weights.bin (5.0 MiB)" in message
    assert "bundle_exclude" in message and "engine.File" in message
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # Leaving it out is the fix the message gives.
    assert "data/weights.bin" not in files_of(
        build_bundle(project, exclude=["*.bin"], dest=tmp_path / "out")
    )


def test_a_tree_over_the_total_limit_is_a_config_error_naming_the_biggest_files(
    tmp_path: Path, project: Path
) -> None:
    write(project, {"data/a.csv": "x" * 3000, "data/b.csv": "y" * 2000})
    with pytest.raises(
        engine.ConfigError,
        match=r"over the 4\.0 KiB limit; the biggest are data/a\.csv \(2\.9 KiB\), data/b\.csv",
    ):
        build_bundle(project, dest=tmp_path / "out", max_total_size=4096)


def test_an_invalid_exclude_pattern_is_a_config_error(tmp_path: Path, project: Path) -> None:
    with pytest.raises(engine.ConfigError, match="bundle_exclude: invalid gitignore pattern"):
        build_bundle(project, exclude=["[z-a]"], dest=tmp_path / "out")


def test_bundle_exclude_is_read_from_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.shoal]\nbundle_exclude = ["data/", "*.ckpt"]\n')
    assert load_config().bundle_exclude == ("data/", "*.ckpt")
    (tmp_path / "pyproject.toml").write_text('[tool.shoal]\nbundle_exclude = "data/"\n')
    with pytest.raises(
        engine.ConfigError, match=r"pyproject\.toml: invalid shoal setting bundle_exclude = 'data/'"
    ):
        load_config()
    (tmp_path / "pyproject.toml").write_text("[tool.shoal]\nbundle_exclude = [1]\n")
    with pytest.raises(engine.ConfigError, match=r"bundle_exclude\[0\]"):
        load_config()


# -- unpacking ---------------------------------------------------------------


def test_unpacking_gives_back_the_tree_in_a_private_cache_folder(
    tmp_path: Path, project: Path
) -> None:
    bundle = build_bundle(project, dest=tmp_path / "out")
    cache = tmp_path / "cache"
    assert bundle_cached(bundle.digest, cache) is None
    folder = unpack_bundle(bundle.path.read_bytes(), bundle.digest, cache)
    assert folder == cache / "bundles" / bundle.digest
    assert tree(folder) == tree(project)
    assert bundle_cached(bundle.digest, cache) == folder
    assert os.access(folder / "run.sh", os.X_OK)
    modes = {p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")] if p.is_dir()}
    assert modes == {0o700}
    assert sorted(p.name for p in (cache / "bundles").iterdir()) == [bundle.digest]
    # Unpacking it again reuses the folder.
    assert unpack_bundle(bundle.path.read_bytes(), bundle.digest, cache) == folder


def test_a_tampered_bundle_is_an_offload_error(tmp_path: Path, project: Path) -> None:
    bundle = build_bundle(project, dest=tmp_path / "out")
    data = bytearray(bundle.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(engine.OffloadError, match="damaged in transit"):
        unpack_bundle(bytes(data), bundle.digest, tmp_path / "cache")
    assert bundle_cached(bundle.digest, tmp_path / "cache") is None
    # Bytes that match their digest but are no bundle.
    junk = b"not a tarball"
    with pytest.raises(engine.OffloadError, match=r"not a valid tar\.gz"):
        unpack_bundle(junk, hashlib.sha256(junk).hexdigest(), tmp_path / "cache")
    with pytest.raises(engine.OffloadError, match="not a code bundle digest"):
        bundle_cached("../../etc", tmp_path / "cache")
    assert list((tmp_path / "cache" / "bundles").iterdir()) == []


def evil_tar(member: tarfile.TarInfo, content: bytes = b"boom\n") -> bytes:
    raw = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        good = tarfile.TarInfo("ok.py")
        good.size = 3
        tar.addfile(good, io.BytesIO(b"x=1"))
        if member.isfile():
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
        else:
            tar.addfile(member)
    return raw.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("../escaped.py"), "outside the destination|climbs out"),
        (_member("a/../../escaped.py"), "outside the destination|climbs out"),
        (_member("a/../inside.py"), "climbs out"),
        (_member("/tmp/absolute.py"), "absolute"),
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
        (_member("inner", tarfile.SYMTYPE, "ok.py"), "is a link"),
        (_member("hard", tarfile.LNKTYPE, "ok.py"), "is a link"),
        (_member("dev", tarfile.CHRTYPE), "special file|neither a file"),
        (_member("fifo", tarfile.FIFOTYPE), "special file|neither a file"),
    ],
    ids=[
        "dotdot",
        "dotdot-deep",
        "dotdot-inside",
        "absolute",
        "symlink-out",
        "symlink-in",
        "hardlink",
        "device",
        "fifo",
    ],
)
def test_a_bundle_with_an_evil_member_is_refused(
    tmp_path: Path, member: tarfile.TarInfo, reason: str
) -> None:
    data = evil_tar(member)
    digest = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(engine.OffloadError, match=f"was refused: .*({reason})"):
        unpack_bundle(data, digest, cache)
    assert bundle_cached(digest, cache) is None
    assert list((cache / "bundles").iterdir()) == []
    assert not (tmp_path / "deep" / "escaped.py").exists()
    assert not Path("/tmp/absolute.py").exists()


def test_workers_racing_to_unpack_the_same_bundle_all_get_a_whole_folder(
    tmp_path: Path, project: Path
) -> None:
    write(project, {f"many/m{i}.py": f"N = {i}\n" for i in range(100)})
    bundle = build_bundle(project, dest=tmp_path / "out")
    data = bundle.path.read_bytes()
    expected = tree(project)

    # Threads of one worker process.
    cache = tmp_path / "threads"
    barrier = threading.Barrier(4)
    results: list[Path | BaseException] = []

    def unpack() -> None:
        barrier.wait()
        try:
            results.append(unpack_bundle(data, bundle.digest, cache))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=unpack) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [cache / "bundles" / bundle.digest] * 4
    assert tree(cache / "bundles" / bundle.digest) == expected

    # Separate worker processes, started together.
    cache = tmp_path / "procs"
    code = (
        "import sys, pathlib\n"
        "from offload._bundle import unpack_bundle\n"
        "data = pathlib.Path(sys.argv[1]).read_bytes()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"  # the start line: every process is ready
        "print(unpack_bundle(data, sys.argv[2], pathlib.Path(sys.argv[3])))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(bundle.path), bundle.digest, str(cache)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
    outs = [p.stdout.read() for p in procs if p.stdout is not None]
    for p in procs:
        p.wait(timeout=60)
        p.stdout.close()  # type: ignore[union-attr]
    assert [p.returncode for p in procs] == [0, 0]
    assert {out.strip() for out in outs} == {str(cache / "bundles" / bundle.digest)}
    assert tree(cache / "bundles" / bundle.digest) == expected
    assert [p.name for p in (cache / "bundles").iterdir()] == [bundle.digest]


# -- how a worker finds a task -------------------------------------------------


@pytest.fixture
def importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Path]]:
    """A folder on sys.path for a test's modules, all forgotten afterwards."""
    before = set(sys.modules)
    monkeypatch.setattr(sys, "path", list(sys.path))

    def folder(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        sys.path.insert(0, str(path))
        return path

    yield folder
    for name in set(sys.modules) - before:
        del sys.modules[name]


TASKS = """\
import engine

from .helpers import offset


@engine.task
def shifted(x: int) -> int:
    return x + offset()


def plain(x: int) -> int:
    return -x


class Holder:
    @staticmethod
    def method(x: int) -> int:
        return x * 10


def factory():
    def inner(x: int) -> int:
        return x

    return inner


closure = factory()
alias = shifted
rebound = engine.task(lambda x: x)
"""

HELPERS = """\
import json
from pathlib import Path


def offset() -> int:
    return json.loads((Path(__file__).parent / "offset.json").read_text())["offset"]
"""


def test_a_task_in_a_package_is_found_by_module_name_and_its_root_holds_the_package(
    importable: Callable[[str], Path],
) -> None:
    import importlib

    src = importable("src")
    write(src, {"bpkg/__init__.py": "", "bpkg/flows/__init__.py": "", "bpkg/flows/tasks.py": TASKS})
    write(src, {"bpkg/flows/helpers.py": HELPERS, "bpkg/flows/offset.json": '{"offset": 100}'})
    tasks: Any = importlib.import_module("bpkg.flows.tasks")
    assert function_ref(tasks.shifted) == (FunctionRef("bpkg.flows.tasks", "shifted"), src)
    assert function_ref(tasks.shifted.fn) == (FunctionRef("bpkg.flows.tasks", "shifted"), src)
    assert function_ref(tasks.plain)[0] == FunctionRef("bpkg.flows.tasks", "plain")
    assert function_ref(tasks.Holder.method)[0] == FunctionRef("bpkg.flows.tasks", "Holder.method")
    # The package itself (__init__.py) has the same root.
    write(src, {"bpkg/__init__.py": "def top() -> None:\n    pass\n"})
    importlib.reload(sys.modules["bpkg"])
    assert function_ref(sys.modules["bpkg"].top) == (FunctionRef("bpkg", "top"), src)


def test_closures_lambdas_and_rebound_names_are_refused_before_anything_is_sent(
    importable: Callable[[str], Path],
) -> None:
    import importlib

    src = importable("src")
    write(src, {"rpkg/__init__.py": "", "rpkg/tasks.py": TASKS, "rpkg/helpers.py": HELPERS})
    tasks: Any = importlib.import_module("rpkg.tasks")
    with pytest.raises(
        engine.InputError,
        match=r"task 'factory\.<locals>\.inner' .*defined inside the function factory.*module level",
    ):
        function_ref(tasks.closure)
    with pytest.raises(engine.InputError, match=r"task '<lambda>' .*is a lambda.*module level"):
        function_ref(tasks.rebound)
    with pytest.raises(engine.InputError, match=r"task 'double' .*lambda"):
        function_ref(engine.Task(lambda x: x, name="double"))

    def local(x: int) -> int:
        return x

    with pytest.raises(engine.InputError, match="defined inside the function test_closures"):
        function_ref(engine.task(local), task="local_task")
    # A name bound to another function than the one the task holds.
    tasks.plain, original = tasks.Holder.method, tasks.plain
    with pytest.raises(engine.InputError, match=r"rpkg\.tasks\.plain does not name this function"):
        function_ref(original, task="plain")
    with pytest.raises(engine.InputError, match="no module and name"):
        import functools

        function_ref(functools.partial(original, 1), task="partial")


def test_a_library_function_needs_no_bundle() -> None:
    assert function_ref(json.dumps) == (FunctionRef("json", "dumps"), None)
    assert function_ref(os.path.join) == (FunctionRef(os.path.__name__, "join"), None)
    import msgspec  # installed in site-packages

    assert function_ref(msgspec.json.encode)[1] is None
    assert function_ref(sorted) == (FunctionRef("builtins", "sorted"), None)


def test_a_file_loaded_by_shoal_run_is_found_by_its_path(
    importable: Callable[[str], Path],
) -> None:
    folder = importable("flows")
    script = write(folder, {"myflow.py": PROJECT["flow.py"]}) / "myflow.py"
    module: Any = load_file(script)
    assert function_ref(module.double) == (FunctionRef("myflow", "double", "myflow.py"), folder)
    # A file whose stem is taken (by the first file) gets a private name, which
    # the ref keeps: values pickled from the file's classes name that module.
    other = importable("other")
    private: Any = load_file(write(other, {"myflow.py": PROJECT["flow.py"]}) / "myflow.py")
    assert private.__name__.startswith("shoal_flow_")
    assert function_ref(private.double) == (
        FunctionRef(private.__name__, "double", "myflow.py"),
        other,
    )


def run_child(args: list[str], cwd: Path) -> Any:
    out = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


REPORT = """
if __name__ == "__main__":
    import json
    from offload._bundle import function_ref

    ref, root = function_ref(double)
    print(json.dumps({"ref": [ref.module, ref.qualname, ref.path], "root": str(root)}))
"""


def test_a_script_run_as_main_is_found_by_its_path_under_its_stem(tmp_path: Path) -> None:
    folder = write(tmp_path / "scripts", {"flow.py": str(PROJECT["flow.py"]) + REPORT})
    seen = run_child(["flow.py"], cwd=folder)
    assert seen == {"ref": ["flow", "double", "flow.py"], "root": str(folder.resolve())}
    # Run from elsewhere, by a relative path, with a name no module can have,
    # or the name of a standard module (which it shadows only where it runs).
    write(
        folder,
        {
            "my-flow.py": str(PROJECT["flow.py"]) + REPORT,
            "this.py": str(PROJECT["flow.py"]) + REPORT,
        },
    )
    for name in ("my-flow.py", "this.py"):
        seen = run_child([f"scripts/{name}"], cwd=tmp_path)
        assert seen["ref"][0].startswith("shoal_flow_") and seen["ref"][1:] == ["double", name]
        assert seen["root"] == str(folder.resolve())


def test_a_module_run_with_python_m_is_found_by_its_module_name(tmp_path: Path) -> None:
    write(
        tmp_path / "proj",
        {"mpkg/__init__.py": "", "mpkg/flow.py": str(PROJECT["flow.py"]) + REPORT},
    )
    seen = run_child(["-m", "mpkg.flow"], cwd=tmp_path / "proj")
    assert seen == {
        "ref": ["mpkg.flow", "double", None],
        "root": str((tmp_path / "proj").resolve()),
    }


def test_a_task_defined_in_python_c_is_refused(tmp_path: Path) -> None:
    code = (
        "import engine\nfrom offload._bundle import function_ref\n"
        "@engine.task\ndef f(x: int) -> int:\n    return x\n"
        "try:\n    function_ref(f)\nexcept engine.InputError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "interactive session or with python -c" in out.stdout, out.stderr


LOAD_AND_CALL = """
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path.insert(0, str(root))
from engine.extend import FunctionRef, load_function
ref = FunctionRef(*json.loads(sys.argv[2]))
print(json.dumps(load_function(ref, root)(int(sys.argv[3]))))
"""


def test_a_worker_finds_and_runs_tasks_from_an_unpacked_bundle(tmp_path: Path) -> None:
    project = write(
        tmp_path / "proj",
        {
            "flow.py": str(PROJECT["flow.py"])
            + "\nif __name__ == '__main__':\n    print('the script ran as __main__')\n",
            "wpkg/__init__.py": "",
            "wpkg/tasks.py": TASKS,
            "wpkg/helpers.py": HELPERS,
            "wpkg/offset.json": '{"offset": 100}',
            ".gitignore": "*.tmp\n",
            "scratch.tmp": "",
        },
    )
    sys.path.insert(0, str(project))
    try:
        from wpkg import tasks  # type: ignore[import-not-found]

        package_ref, package_root = function_ref(tasks.shifted)
        script_ref, script_root = function_ref(load_file(project / "flow.py").double)
    finally:
        sys.path.remove(str(project))
        for name in [n for n in sys.modules if n == "flow" or n.startswith("wpkg")]:
            del sys.modules[name]
    assert package_root == script_root == project
    bundle = build_bundle(project, dest=tmp_path / "out")
    data = bundle.path.read_bytes()
    shutil.rmtree(project)  # the worker sees only what was sent
    root = unpack_bundle(data, bundle.digest, tmp_path / "worker-cache")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    for ref, arg, expected in [(package_ref, 1, 101), (script_ref, 21, 42)]:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                LOAD_AND_CALL,
                str(root),
                json.dumps([ref.module, ref.qualname, ref.path]),
                str(arg),
            ],
            cwd=empty,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [str(expected)]
