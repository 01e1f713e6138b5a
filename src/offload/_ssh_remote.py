"""What the SSH backend sets up on a host before it sends work: the folder, the interpreter, the code.

:func:`probe` runs once per connection, one command: it makes
``remote_dir`` (refusing one the user cannot write), then asks the target's
interpreter, with the target's ``env``, for its shoal version, CPUs, GPUs
and hostname.  Each way this can fail has its own message, naming the
host, the interpreter and what to do: no such interpreter, no shoal in it,
another shoal version, a folder that cannot be used.  When an engine opens
its target, the hello of each host's first worker gives the same facts
(:func:`facts_of`), and the probe runs only when that worker does not come
up, to say why.

:func:`ensure_bundle` puts a code bundle on a host once per digest: if
``<remote_dir>/bundles/<digest>/`` is there (from an earlier run, or
another target using the same folder) nothing is sent; else the tar.gz
goes over SFTP under a temporary name, and the host's interpreter unpacks
it with :func:`offload._bundle.unpack_bundle`, the same code a worker uses,
so a worker started with ``--cache <remote_dir>`` finds it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shlex
from typing import TYPE_CHECKING, Final

import msgspec

from engine import OffloadError
from engine.extend import VERSION

if TYPE_CHECKING:
    from pathlib import Path

    from engine.extend import Hello

    from ._ssh_link import _Link

__all__ = ["Facts", "ensure_bundle", "facts_of", "probe", "shell_prefix"]

#: Exit status of the probe when ``remote_dir`` cannot be made or written.
_BAD_DIR: Final = 97
#: Exit status of a shell that did not find the command (POSIX).
_NOT_FOUND: Final = 127

# Run by the host's interpreter: what it is, and which shoal it has.  It is
# on the way to the first result, so it imports next to nothing (no shoal,
# no importlib.metadata, platform or socket): the version is read from the
# first shoal distribution's METADATA on sys.path, which is where
# importlib.metadata would find it (it is asked only when that file is not
# found), and the CPUs and GPUs are counted as engine.extend's usable_cpus
# and detect_gpus count them.
_PROBE: Final = """\
import json, os, sys
facts = {"python": sys.version.split()[0], "executable": sys.executable,
         "hostname": os.uname().nodename, "dir": os.getcwd()}
def shoal_version():
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.lower().startswith("shoal-") and name.endswith(".dist-info"):
                try:
                    with open(os.path.join(entry or ".", name, "METADATA"), encoding="utf-8") as fh:
                        for line in fh:
                            if line.startswith("Version:"):
                                return line.split(":", 1)[1].strip()
                            if not line.strip():
                                break
                except OSError:
                    pass
    from importlib.metadata import version
    return version("shoal")
try:
    from importlib.util import find_spec
    facts["shoal"] = shoal_version()
    if find_spec("offload") is None:
        raise ImportError("the offload package is missing")
except Exception as exc:
    facts["missing"] = f"{type(exc).__name__}: {exc}"
try:
    facts["cpus"] = len(os.sched_getaffinity(0))
except AttributeError:
    facts["cpus"] = os.cpu_count() or 1
visible = os.environ.get("CUDA_VISIBLE_DEVICES")
if visible is not None:
    facts["gpus"] = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
else:
    try:
        facts["gpus"] = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        facts["gpus"] = 0
print(json.dumps(facts))
"""

_UNPACK: Final = """\
import os, sys
from pathlib import Path
from offload._bundle import unpack_bundle
tar, digest, cache = sys.argv[1:4]
try:
    unpack_bundle(Path(tar).read_bytes(), digest, Path(cache))
finally:
    os.unlink(tar)
"""


class Facts(msgspec.Struct, frozen=True):
    """What a host's probe found: its interpreter, shoal, CPUs, GPUs, and ``remote_dir`` resolved."""

    python: str
    executable: str
    hostname: str
    dir: str
    shoal: str = ""
    cpus: int = 0
    gpus: int = 0
    missing: str = ""


def facts_of(hello: Hello, folder: str) -> Facts:
    """What a worker's hello says of its host (the probe's facts; ``folder``: its ``remote_dir``)."""
    return Facts(
        python=hello.python, executable=hello.executable, hostname=hello.hostname, dir=folder,
        shoal=hello.shoal, cpus=hello.cpus, gpus=hello.gpus,
    )


def shell_prefix(link: _Link) -> str:
    """Shell words that set the target's ``env`` and enter ``remote_dir`` (made if needed).

    A command over SSH starts in the user's home, so ``~/x`` and a
    relative path both mean a folder under it.  A folder that cannot be
    made or written ends the command with status 97.
    """
    target = link.target
    exports = "".join(f"export {name}={shlex.quote(value)}; " for name, value in target.env.items())
    folder = target.remote_dir
    if folder == "~" or folder.startswith("~/"):
        folder = folder[2:] or "."
    where = shlex.quote(folder)
    fail = f'|| {{ echo "remote_dir {shlex.quote(target.remote_dir)}: cannot be made or written" >&2; exit {_BAD_DIR}; }}'
    return f"{exports}cd && {{ mkdir -p -- {where} && cd -- {where} && test -w . ; }} {fail}; "


async def probe(link: _Link) -> Facts:
    """Check ``remote_dir`` and the interpreter on the link's host; what they are."""
    target = link.target
    host = link.host
    python = target.python
    command = f"{shell_prefix(link)}exec {shlex.quote(python)} -c {shlex.quote(_PROBE)}"
    done = await link.run(command)
    stderr = done.stderr.strip()
    if done.exit_status == _BAD_DIR:
        raise OffloadError(
            f"host {host}: remote_dir={target.remote_dir!r} cannot be used by user "
            f"{link.login!r}: {_quote(stderr)}; give offload.SSH remote_dir= a folder that "
            f"user can create and write to"
        )
    if done.exit_status == _NOT_FOUND:
        raise OffloadError(
            f"host {host}: there is no interpreter {python!r} ({_quote(stderr)}); install "
            f"Python 3.11 or newer with shoal there ({python} -m pip install shoal=={VERSION}), "
            f"or give offload.SSH python= the path of one that has it"
        )
    try:
        facts = msgspec.json.decode(done.stdout.strip().splitlines()[-1], type=Facts)
    except (IndexError, msgspec.DecodeError, json.JSONDecodeError):
        raise OffloadError(
            f"host {host}: {python!r} did not run as a Python interpreter (exit status "
            f"{done.exit_status}: {_quote(stderr or done.stdout.strip())}); give offload.SSH "
            f"python= the path of a Python 3.11+ that has shoal installed"
        ) from None
    if facts.missing:
        raise OffloadError(
            f"host {host}: the interpreter {python!r} ({facts.executable}, Python "
            f"{facts.python}) does not have shoal installed ({facts.missing}); install it there "
            f"({facts.executable} -m pip install shoal=={VERSION}), or give offload.SSH python= "
            f"an interpreter that has it"
        )
    if facts.shoal != VERSION:
        raise OffloadError(
            f"host {host}: the interpreter {python!r} ({facts.executable}) has shoal "
            f"{facts.shoal} and this engine runs shoal {VERSION}; install the same version "
            f"there ({facts.executable} -m pip install shoal=={VERSION})"
        )
    return facts


def _quote(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def ensure_bundle(link: _Link, facts: Facts, digest: str, path: Path) -> bool:
    """Put bundle ``digest`` (the local file ``path``) on the host unless it is there; whether it was sent."""
    sftp = await link.sftp()
    folder = f"{facts.dir}/bundles/{digest}"
    with link._mapped(f"looking for code bundle {digest[:12]}"):
        if await sftp.isdir(folder):
            return False
    size = (await asyncio.to_thread(path.stat)).st_size
    part = f"{facts.dir}/.bundle-{digest[:16]}-{secrets.token_hex(4)}.part"
    with link._mapped(f"uploading code bundle {digest[:12]} ({size} bytes)"):
        await sftp.put(str(path), part)
    command = (
        f"{shell_prefix(link)}exec {shlex.quote(link.target.python)} -c {shlex.quote(_UNPACK)} "
        f"{shlex.quote(part)} {digest} {shlex.quote(facts.dir)}"
    )
    done = await link.run(command)
    if done.exit_status != 0:
        raise OffloadError(
            f"host {link.host}: code bundle {digest[:12]} was sent but could not be unpacked "
            f"under {facts.dir}: {_quote(done.stderr.strip())}"
        )
    return True
