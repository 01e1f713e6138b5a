"""The code bundle: the user's project, packed for a worker to import tasks from.

An offloaded attempt runs in a process that has shoal installed but not
the user's code.  Once per run the engine works out how a worker finds
the task (:func:`function_ref`) and which folder holds it, packs that
folder (:func:`build_bundle`, or :func:`abuild_bundle` from the event
loop), and sends the bundle to each target once; the worker checks it
and unpacks it into a cache keyed by its digest (:func:`unpack_bundle`,
:func:`bundle_cached`) and puts that folder first on ``sys.path``.

What goes in: every file under the root that no ``.gitignore`` leaves out
(the root's, those of its subfolders, and those of the folders above it
up to the top of its git work tree), minus the ``[tool.shoal]
bundle_exclude`` patterns (gitignore syntax, relative to the root, applied
after the ``.gitignore`` files, so ``!pattern`` there brings back a file
they leave out).  Always left out: version control, virtual environments
(``.venv``, ``venv``, or any folder holding a ``pyvenv.cfg``), shoal's own
``.shoal``, caches (``__pycache__``, ``*.pyc``, ``.mypy_cache``,
``.pytest_cache``, ``.ruff_cache``), ``.nox``, ``.tox``, ``node_modules``,
sockets and devices, and links that point outside the root (a link
inside it is stored as the file or folder it points to: a bundle holds
no links).

Limits: :data:`MAX_FILE_SIZE` (5 MiB) for one file and
:data:`MAX_TOTAL_SIZE` (100 MiB) for all of them, before compression.
Code and small data files (configs, schemas, a notebook) fit; anything
larger is data, which tasks should get as ``engine.File`` / ``engine.Dir``
arguments.  Over either limit, building fails with ``engine.ConfigError``
naming the biggest files, rather than leaving them out silently and
failing later on the worker.

Determinism: entries are sorted by path; every entry has mtime 0, uid and
gid 0, no user or group name, and mode 0644 (0755 for folders and for
files executable by their owner); gzip writes mtime 0 and no file name.
The same tree gives the same digest whenever and wherever it is packed,
so an unchanged project is not sent again (given the same zlib: the
digest names the compressed bytes, which a different zlib build could
compress differently; nothing breaks then, the bundle is just sent once
more).

Both sides write under a temporary name and rename into place, so no one
sees half a bundle; what a process killed half-way leaves behind is swept
by a later one once it is :data:`STALE_AFTER` old.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import keyword
import os
import re
import shutil
import stat
import sys
import sysconfig
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from engine import ConfigError, InputError, OffloadError, Task
from engine.extend import FunctionRef

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from types import ModuleType

    from pathspec import GitIgnoreSpec

__all__ = [
    "MAX_FILE_SIZE",
    "MAX_TOTAL_SIZE",
    "Bundle",
    "abuild_bundle",
    "build_bundle",
    "bundle_cached",
    "function_ref",
    "unpack_bundle",
]

#: The largest single file a bundle takes (bytes, before compression).
MAX_FILE_SIZE: Final = 5 * 1024 * 1024
#: The most all of a bundle's files may hold together (bytes, before compression).
MAX_TOTAL_SIZE: Final = 100 * 1024 * 1024

#: Names never bundled, whatever the ignore files say.
SKIPPED_NAMES: Final = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".shoal",
        ".venv",
        "venv",
        "__pycache__",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".nox",
        ".tox",
        "node_modules",
    }
)
SKIPPED_SUFFIXES: Final = (".pyc", ".pyo")

_DIGEST = re.compile(r"[0-9a-f]{64}")
#: Work files older than this were left by a process that died while
#: building or unpacking, and are removed by the next one.
STALE_AFTER: Final = 3600.0
_BUILDING = re.compile(r"\.bundle-.*\.part")
_UNPACKING = re.compile(r"\.[0-9a-f]{16}-.*")


# -- how a worker finds a task ---------------------------------------------


def function_ref(
    fn: Callable[..., Any], *, task: str | None = None
) -> tuple[FunctionRef, Path | None]:
    """How a worker imports ``fn`` (a task or its function), and the folder to bundle.

    The folder is ``None`` when nothing needs bundling: ``fn`` lives in an
    installed library (site-packages, the standard library, anything under
    the interpreter's prefix), which the worker must have installed too.

    - a script run as ``python flow.py``, or a file imported by
      ``shoal run flow.py``: the script's folder; the worker imports the
      script by its path inside the bundle, under the file's stem (or a
      private ``shoal_flow_...`` name when the stem cannot be a module name
      or is taken by the standard library), never as ``__main__``;
    - a module of a package (``python -m pkg.flow`` included): the folder
      holding the top-level package; the worker imports the module by name;
    - a top-level module: its folder, and its path there.

    ``task`` names the task in errors (default: the task's name).  Raises
    ``engine.InputError`` when the function cannot be imported by name
    (a lambda, a closure or other function defined inside a function, a
    name rebound to something else, a function typed into an interactive
    session): checked before anything is sent.
    """
    target: Any = fn.fn if isinstance(fn, Task) else fn
    name = task or (fn.name if isinstance(fn, Task) else getattr(target, "__qualname__", None))
    what = f"task {name or repr(target)!r}"
    qualname = getattr(target, "__qualname__", None)
    module_name = getattr(target, "__module__", None)
    if not isinstance(qualname, str) or not isinstance(module_name, str):
        raise InputError(
            f"{what} cannot be offloaded: {target!r} has no module and name a worker could "
            f"import it by; make the task a function defined at module level"
        )
    if "<lambda>" in qualname:
        raise InputError(
            f"{what} cannot be offloaded: it is a lambda, which a worker cannot import by "
            f"name; define it with def at module level"
        )
    if "<locals>" in qualname:
        outer = qualname.split(".<locals>", 1)[0]
        raise InputError(
            f"{what} cannot be offloaded: {qualname} is defined inside the function {outer}, "
            f"and a worker imports a task's function by its module and name; define it at "
            f"module level (pass what it closed over as arguments)"
        )
    module = sys.modules.get(module_name)
    if module is None:
        raise InputError(
            f"{what} cannot be offloaded: its module {module_name} is not imported in this "
            f"process; import the task from its module"
        )
    if not _resolves_to(module, qualname, target):
        raise InputError(
            f"{what} cannot be offloaded: {module_name}.{qualname} does not name this function "
            f"(it was rebound, or made by a decorator or a factory); a worker imports a task's "
            f"function by its module and name, so define it once at module level under its own name"
        )
    file = getattr(module, "__file__", None)
    spec = getattr(module, "__spec__", None)
    if module_name == "__main__" and spec is not None and spec.name not in (None, "__main__"):
        # `python -m pkg.flow`: the worker imports pkg.flow by name.
        module_name = spec.name
    elif module_name == "__main__" or module_name.startswith("shoal_flow_"):
        if not file:
            raise InputError(
                f"{what} cannot be offloaded: it was defined in an interactive session or "
                f"with python -c, so there is no file to send; put it in a .py file"
            )
        script = Path(file).resolve()
        # A file imported by `shoal run` under a private name keeps it, so
        # that values pickled from the script's classes find them there.
        ref_module = module_name if module_name != "__main__" else _script_module(script)
        return FunctionRef(ref_module, qualname, script.name), _bundled(script.parent)
    if not file:
        return FunctionRef(module_name, qualname), None  # built into the interpreter
    path = Path(os.path.abspath(file))
    root = _package_root(module_name, path)
    bundled = None if root is None else _bundled(root)
    if (
        bundled is not None
        and "." not in module_name
        and path.suffix == ".py"
        and path.stem != "__init__"
    ):
        # A top-level module is found by its path, like a script: the same
        # whether it was imported by name or loaded from its file.
        return FunctionRef(module_name, qualname, path.name), bundled
    return FunctionRef(module_name, qualname), bundled


def _resolves_to(module: ModuleType, qualname: str, target: Any) -> bool:
    """Whether ``qualname`` in ``module`` is ``target``, or a wrapper (a task) of it."""
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    for _ in range(16):  # a chain of decorators, each keeping __wrapped__
        if obj is target:
            return True
        obj = obj.fn if isinstance(obj, Task) else getattr(obj, "__wrapped__", None)
        if obj is None:
            return False
    return False


def _script_module(script: Path) -> str:
    """The module name a worker imports a ``__main__`` script under."""
    stem = script.stem
    if (
        stem.isidentifier()
        and not keyword.iskeyword(stem)
        and stem not in sys.stdlib_module_names
        and stem not in sys.builtin_module_names
    ):
        other = sys.modules.get(stem)
        other_file = getattr(other, "__file__", None)
        if other is None or (other_file and Path(other_file).resolve() == script):
            return stem
    return f"shoal_flow_{hashlib.sha256(str(script).encode()).hexdigest()[:16]}"


def _package_root(module_name: str, file: Path) -> Path | None:
    """The folder holding ``module_name``'s top-level package (``None``: not a plain folder)."""
    parts = module_name.split(".")
    # The module's own name from its file: mod.py, mod.cpython-311-x86_64-linux-gnu.so.
    names = [*parts, "__init__"] if file.name.split(".")[0] == "__init__" else parts
    chain = [*file.parent.parts, file.name.split(".")[0]]
    # pkg/sub/mod.py for pkg.sub.mod: otherwise it was not imported from a
    # folder (a zip file, a custom loader) and there is no folder to send.
    if len(chain) <= len(names) or chain[-len(names) :] != names:
        return None
    root = file.parents[len(names) - 1]
    return root if root.is_dir() else None


def _bundled(root: Path) -> Path | None:
    """``root``, resolved, or ``None`` when it belongs to the interpreter (installed code)."""
    root = root.resolve()
    if any(part in ("site-packages", "dist-packages") for part in root.parts):
        return None
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    prefixes.update(sysconfig.get_paths().values())
    for prefix in prefixes:
        place = Path(prefix).resolve()
        # An interpreter installed at / would make every folder "installed".
        if place != Path(place.anchor) and root.is_relative_to(place):
            return None
    return root


# -- building --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bundle:
    """A built code bundle: ``path`` is ``<dest>/<digest>.tar.gz``."""

    #: SHA-256 (hex) of the tar.gz file's bytes.
    digest: str
    #: Size of the tar.gz file in bytes.
    size: int
    path: Path
    #: How many files it holds (folders not counted).
    files: int


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str  # POSIX path inside the bundle
    source: Path | None  # None for a folder
    size: int = 0
    executable: bool = False


async def abuild_bundle(
    root: Path,
    *,
    exclude: Sequence[str] = (),
    dest: Path,
    max_file_size: int = MAX_FILE_SIZE,
    max_total_size: int = MAX_TOTAL_SIZE,
) -> Bundle:
    """:func:`build_bundle` in a thread, so that walking and packing do not block the loop."""
    return await asyncio.to_thread(
        build_bundle,
        root,
        exclude=exclude,
        dest=dest,
        max_file_size=max_file_size,
        max_total_size=max_total_size,
    )


def build_bundle(
    root: Path,
    *,
    exclude: Sequence[str] = (),
    dest: Path,
    max_file_size: int = MAX_FILE_SIZE,
    max_total_size: int = MAX_TOTAL_SIZE,
) -> Bundle:
    """Pack ``root`` into ``dest/<digest>.tar.gz`` (see the module docstring for what goes in).

    ``exclude`` are ``bundle_exclude`` patterns.  The file is written to a
    temporary name and renamed, so a reader never sees half a bundle; one
    that exists already is kept.  Raises ``engine.ConfigError`` when
    ``root`` is not a folder, a pattern is invalid, or the files are over
    the limits, and ``engine.OffloadError`` when ``dest`` cannot be written.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise ConfigError(f"cannot bundle {root}: it is not a folder")
    dest = Path(dest)
    entries = _Walk(root, exclude, skip=dest.resolve()).entries()
    _check_sizes(root, entries, max_file_size, max_total_size)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        _sweep(dest, _BUILDING)
        fd, part = tempfile.mkstemp(dir=dest, prefix=".bundle-", suffix=".part")
    except OSError as exc:
        raise OffloadError(
            f"cannot write the code bundle of {root} under {dest}: {exc.strerror or exc}; "
            f"make that folder writable (it is in shoal's home, SHOAL_HOME)"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            sink = _HashingWriter(fh)
            _write_tar(entries, sink)
            fh.flush()
            # Durable before the rename: a crash must not leave an empty
            # file under a digest name, which a later run would keep.
            os.fsync(fh.fileno())
        digest = sink.sha.hexdigest()
        final = dest / f"{digest}.tar.gz"
        if final.is_file() and final.stat().st_size == sink.size:
            os.unlink(part)
        else:
            os.replace(part, final)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        if isinstance(exc, OSError):
            raise OffloadError(
                f"cannot write the code bundle of {root} under {dest}: {exc.strerror or exc}; "
                f"free some space there"
            ) from exc
        raise
    files = sum(1 for entry in entries if entry.source is not None)
    return Bundle(digest=digest, size=sink.size, path=final, files=files)


class _HashingWriter:
    """A file's ``write``, keeping the SHA-256 and length of what went through."""

    def __init__(self, fh: io.BufferedWriter) -> None:
        self._fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()


def _write_tar(entries: list[_Entry], sink: _HashingWriter) -> None:
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=6, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if entry.source is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            try:
                data = entry.source.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"cannot bundle {entry.source}: {exc.strerror or exc}; make it readable, "
                    f"or leave it out with bundle_exclude under [tool.shoal]"
                ) from exc
            info.size = len(data)
            info.mode = 0o755 if entry.executable else 0o644
            tar.addfile(info, io.BytesIO(data))


def _check_sizes(root: Path, entries: list[_Entry], max_file: int, max_total: int) -> None:
    files = sorted((e for e in entries if e.source is not None), key=lambda e: (-e.size, e.name))
    fix = (
        "leave them out with bundle_exclude = [...] under [tool.shoal] in pyproject.toml "
        "(gitignore patterns) or in a .gitignore, and pass data to tasks as engine.File or "
        "engine.Dir"
    )
    big = [e for e in files if e.size > max_file]
    if big:
        shown = ", ".join(f"{e.name} ({_size(e.size)})" for e in big[:5])
        more = f" and {len(big) - 5} more" if len(big) > 5 else ""
        raise ConfigError(
            f"cannot bundle {root} for offloaded tasks: {shown}{more} "
            f"{'is' if len(big) == 1 else 'are'} over the {_size(max_file)} limit for one "
            f"file; {fix}"
        )
    total = sum(e.size for e in files)
    if total > max_total:
        shown = ", ".join(f"{e.name} ({_size(e.size)})" for e in files[:5])
        raise ConfigError(
            f"cannot bundle {root} for offloaded tasks: its {len(files)} files hold "
            f"{_size(total)}, over the {_size(max_total)} limit; the biggest are {shown}; {fix}"
        )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


class _Walk:
    """The files and folders of a bundle, in order: a depth-first walk, sorted by name."""

    def __init__(self, root: Path, exclude: Sequence[str], *, skip: Path) -> None:
        self.root = root
        self.skip = skip
        top = next((d for d in (root, *root.parents) if (d / ".git").exists()), root)
        # Invariant: every ignore rule sees paths relative to its own folder,
        # written from `top` as `lead + <path inside the bundle>`.
        self.lead = "" if top == root else root.relative_to(top).as_posix() + "/"
        # Invariant: the .gitignore files in force in the folder being
        # walked, outermost first, each with its folder's path from `top`
        # ("" or ending in "/"); a later file's match overrides an earlier's.
        self.rules: list[tuple[str, GitIgnoreSpec]] = []
        chain = [root, *root.parents]
        for folder in reversed(chain[: chain.index(top) + 1]):
            self._push(folder, "" if folder == top else folder.relative_to(top).as_posix() + "/")
        self.exclude = _spec(list(exclude), "bundle_exclude")

    def entries(self) -> list[_Entry]:
        out: list[_Entry] = []
        self._folder(self.root, str(self.root), "", frozenset({str(self.root)}), out)
        return out

    def _push(self, folder: Path, base: str) -> bool:
        ignore = folder / ".gitignore"
        if not ignore.is_file():
            return False
        try:
            lines = ignore.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read {ignore} to bundle {self.root}: {exc}") from exc
        self.rules.append((base, _spec(lines, str(ignore))))
        return True

    def _ignored(self, rel: str, is_dir: bool) -> bool:
        name = rel + "/" if is_dir else rel
        full = self.lead + name
        decision: bool | None = None
        for base, spec in self.rules:
            include = spec.check_file(full[len(base) :]).include
            if include is not None:
                decision = include
        include = self.exclude.check_file(name).include
        return bool(decision if include is None else include)

    def _folder(
        self, folder: Path, real: str, rel: str, above: frozenset[str], out: list[_Entry]
    ) -> None:
        """Walk ``folder`` (``real``: its resolved path; ``rel``: "" or its path ending in "/")."""
        pushed = self._push(folder, self.lead + rel) if rel else False
        try:
            with os.scandir(folder) as scan:
                items = sorted(scan, key=lambda item: item.name)
        except OSError as exc:
            raise ConfigError(
                f"cannot read {folder} to bundle {self.root}: {exc.strerror or exc}; "
                f"leave it out with bundle_exclude under [tool.shoal]"
            ) from exc
        try:
            for item in items:
                self._item(item, os.path.join(real, item.name), rel + item.name, above, out)
        finally:
            if pushed:
                self.rules.pop()

    def _item(
        self, item: os.DirEntry[str], real: str, rel: str, above: frozenset[str], out: list[_Entry]
    ) -> None:
        if item.name in SKIPPED_NAMES or item.name.endswith(SKIPPED_SUFFIXES):
            return
        if item.is_symlink():
            real = os.path.realpath(item.path)
            if not Path(real).is_relative_to(self.root):
                return
        try:
            st = os.stat(real)
        except OSError:
            return  # a dangling link, or gone since the folder was listed
        if stat.S_ISDIR(st.st_mode):
            if (
                real in above
                or Path(real) == self.skip
                or os.path.isfile(os.path.join(real, "pyvenv.cfg"))
            ):
                return  # a link back up (a cycle), the bundles' own folder, a virtualenv
            if self._ignored(rel, is_dir=True):
                return
            inner: list[_Entry] = []
            self._folder(Path(item.path), real, rel + "/", above | {real}, inner)
            if inner:  # empty folders carry nothing a worker could import
                out.append(_Entry(rel, None))
                out.extend(inner)
        elif stat.S_ISREG(st.st_mode) and not self._ignored(rel, is_dir=False):
            out.append(_Entry(rel, Path(real), st.st_size, bool(st.st_mode & stat.S_IXUSR)))


def _spec(lines: list[str], where: str) -> GitIgnoreSpec:
    from pathspec import GitIgnoreSpec  # only when a bundle is built

    try:
        return GitIgnoreSpec.from_lines(lines)
    except (ValueError, re.error) as exc:
        raise ConfigError(f"{where}: invalid gitignore pattern: {exc}; fix the pattern") from exc


# -- unpacking (worker side) -----------------------------------------------


def bundle_cached(digest: str, cache: Path) -> Path | None:
    """The folder bundle ``digest`` was unpacked into under ``cache``, if it was."""
    folder = Path(cache) / "bundles" / _checked(digest)
    return folder if folder.is_dir() else None


def unpack_bundle(data: bytes, digest: str, cache: Path) -> Path:
    """Check ``data`` against ``digest`` and unpack it into ``cache/bundles/<digest>/``.

    Returns that folder.  It appears whole or not at all (unpacked into a
    temporary folder, then renamed), so workers racing to unpack the same
    bundle all end with a complete folder.  Members that are links,
    devices, absolute or that climb out with ``..`` are refused; folders
    are private to the user (0700).  Raises ``engine.OffloadError`` when
    the data does not match the digest or is not a bundle.
    """
    _checked(digest)
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise OffloadError(
            f"code bundle {digest[:16]}... was damaged in transit: the {len(data)} bytes "
            f"received have SHA-256 {actual[:16]}...; retry, and if it happens again check "
            f"the connection to this host"
        )
    folder = Path(cache) / "bundles" / digest
    if folder.is_dir():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _sweep(folder.parent, _UNPACKING)
        work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{digest[:16]}-"))
    except OSError as exc:
        raise OffloadError(
            f"cannot unpack code bundle {digest[:16]}... under {folder.parent}: "
            f"{exc.strerror or exc}; make that folder writable or give the worker another cache"
        ) from exc
    try:
        _extract(data, digest, work)
        for path in _folders(work):
            path.chmod(0o700)
        try:
            work.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another worker finished first; its folder is as complete as ours.
    except OSError as exc:
        raise OffloadError(
            f"cannot unpack code bundle {digest[:16]}... into {folder}: {exc.strerror or exc}; "
            f"free some space there or give the worker another cache"
        ) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _sweep(folder: Path, work: re.Pattern[str]) -> None:
    """Remove the ``work`` files in ``folder`` that a dead process left (see :data:`STALE_AFTER`)."""
    # Younger ones may belong to a process building or unpacking right now.
    cutoff = time.time() - STALE_AFTER
    with os.scandir(folder) as scan:
        for item in scan:
            if not work.fullmatch(item.name):
                continue
            try:
                stale = item.stat(follow_symlinks=False).st_mtime < cutoff
            except OSError:
                continue  # gone already: another process swept it
            if not stale:
                continue
            if item.is_dir(follow_symlinks=False):
                shutil.rmtree(item.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(item.path)


def _checked(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise OffloadError(
            f"{digest!r} is not a code bundle digest (64 lowercase hex digits of SHA-256); "
            f"the worker and the engine disagree on the protocol: install the same shoal on both"
        )
    return digest


class _Refused(tarfile.FilterError):
    pass


def _member(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    if member.issym() or member.islnk():
        raise _Refused(f"{member.name!r} is a link")
    if ".." in member.name.split("/"):
        raise _Refused(f"{member.name!r} climbs out with '..'")
    if member.name.startswith("/"):  # the data filter would strip the slash instead
        raise _Refused(f"{member.name!r} is an absolute path")
    checked = tarfile.data_filter(member, path)  # absolute paths, devices, escapes
    if not (checked.isfile() or checked.isdir()):
        raise _Refused(f"{member.name!r} is neither a file nor a folder")
    return checked


def _extract(data: bytes, digest: str, work: Path) -> None:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz", errorlevel=2) as tar:
            tar.extractall(work, filter=_member)
    except tarfile.FilterError as exc:
        raise OffloadError(
            f"code bundle {digest[:16]}... was refused: {exc}; bundles built by shoal hold only "
            f"files and folders, so this one was not made by a shoal engine"
        ) from exc
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise OffloadError(
            f"code bundle {digest[:16]}... is not a valid tar.gz ({exc}); it was not made by "
            f"a shoal engine"
        ) from exc


def _folders(top: Path) -> Iterator[Path]:
    for folder, subfolders, _ in os.walk(top):
        for name in subfolders:
            yield Path(folder) / name
