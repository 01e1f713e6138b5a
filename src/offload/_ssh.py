"""``offload.SSH``: a pool of hosts reached over SSH (asyncssh), and their connections.

What lives here: the target's options and their checks, the hosts and how
a host string is read, and one :class:`_Link` per host, which owns that
host's connection: opened lazily, reused by everything sent to the host,
with keepalives on, and closed by :meth:`SSH.aclose`.

Trust: a host's key is always verified against ``known_hosts``.  There is
no default that turns this off; ``known_hosts=None`` is refused unless
``insecure_no_host_check=True`` says so as well.

Errors: every asyncssh error and ``OSError`` is mapped at this boundary
(:func:`_mapped`) to an ``engine.OffloadError`` subclass that names the
host: :class:`~offload.HostKeyError` and
:class:`~offload.AuthenticationFailed` for a target set up wrongly (not
retried), :class:`~offload.HostLost` for a host that cannot be reached or
whose connection dropped (an infrastructure failure, retried by the
engine).  A lost host gets no new connection until its backoff has passed
(:data:`RECONNECT`: 1 s, doubling up to a minute, reset by a good connect).

asyncssh is imported only when a connection is first opened, so that
``offload.SSH(...)`` and ``import offload`` stay cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import getpass
import ipaddress
import logging
import os
import random
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

import msgspec

from engine import ConfigError, OffloadError
from engine.extend import BackendContext, Backoff, Handle, HostLost, Start

from ._errors import AuthenticationFailed, HostKeyError
from ._local import SHUTDOWN_GRACE, _Attempt, cancel_attempt, outcome_of
from ._ssh_remote import Facts, ensure_bundle, probe, shell_prefix

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
    from types import TracebackType

    import asyncssh

    from engine.extend import AttemptHooks, Outcome, Payload

    from ._local import WorkerClient
    from ._ssh_workers import RemoteWorker

__all__ = ["SSH", "Host", "parse_host"]

#: Waits before a lost host is connected to again: 1 s, doubled per failure
#: in a row, up to a minute, spread by +-10% so that hosts lost together do
#: not all come back at once.
RECONNECT: Final = Backoff(base=1.0, max_delay=60.0, jitter=0.1)
#: Seconds a submit waiting for a slot looks again at hosts whose backoff may have passed.
RECHECK: Final = 0.5
#: How ``File``/``Dir`` references look inside encoded arguments and results
#: (msgspec tags, and the module a pickled one names).
_BLOB_MARKS: Final = (b"engine.File", b"engine.Dir", b"engine._files")

_log = logging.getLogger("offload.ssh")

# A host name or address as ssh takes it: letters, digits, and . - _ (an
# alias from ~/.ssh/config is one too); IPv6 literals are checked apart.
_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Host:
    """One host of an :class:`SSH` target, with what the target's options leave open.

    ``username`` and ``workers`` override the target's for this host;
    ``cpus`` and ``gpus`` give its slots instead of what its worker reports
    at hello (a shared box of which a run may use only part).
    """

    name: str
    port: int = 22
    username: str | None = None
    workers: int | None = None
    cpus: int | None = None
    gpus: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _valid_name(self.name):
            raise ConfigError(
                f"offload.Host name= takes a host name or address (letters, digits, '.', '-', "
                f"'_', or an IPv6 address), got {self.name!r}"
            )
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"offload.Host port= takes a TCP port (1-65535), got {self.port!r}")
        if self.username is not None and (not isinstance(self.username, str) or not _USER.match(self.username)):
            raise ConfigError(f"offload.Host username= takes a user name, got {self.username!r}")
        for option, least in (("workers", 1), ("cpus", 1), ("gpus", 0)):
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ConfigError(
                    f"offload.Host {option}= takes a whole number >= {least} (or None), got {value!r}"
                )

    def __str__(self) -> str:
        """``name:port``, bracketed for IPv6 (what messages name the host by)."""
        name = f"[{self.name}]" if ":" in self.name else self.name
        return f"{name}:{self.port}"


def _valid_name(name: str) -> bool:
    if _NAME.match(name):
        return True
    try:
        return isinstance(ipaddress.ip_address(name), ipaddress.IPv6Address)
    except ValueError:
        return False


def parse_host(text: str) -> Host:
    """A :class:`Host` from ``"name"``, ``"user@name"``, ``"name:port"``, ``"user@[v6]:port"``...

    A bare IPv6 address (``"::1"``) is a name without a port; give a port
    with brackets (``"[::1]:2222"``).  Anything else is a ``ConfigError``
    that shows the forms taken.
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"offload.SSH cannot read the host {text!r}: {why}; write it as 'name', 'user@name', "
            f"'name:port', 'user@name:port' or '[ipv6]:port', or pass offload.Host(name, port=...)"
        )

    if not isinstance(text, str):
        raise ConfigError(
            f"offload.SSH hosts= takes host strings or offload.Host objects, got {text!r} "
            f"({type(text).__qualname__})"
        )
    if not text or text != text.strip() or any(c.isspace() for c in text):
        raise bad("it is empty or has spaces")
    username: str | None = None
    rest = text
    if "@" in text:
        username, _, rest = text.rpartition("@")
        if not _USER.match(username):
            raise bad(f"{username!r} is not a user name")
    port = 22
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise bad("a '[' without its ']'")
        name, after = rest[1:close], rest[close + 1 :]
        if after:
            if not after.startswith(":"):
                raise bad(f"{after!r} after the ']'")
            port = _port(after[1:], bad)
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise bad(f"{name!r} in brackets is not an IPv6 address") from None
    elif rest.count(":") == 1:
        name, _, digits = rest.partition(":")
        port = _port(digits, bad)
    else:
        name = rest  # a name, or a bare IPv6 address
    if not name or not _valid_name(name):
        raise bad(f"{name!r} is not a host name or address")
    return Host(name, port=port, username=username)


def _port(digits: str, bad: Callable[[str], ConfigError]) -> int:
    if not digits.isdigit() or not 0 < int(digits) < 65536:
        raise bad(f"the port {digits!r} is not a number from 1 to 65535")
    return int(digits)


class SSH:
    """Run offloaded attempts on a pool of hosts reached over SSH.

    ``hosts``: host strings (``"gpu1"``, ``"me@gpu2:2222"``, ``"[::1]:22"``)
    or :class:`Host` objects.  A name may be an alias of ``~/.ssh/config``,
    whose settings apply.  ``known_hosts``: the file host keys are verified
    against (``None`` only together with ``insecure_no_host_check=True``).
    ``client_keys``: private key files to log in with (default: the SSH
    agent and ``~/.ssh/id_*``, as ``ssh`` does).  ``username``: default the
    local user (or ``~/.ssh/config``'s).  ``workers``: worker processes per
    host (default: the host's CPUs); ``concurrency``: attempts at once per
    worker.  ``python``: the interpreter on the hosts, which must have the
    same shoal installed; ``remote_dir``: the hosts' folder for code bundles
    and blobs; ``env``: variables set for the workers.  ``connect_timeout``
    bounds a connect and login; a connection whose ``keepalive_count_max``
    keepalives in a row (one each ``keepalive_interval`` seconds) go
    unanswered is lost.  ``retries``: infrastructure retries per attempt.

    One connection per host, opened when the target is opened (by the
    engine, on first use, or ``async with``) and reused; a host that cannot
    be reached then is left out and tried again later, with backoff.
    """

    kind: ClassVar[str] = "ssh"
    reattachable: ClassVar[bool] = False

    def __init__(
        self,
        hosts: Sequence[str | Host] | str | Host,
        *,
        known_hosts: str | os.PathLike[str] | None = "~/.ssh/known_hosts",
        client_keys: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
        username: str | None = None,
        workers: int | None = None,
        python: str = "python3",
        remote_dir: str = "~/.cache/shoal",
        env: Mapping[str, str] | None = None,
        connect_timeout: float = 10.0,
        keepalive_interval: float = 5.0,
        keepalive_count_max: int = 3,
        retries: int = 3,
        concurrency: int = 1,
        insecure_no_host_check: bool = False,
    ) -> None:
        if isinstance(hosts, str | Host):
            hosts = [hosts]
        if not isinstance(hosts, list | tuple) or not hosts:
            raise ConfigError(
                f"offload.SSH hosts= takes a non-empty list of host strings or offload.Host "
                f"objects, got {hosts!r}"
            )
        parsed = tuple(h if isinstance(h, Host) else parse_host(h) for h in hosts)
        seen: set[tuple[str, int]] = set()
        for host in parsed:
            if (host.name, host.port) in seen:
                raise ConfigError(f"offload.SSH hosts= names {host} twice; name each host once")
            seen.add((host.name, host.port))
        self.hosts: tuple[Host, ...] = parsed
        if known_hosts is None:
            if insecure_no_host_check is not True:
                raise ConfigError(
                    "offload.SSH known_hosts=None would accept any host key, so a host could be "
                    "impersonated; name a known_hosts file (default ~/.ssh/known_hosts), or pass "
                    "insecure_no_host_check=True as well if you accept that risk"
                )
            self.known_hosts: str | None = None
        elif isinstance(known_hosts, str | os.PathLike) and str(known_hosts):
            self.known_hosts = str(known_hosts)
        else:
            raise ConfigError(f"offload.SSH known_hosts= takes the path of a known_hosts file, got {known_hosts!r}")
        if not isinstance(insecure_no_host_check, bool):
            raise ConfigError(f"offload.SSH insecure_no_host_check= takes True or False, got {insecure_no_host_check!r}")
        self.insecure_no_host_check = insecure_no_host_check
        if isinstance(client_keys, str | os.PathLike):
            client_keys = [client_keys]
        if client_keys is not None and (
            not isinstance(client_keys, list | tuple)
            or not all(isinstance(k, str | os.PathLike) and str(k) for k in client_keys)
        ):
            raise ConfigError(
                f"offload.SSH client_keys= takes a list of private key files (or None for the "
                f"SSH agent and ~/.ssh/id_*), got {client_keys!r}"
            )
        self.client_keys: tuple[str, ...] | None = (
            None if client_keys is None else tuple(str(k) for k in client_keys)
        )
        if username is not None and (not isinstance(username, str) or not _USER.match(username)):
            raise ConfigError(f"offload.SSH username= takes a user name, got {username!r}")
        self.username = username
        self.workers = None if workers is None else _count("workers", workers, 1)
        for option, text in (("python", python), ("remote_dir", remote_dir)):
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"offload.SSH {option}= takes a non-empty string, got {text!r}")
        self.python = python
        self.remote_dir = remote_dir
        env = {} if env is None else env
        if not hasattr(env, "items") or not all(
            isinstance(k, str) and _ENV_NAME.match(k) and isinstance(v, str) for k, v in env.items()
        ):
            raise ConfigError(
                f"offload.SSH env= takes a mapping of variable names to string values, got {env!r}"
            )
        self.env: dict[str, str] = dict(env)
        self.connect_timeout = _seconds("connect_timeout", connect_timeout)
        self.keepalive_interval = _seconds("keepalive_interval", keepalive_interval)
        self.keepalive_count_max = _count("keepalive_count_max", keepalive_count_max, 1)
        self.retries = _count("retries", retries, 0)
        self.concurrency = _count("concurrency", concurrency, 1)
        self._context: BackendContext | None = None
        #: Marks the processes this target starts on its hosts (see _Link.spawn).
        self.token = secrets.token_hex(8)
        # Invariant: ``_links`` has one link per host, in the order of
        # ``hosts``, from open() until aclose(); empty otherwise.
        self._links: list[_Link] = []
        # What every connect uses, read once by open().
        self._trust: Any = None
        self._keys: Any = None
        # Invariant: ``_attempts`` holds every submitted attempt whose
        # outcome has not yet been taken by ``wait`` or dropped by ``cancel``.
        self._attempts: dict[str, _Attempt] = {}
        # Submitters waiting for a slot; every change of the slots (an
        # attempt ends, a worker starts or goes, a host comes back) wakes all.
        self._waiters: list[asyncio.Future[None]] = []
        # Reconnects of lost hosts going on in the background, by host.
        self._reconnects: dict[Host, asyncio.Task[None]] = {}
        # Bumped by aclose(): a submit or a worker start that finishes after it is not kept.
        self._generation = 0

    def __repr__(self) -> str:
        hosts = ", ".join(repr(str(h)) for h in self.hosts)
        return f"offload.SSH(hosts=[{hosts}], workers={self.workers}, python={self.python!r})"

    # -- lifecycle -------------------------------------------------------------

    async def open(self, context: BackendContext) -> None:
        """Read the known_hosts file and client keys, then connect to and probe every host at once.

        A host key that cannot be verified, a login refused, a
        ``remote_dir`` that cannot be used or an interpreter without the
        same shoal fails the open (the target is set up wrongly); a host
        that cannot be reached is left out until its backoff has passed,
        unless none can be reached.
        """
        if self._links:
            return  # open already: one connection per host, not two
        self._context = context
        self._trust, self._keys = await asyncio.to_thread(self._credentials)
        clock = context.monotonic or time.monotonic
        self._links = [_Link(self, host, clock) for host in self.hosts]
        for link in self._links:
            link.on_lost(functools.partial(self._host_lost, link))
        results = await asyncio.gather(*(link.prepare() for link in self._links), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        fatal = [e for e in errors if not isinstance(e, HostLost)]
        if fatal:
            await self.aclose()
            raise fatal[0]
        if errors and len(errors) == len(self._links):
            await self.aclose()
            if len(errors) == 1:
                raise errors[0]
            raise HostLost(
                f"no host of {self!r} can be reached:\n"
                + "\n".join(f"  - {e}" for e in errors)
            )
        for error in errors:
            _log.warning("%s; it gets no work until it can be reached", error)

    async def __aenter__(self) -> SSH:
        if self._context is None:
            # On its own: nothing is kept on this machine, so no home is needed.
            await self.open(BackendContext(home=Path(os.devnull)))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every worker (Shutdown, then a kill of its process group), then close every connection.

        Each link also kills whatever else it started on its host, so no
        process of this target is left running on any host it can reach.
        """
        self._generation += 1
        for task in self._reconnects.values():
            task.cancel()
        self._reconnects.clear()
        workers = [w for link in self._links for w in link.workers]
        for link in self._links:
            link.workers.clear()
        await asyncio.gather(*(w.stop(SHUTDOWN_GRACE, "offload.SSH was closed") for w in workers))
        for attempt in self._attempts.values():
            attempt.future.cancel()
        self._attempts.clear()
        self._wake()
        links, self._links = self._links, []
        self._context = None
        await asyncio.gather(*(link.close() for link in links))

    def _credentials(self) -> tuple[Any, Any]:
        """The known hosts and client keys every connect uses (read in a thread: files)."""
        import asyncssh

        trust: Any = None
        if self.known_hosts is not None:
            path = Path(self.known_hosts).expanduser()
            names = ", ".join(str(h) for h in self.hosts)
            if not path.is_file():
                raise HostKeyError(
                    f"cannot verify the host keys of {names}: the known_hosts file {path} does not "
                    f"exist; create it with the hosts' keys (ssh-keyscan -p PORT HOST >> {path}, then "
                    f"check each fingerprint with the host's owner), or give known_hosts= the file "
                    f"that lists them",
                    host=str(self.hosts[0]),
                    known_hosts=str(path),
                )
            try:
                trust = asyncssh.read_known_hosts(str(path))
            except (OSError, ValueError, asyncssh.Error) as exc:
                raise HostKeyError(
                    f"cannot verify the host keys of {names}: the known_hosts file {path} cannot "
                    f"be read ({exc}); fix or replace it",
                    host=str(self.hosts[0]),
                    known_hosts=str(path),
                ) from exc
        keys: Any = ()  # asyncssh's default: the agent and ~/.ssh/id_*
        if self.client_keys is not None:
            keys = [self._read_key(Path(k).expanduser()) for k in self.client_keys]
        return trust, keys

    @staticmethod
    def _read_key(path: Path) -> Any:
        import asyncssh

        if not path.is_file():
            raise ConfigError(
                f"offload.SSH client_keys= names {path}, which does not exist; give the path of "
                f"a private key file (ssh-keygen -t ed25519 makes one)"
            )
        try:
            return asyncssh.read_private_key(str(path))
        except asyncssh.KeyEncryptionError as exc:
            raise ConfigError(
                f"offload.SSH cannot use the client key {path}: it is encrypted ({exc}); load it "
                f"into an SSH agent and leave client_keys= unset, or use a key without a passphrase"
            ) from exc
        except (OSError, ValueError, asyncssh.KeyImportError) as exc:
            raise ConfigError(
                f"offload.SSH cannot read the client key {path}: {exc}; give the path of an "
                f"OpenSSH or PEM private key file"
            ) from exc

    def _link(self, host: Host | str) -> _Link:
        """The link to one of this target's hosts (by its Host, or its host string)."""
        wanted = parse_host(host) if isinstance(host, str) else host
        for link in self._links:
            if (link.host.name, link.host.port) == (wanted.name, wanted.port):
                return link
        if not self._links:
            raise OffloadError(
                f"{self!r} is not open: use it through an engine, or `async with offload.SSH(...)`"
            )
        raise ConfigError(f"{host} is not a host of {self!r}")


    # -- slots -------------------------------------------------------------------

    def _workers_on(self, link: _Link) -> int:
        """Worker processes on a host: its own ``workers``, the target's, else its CPUs (0: unknown yet)."""
        host = link.host
        count = host.workers or self.workers
        if count is None:
            count = host.cpus or (link.facts.cpus if link.facts is not None else 0)
        return count

    def capacity(self) -> int:
        """How many attempts may run at once on the hosts known now (workers x concurrency)."""
        return max(1, sum(self._workers_on(link) for link in self._links)) * self.concurrency

    def unfit(self, cpu: float, gpu: int) -> str | None:
        """Why no host can ever run an attempt needing ``cpu`` CPUs and ``gpu`` GPUs, or None.

        A host whose CPUs or GPUs are not known yet (down since the open,
        no ``Host(cpus=, gpus=)``) might fit, so it is never ruled out.
        """
        seen: list[str] = []
        for link in self._links or [_Link(self, h, time.monotonic) for h in self.hosts]:
            host, facts = link.host, link.facts
            cpus = host.cpus if host.cpus is not None else (facts.cpus if facts is not None else None)
            gpus = host.gpus if host.gpus is not None else (facts.gpus if facts is not None else None)
            if cpus is None or gpus is None or (cpu <= cpus and gpu <= gpus):
                return None
            seen.append(f"{host} has {cpus} CPUs and {gpus} GPUs")
        need = f"{cpu:g} CPUs" + (f" and {gpu} GPUs" if gpu else "")
        return f"it asks for {need}, and " + "; ".join(seen)


    # -- attempts ----------------------------------------------------------------

    async def submit(self, payload: Payload, hooks: AttemptHooks) -> Handle:
        """Send one attempt to a worker of the least-loaded host that fits it; its handle.

        The code bundle goes to that host first (once per digest, SFTP).
        A GPU attempt gets ``CUDA_VISIBLE_DEVICES`` for the GPUs it holds
        there.  No host up: ``HostLost`` (retried by the engine).
        """
        context = self._context
        if context is None or not self._links:
            raise OffloadError(
                f"{self!r} is not open: use it through an engine, or `async with offload.SSH(...)`"
            )
        self._refuse_local_blobs(payload, payload.args, "its arguments reference")
        link, worker, gpus = await self._place(payload)
        # From here to registering the attempt there is no await: the
        # worker's reader sees it if the worker or the host is lost.
        if gpus:
            env = {**payload.env, "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)}
            payload = msgspec.structs.replace(payload, env=env)
        n = next(worker.serial)
        handle = Handle("ssh", f"{link.host}/{worker.pid}:{n}", f"{worker.hello.hostname}:{worker.pid}")
        attempt = _Attempt(n, payload, hooks, handle, worker)
        worker.in_flight[n] = attempt
        self._attempts[handle.id] = attempt
        cpu = payload.cpu

        def release(_: object) -> None:
            self._release(link, cpu, gpus)

        attempt.future.add_done_callback(release)
        try:
            if payload.bundle is not None and context.bundle_path is not None:
                await link.bundle(payload.bundle, context.bundle_path(payload.bundle))
        except BaseException:
            worker.in_flight.pop(n, None)
            self._attempts.pop(handle.id, None)
            attempt.future.cancel()
            raise
        if not attempt.future.done():
            with contextlib.suppress(ConnectionError):
                # A worker gone meanwhile has failed the attempt already (wait() says how).
                await worker.frames.send(Start(n, payload))
        return handle

    async def wait(self, handle: Handle) -> Outcome:
        attempt, outcome = await outcome_of(self._attempts, handle, "offload.SSH", self._discard)
        if outcome.ok:
            self._refuse_local_blobs(attempt.payload, outcome.value, "its result references")
        return outcome

    async def cancel(self, handle: Handle) -> None:
        """Kill the worker running the attempt, and its process group (a fresh worker replaces it)."""
        await cancel_attempt(self._attempts, handle, self._discard)

    async def reattach(self, handle: Handle) -> Handle | None:
        # Workers die with the connection that started them: nothing to find again.
        return None

    def _refuse_local_blobs(self, payload: Payload, data: bytes, what: str) -> None:
        """Refuse ``File``/``Dir`` with a blob store the hosts cannot read (anything but S3).

        The rule is the simplest sound one: with an S3 blob store every
        host reads and writes blobs itself (its workers get
        ``SHOAL_BLOB_STORE``); with this machine's store nothing of it is
        copied, so an attempt that takes or returns a ``File``/``Dir`` fails
        before it is sent (or when its result comes back) with this error.
        """
        store = payload.blob_store or (self._context.blob_store if self._context else None)
        if store is not None and store.startswith("s3://"):
            return
        if any(mark in data for mark in _BLOB_MARKS):
            raise OffloadError(
                f"attempt {payload.attempt} of action {payload.key} of task {payload.task!r}: "
                f"{what} an engine.File or engine.Dir, and offload.SSH hosts cannot read or write "
                f"this engine's blob store ({store or 'none'}); give the engine an S3 blob store "
                f"(blob_store='s3://bucket/prefix') that the hosts can reach, or pass the data by value"
            )

    def _worker_env(self) -> dict[str, str]:
        store = self._context.blob_store if self._context is not None else None
        return {"SHOAL_BLOB_STORE": store} if store is not None and store.startswith("s3://") else {}

    def _slots_of(self, link: _Link) -> tuple[int, int]:
        """The CPUs and GPUs of a host: its ``Host(cpus=, gpus=)``, else what its probe found."""
        host, facts = link.host, link.facts
        cpus = host.cpus if host.cpus is not None else (facts.cpus if facts is not None else 0)
        gpus = host.gpus if host.gpus is not None else (facts.gpus if facts is not None else 0)
        return cpus, gpus

    async def _place(self, payload: Payload) -> tuple[_Link, RemoteWorker, list[int]]:
        """A worker with a free slot on the least-loaded connected host that fits; its CPUs and GPUs held."""
        from ._ssh_workers import start_worker

        generation = self._generation
        while True:
            if generation != self._generation or not self._links:
                raise OffloadError(f"{self!r} was closed while this attempt waited for a worker; submit it again")
            best: _Link | None = None
            best_load = 0.0
            connected = False
            for link in self._links:
                if link._conn is None or link.facts is None or link._facts_of is not link._conn:
                    if link.up:
                        self._reconnect(link)
                    continue
                connected = True
                cpus, gpus = self._slots_of(link)
                if link.cpu_held + payload.cpu > cpus or len(link.gpus_held) + payload.gpu > gpus:
                    continue
                room = max(1, self._workers_on(link)) * self.concurrency
                busy = sum(len(w.in_flight) for w in link.workers) + link.starting
                if busy >= room:
                    continue
                if best is None or busy / room < best_load:
                    best, best_load = link, busy / room
            if best is not None:
                link = best
                gpus_held = self._hold(link, payload.cpu, payload.gpu)
                idle = [w for w in link.workers if len(w.in_flight) < self.concurrency]
                if idle:
                    return link, min(idle, key=lambda w: len(w.in_flight)), gpus_held
                link.starting += 1
                try:
                    worker = await start_worker(self, link, self._worker_env())
                except BaseException:
                    self._release(link, payload.cpu, gpus_held)
                    raise
                finally:
                    link.starting -= 1
                    self._wake()
                if generation != self._generation or link._conn is not worker.conn:
                    self._release(link, payload.cpu, gpus_held)
                    await worker.stop(0, "offload.SSH was closed, or the host was lost, as it started")
                    continue
                link.workers.append(worker)
                return link, worker, gpus_held
            if not connected and not self._reconnects:
                raise HostLost(
                    f"no host of {self!r} is up: "
                    + "; ".join(f"{link.host}: {link.down_because or 'not connected'}" for link in self._links)
                )
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                # Woken by any change of the slots; a host whose backoff
                # passes says nothing, so look again now and then.
                await asyncio.wait_for(waiter, RECHECK)

    def _hold(self, link: _Link, cpu: float, gpu: int) -> list[int]:
        _, gpus = self._slots_of(link)
        held = [g for g in range(gpus) if g not in link.gpus_held][:gpu]
        link.cpu_held += cpu
        link.gpus_held.update(held)
        return held

    def _release(self, link: _Link, cpu: float, gpus: list[int]) -> None:
        link.cpu_held = max(0.0, link.cpu_held - cpu)
        link.gpus_held.difference_update(gpus)
        self._wake()

    def _reconnect(self, link: _Link) -> None:
        """Connect to and probe a lost host in the background, once at a time; it gets work once back."""
        if link.host in self._reconnects or link._closing:
            return

        async def again() -> None:
            try:
                await link.prepare()
            except OffloadError as exc:
                _log.warning("host %s is still down: %s", link.host, exc)
            finally:
                self._reconnects.pop(link.host, None)
                self._wake()

        self._reconnects[link.host] = asyncio.get_running_loop().create_task(again())

    def _host_lost(self, link: _Link, why: str) -> None:
        """A host's connection went: fail what its workers ran with HostLost now, and drop them."""
        workers, link.workers = link.workers, []
        for worker in workers:

            def error(a: _Attempt, w: WorkerClient = worker) -> OffloadError:
                return HostLost(
                    f"the connection to host {link.host} was lost ({why}) while {w.what} ran attempt "
                    f"{a.payload.attempt} of action {a.payload.key} of task {a.payload.task!r}; the "
                    f"attempt is retried on another host"
                )

            worker.fail_all(error)
        self._wake()

    # -- what the workers ask of their backend -------------------------------------

    def _wake(self, *, everyone: bool = True) -> None:
        """Wake every submitter waiting for a slot (each looks again)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _forget(self, worker: Any) -> None:
        with contextlib.suppress(ValueError):
            worker.link.workers.remove(worker)
        self._wake()

    async def _discard(self, worker: WorkerClient, why: str) -> None:
        """Kill a worker and its process group, failing what else it ran; replaced lazily."""
        await worker.kill(why)
        self._wake()


class Completed:
    """What a command run on a host gave: its exit status and output."""

    __slots__ = ("exit_status", "stderr", "stdout")

    def __init__(self, exit_status: int, stdout: str, stderr: str) -> None:
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return f"Completed(exit_status={self.exit_status}, stdout={self.stdout!r}, stderr={self.stderr!r})"


class _Link:
    """The connection to one host: opened when first needed, reused, and watched.

    The connection is opened with keepalives; when it closes without
    :meth:`close` having asked (the host went down, keepalives went
    unanswered, sshd was killed), the link notes the loss and the host
    waits out its backoff before it is connected to again.
    """

    def __init__(self, target: SSH, host: Host, clock: Callable[[], float]) -> None:
        self.target = target
        self.host = host
        self.username = host.username or target.username
        self._clock = clock
        self._rng = random.Random()
        # Invariant: ``_conn`` is the open connection, or None; it is set
        # only by ``connection()``, under ``_lock``, so a host never has two.
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        #: How many connects in a row failed or were lost (0: healthy).
        self.failures = 0
        #: Before this time (of ``clock``) no connect is tried; why the host is down.
        self.down_until = 0.0
        self.down_because = ""
        #: How many connections this link opened (a reconnect makes it 2...).
        self.connects = 0
        self._closing = False
        self._losses: list[Callable[[str], None]] = []
        # The SFTP session of the current connection (None: none yet).
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_of: asyncssh.SSHClientConnection | None = None
        self._sftp_lock = asyncio.Lock()
        #: What the probe of the current connection found (None: not probed yet).
        self.facts: Facts | None = None
        self._facts_of: asyncssh.SSHClientConnection | None = None
        # Invariant: ``_bundles`` maps each digest that is on the host, or
        # being put there, to the task doing it; a failed one is dropped
        # (tried again by the next attempt that needs it).
        self._bundles: dict[str, asyncio.Task[bool]] = {}
        #: How many code bundles this link sent (an unchanged one is not sent again).
        self.uploads = 0
        # Invariant: ``_spawned`` holds the pid of every process this link
        # started on the host (each leads its own process group) that may
        # still run: a lost connection does not stop them, so they are
        # killed when the link connects again (or by ``kill_group``).
        self._spawned: set[int] = set()
        # Slots (kept by SSH._place): invariant: ``workers`` are the live
        # workers on this host started over the current connection, each
        # having said a good hello; ``starting`` counts those being started;
        # ``cpu_held``/``gpus_held`` are what the attempts placed here hold.
        self.workers: list[RemoteWorker] = []
        self.starting = 0
        self.cpu_held = 0.0
        self.gpus_held: set[int] = set()

    def __repr__(self) -> str:
        return f"<_Link {self.host} {'open' if self._conn is not None else 'closed'}>"

    @property
    def login(self) -> str:
        """The user logged in as, for messages (ssh's default: the local user)."""
        return self.username or getpass.getuser()

    async def prepare(self) -> Facts:
        """Connect if needed, and probe the host once per connection (see ``_ssh_remote``)."""
        conn = await self.connection()
        if self.facts is None or self._facts_of is not conn:
            facts = await probe(self)
            self.facts, self._facts_of = facts, conn
        return self.facts

    async def sftp(self) -> asyncssh.SFTPClient:
        """The SFTP session of the current connection, started on first use."""
        conn = await self.connection()
        async with self._sftp_lock:
            if self._sftp is None or self._sftp_of is not conn:
                with self._mapped("starting SFTP"):
                    self._sftp = await conn.start_sftp_client()
                self._sftp_of = conn
            return self._sftp

    async def bundle(self, digest: str, path: Path) -> bool:
        """Make sure code bundle ``digest`` is unpacked on the host; whether it was sent now.

        Once per host per digest: attempts that need it at the same time
        wait for the same upload.
        """
        task = self._bundles.get(digest)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.get_running_loop().create_task(self._put_bundle(digest, path))
            self._bundles[digest] = task
        return await asyncio.shield(task)

    async def _put_bundle(self, digest: str, path: Path) -> bool:
        facts = await self.prepare()
        sent = await ensure_bundle(self, facts, digest, path)
        if sent:
            self.uploads += 1
        return sent

    @property
    def up(self) -> bool:
        """Whether the host may be given work now: connected, or its backoff has passed."""
        return self._conn is not None or self._clock() >= self.down_until

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(why)`` each time the connection is lost (not when it is closed)."""
        self._losses.append(callback)

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The open connection, connecting first if there is none (``HostLost`` while down)."""
        conn = self._conn
        if conn is not None:
            return conn
        async with self._lock:
            if self._conn is not None:
                return self._conn
            if self._closing:
                raise OffloadError(f"the connection to host {self.host} is closed: {self.target!r} was closed")
            wait = self.down_until - self._clock()
            if wait > 0:
                raise HostLost(
                    f"host {self.host} is down ({self.down_because}); it is connected to again in "
                    f"{wait:.1f}s"
                )
            try:
                conn = await self._connect()
            except HostLost as exc:
                self._failed(str(exc))
                raise
            self.failures = 0
            self.connects += 1
            self._conn = conn
            if self._spawned:
                await self._sweep()
            return conn

    async def _connect(self) -> asyncssh.SSHClientConnection:
        import asyncssh

        target = self.target
        link = self

        class _Client(asyncssh.SSHClient):
            def connection_lost(self, exc: Exception | None) -> None:
                link._lost(conn_of.get("conn"), exc)

        conn_of: dict[str, Any] = {}
        options: dict[str, Any] = {
            "known_hosts": target._trust,
            "client_keys": target._keys,
            "connect_timeout": target.connect_timeout,
            "keepalive_interval": target.keepalive_interval,
            "keepalive_count_max": target.keepalive_count_max,
        }
        if self.username is not None:
            options["username"] = self.username
        with self._mapped("connecting"):
            # connect_timeout bounds the TCP connect and the whole handshake.
            async with asyncio.timeout(target.connect_timeout + 1.0):
                conn = await asyncssh.connect(
                    self.host.name, self.host.port, client_factory=_Client, **options
                )
        conn_of["conn"] = conn
        return conn

    def _lost(self, conn: Any, exc: Exception | None) -> None:
        """asyncssh says a connection ended: unless ``close`` asked for it, the host is lost."""
        if conn is None or conn is not self._conn:
            return
        self._conn = None
        if self._closing:
            return
        why = _reason(exc) if exc is not None else "the host closed the connection"
        self._failed(f"the connection to host {self.host} was lost: {why}")
        _log.warning("the connection to host %s was lost: %s", self.host, why)
        for callback in list(self._losses):
            try:
                callback(why)
            except Exception:
                _log.exception("offload.SSH: reporting the loss of host %s failed", self.host)

    def _failed(self, why: str) -> None:
        self.failures += 1
        self.down_until = self._clock() + RECONNECT.delay(self.failures, self._rng)
        self.down_because = why

    async def run(self, command: str, *, input: str | None = None) -> Completed:
        """Run a shell command on the host over the shared connection; its status and output.

        A connection that drops meanwhile, or a command that ends without
        an exit status (the host went away under it), is ``HostLost``.
        """
        return await self._run_on(await self.connection(), command, input)

    async def _run_on(self, conn: asyncssh.SSHClientConnection, command: str, input: str | None = None) -> Completed:
        with self._mapped(f"running {command!r}"):
            result = await conn.run(command, input=input, check=False)
        if result.exit_status is None or (result.exit_status == -1 and result.exit_signal is None):
            raise HostLost(
                f"the command {command!r} on host {self.host} ended without an exit status: the "
                f"connection was lost under it{self._since()}"
            )
        return Completed(int(result.exit_status), _text(result.stdout), _text(result.stderr))

    async def spawn(self, command: str) -> tuple[asyncssh.SSHClientProcess[bytes], int]:
        """Start a long-lived ``command`` on the host, in ``remote_dir`` with the target's env; it and its pid.

        Its stdin, stdout and stderr are byte streams of its own channel;
        the caller must keep reading stderr (unread output holds the
        channel).  The command leads its own process group (sshd starts
        each session in a new one, and the shell ``exec``s the command), so
        :meth:`kill_group` ends it and whatever it started.  It is marked
        with this target's token, so that a pid reused by the host is never
        taken for it.
        """
        conn = await self.connection()
        line = (
            f"{shell_prefix(self)}export SHOAL_SSH_OWNER={self.target.token}; echo $$; exec {command}"
        )
        with self._mapped(f"starting {command!r}"):
            process = await conn.create_process(line, encoding=None)
            first = await process.stdout.readline()
        try:
            pid = int(first)
        except ValueError:
            process.close()
            err = _text(await process.stderr.read(2000)) if not first else first.decode(errors="replace")
            raise OffloadError(
                f"host {self.host} did not start {command!r}: {' '.join(err.split()) or 'it exited at once'}"
            ) from None
        self._spawned.add(pid)
        return process, pid

    async def kill_group(self, pid: int) -> None:
        """SIGKILL the process group led by ``pid`` (started by :meth:`spawn`), over a command of its own."""
        await self.run(self._kill_script([pid]))
        self._spawned.discard(pid)

    def _kill_script(self, pids: Iterable[int]) -> str:
        # Only processes that still carry this target's token: the host may
        # have given a dead one's pid to something else.
        mark = f"SHOAL_SSH_OWNER={self.target.token}"
        return " ".join(
            f"if tr '\\0' '\\n' < /proc/{pid}/environ 2>/dev/null | grep -qx {mark}; "
            f"then kill -KILL -- -{pid} 2>/dev/null; fi;"
            for pid in sorted(pids)
        ) + " true"

    async def _sweep(self) -> None:
        """After a reconnect: kill what this link started over its earlier connections."""
        pids, self._spawned = self._spawned, set()
        try:
            await self.run(self._kill_script(pids))
        except HostLost:
            self._spawned |= pids  # lost again at once: the next connect tries again
            raise

    async def close(self) -> None:
        """Kill what this link started on the host, then close the connection for good (no loss is reported)."""
        self._closing = True
        if self._spawned:
            with contextlib.suppress(OffloadError, TimeoutError):
                async with asyncio.timeout(self.target.connect_timeout + 1.0):
                    conn = self._conn
                    if conn is None:
                        # A lost connection leaves what it started running:
                        # connect once more, backoff or not, to end it.
                        conn = await self._connect()
                        self._conn = conn
                    pids, self._spawned = self._spawned, set()
                    await self._run_on(conn, self._kill_script(pids))
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()

    def _since(self) -> str:
        return f" ({self.down_because})" if self.down_because else ""

    @contextlib.contextmanager
    def _mapped(self, doing: str) -> Iterator[None]:
        """Map what asyncssh and the network raise to the errors of this package, naming the host."""
        import asyncssh

        host = self.host
        target = self.target
        try:
            yield
        except asyncssh.HostKeyNotVerifiable as exc:
            file = target.known_hosts or "(none)"
            raise HostKeyError(
                f"the host key of {host} is not trusted: it is not listed in {file}, or it differs "
                f"from the key listed there ({exc.reason}); if this is the host you mean, add its "
                f"key (ssh-keyscan -p {host.port} {host.name} >> {file}, then check the "
                f"fingerprint with the host's owner) — a changed key can also mean that another "
                f"machine answers in its place",
                host=str(host),
                known_hosts=file,
            ) from exc
        except asyncssh.PermissionDenied as exc:
            user = self.username or getpass.getuser()
            keys = ", ".join(target.client_keys) if target.client_keys else "the SSH agent's and ~/.ssh/id_*"
            raise AuthenticationFailed(
                f"host {host} refused the login of user {user!r} ({exc.reason}): none of the client "
                f"keys offered ({keys}) was accepted; add the public key to ~{user}/.ssh/"
                f"authorized_keys on that host, or give offload.SSH the client_keys= and "
                f"username= that it accepts",
                host=str(host),
                username=user,
            ) from exc
        except TimeoutError as exc:
            if doing != "connecting":
                raise HostLost(f"host {host} did not finish {doing} in time{self._since()}") from exc
            raise HostLost(
                f"host {host} did not answer within connect_timeout={target.connect_timeout:g}s "
                f"while {doing}; check that it is up and reachable, or raise connect_timeout="
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            why = _reason(exc)
            if doing == "connecting":
                raise HostLost(
                    f"cannot connect to host {host}: {why}; check that the host is up, that sshd "
                    f"listens on port {host.port} and that nothing blocks it"
                ) from exc
            raise HostLost(
                f"the connection to host {host} failed while {doing}: {why}{self._since()}"
            ) from exc


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = reason if isinstance(reason, str) and reason else (str(exc) or type(exc).__name__)
    if isinstance(exc, OSError) and exc.strerror and exc.strerror not in text:
        text = f"{exc.strerror} ({text})"
    return text


def _text(data: Any) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return str(data)


def _count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"offload.SSH {name}= takes a whole number >= {least}, got {value!r}")
    return value


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"offload.SSH {name}= takes a number of seconds > 0, got {value!r}")
    return float(value)
