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
import ipaddress
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

import msgspec

from engine import ConfigError, OffloadError
from engine.extend import BackendContext, Handle, HostLost, Start

from ._errors import HostKeyError
from ._local import QUEUE, SHUTDOWN_GRACE, _Attempt, cancel_attempt, outcome_of, room
from ._ssh_blobs import BlobCopies
from ._ssh_gang import Gangs
from ._ssh_link import _Link

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence
    from types import TracebackType

    from engine.extend import AttemptHooks, Gang, Outcome, Payload

    from ._local import WorkerClient
    from ._ssh_workers import RemoteWorker

__all__ = ["SSH", "Host", "parse_host"]

#: Seconds a submit waiting for a slot looks again at hosts whose backoff may have passed.
RECHECK: Final = 0.5

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
    ``ranks_per_host``: the most ranks of gangs (``nodes=``) on one host at
    once, unless the task says (see ``_ssh_gang``).

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
        ranks_per_host: int = 1,
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
        self.ranks_per_host = _count("ranks_per_host", ranks_per_host, 1)
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
        # Gangs (nodes=): their places on the hosts and their ranks' workers.
        self._gangs = Gangs(self)
        # What is done with the File/Dir blobs of attempts (copied to and
        # from the hosts for a local store): set by open() for its engine's store.
        self._copies = BlobCopies(None)

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
        unless none can be reached.  An engine opens its target when the
        first attempt is on its way, so each host's first worker is started
        then, and its hello stands in for the probe (see ``_ready``).
        """
        await self._open(context, warm=True)

    async def _open(self, context: BackendContext, *, warm: bool) -> None:
        if self._links:
            return  # open already: one connection per host, not two
        self._context = context
        self._copies = BlobCopies(context.blob_store)
        self._trust, self._keys = await asyncio.to_thread(self._credentials)
        clock = context.monotonic or time.monotonic
        self._links = [_Link(self, host, clock) for host in self.hosts]
        for link in self._links:
            link.on_lost(functools.partial(self._host_lost, link))
        results = await asyncio.gather(*(self._ready(link, warm) for link in self._links), return_exceptions=True)
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

    async def _ready(self, link: _Link, warm: bool) -> None:
        """Connect to a host and learn what it is: with ``warm``, from the hello of its first worker.

        That worker is started anyway for the attempt on its way, and its
        hello says what the probe would, so the probe is run only when the
        worker does not come up: it says what is wrong with the host (no
        such interpreter, no shoal, another version, ``remote_dir``).
        """
        from ._ssh_remote import facts_of
        from ._ssh_workers import start_worker

        conn = await link.connection()
        if not warm:
            await link.prepare()
            return
        generation = self._generation
        # The first attempt checks its code bundle over SFTP: opened meanwhile.
        session = asyncio.get_running_loop().create_task(link.sftp())
        link.starting += 1
        try:
            worker = await start_worker(self, link, self._copies.worker_env(), self._copies.worker_args())
        except HostLost:
            raise
        except OffloadError as exc:
            await link.prepare()  # raises what is wrong with the host, if that is it
            # The host is fine: the next attempt starts a worker again (and says why, if it fails).
            _log.warning("host %s: its first worker did not start: %s", link.host, exc)
            return
        finally:
            link.starting -= 1
            with contextlib.suppress(Exception):
                await session  # a failure is met again where SFTP is used
        if generation != self._generation or link._conn is not conn:
            await worker.stop(0, "offload.SSH was closed, or the host was lost, as it started")
            if generation != self._generation:
                raise OffloadError(f"{self!r} was closed while it opened")
            raise HostLost(f"the connection to host {link.host} was lost as its first worker started")
        link.told(facts_of(worker.hello, worker.folder), conn)
        link.workers.append(worker)
        self._wake()

    async def __aenter__(self) -> SSH:
        if self._context is None:
            # On its own: nothing is kept on this machine, so no home is
            # needed; no attempt is on its way, so no worker is started yet.
            await self._open(BackendContext(home=Path(os.devnull)), warm=False)
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
        await asyncio.gather(
            *(w.stop(SHUTDOWN_GRACE, "offload.SSH was closed") for w in workers), self._gangs.aclose()
        )
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
        """Attempts taken at once on the hosts known now: workers x (concurrency + QUEUE), of which workers x concurrency run."""
        return max(1, sum(self._workers_on(link) for link in self._links)) * (self.concurrency + QUEUE)

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

        The code bundle goes to that host first (once per digest, SFTP),
        and so do the blobs of the engine's local store that the arguments
        reference (see ``_ssh_blobs``).  A GPU attempt gets
        ``CUDA_VISIBLE_DEVICES`` for the GPUs it holds there.  No host up:
        ``HostLost`` (retried by the engine).
        """
        context = self._context
        if context is None or not self._links:
            raise OffloadError(
                f"{self!r} is not open: use it through an engine, or `async with offload.SSH(...)`"
            )
        blobs = self._copies.needed(payload)
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
            sends: list[Awaitable[object]] = []
            if payload.bundle is not None and context.bundle_path is not None:
                sends.append(link.bundle(payload.bundle, context.bundle_path(payload.bundle)))
            if blobs:
                sends.append(self._copies.send(link, blobs))
            if len(sends) > 1:
                await asyncio.gather(*sends)
            elif sends:
                await sends[0]  # alone: no gather, which would cost a task per attempt
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
        gang = self._gangs.attempts.get(handle.id)
        if gang is not None:
            # A gang's result is rank 0's: its blobs come from rank 0's host.
            attempt, outcome = gang.attempts[0], await self._gangs.wait(handle)
        else:
            attempt, outcome = await outcome_of(self._attempts, handle, "offload.SSH", self._discard)
        # The blobs a result names are here before the result is delivered.
        link = cast("RemoteWorker", attempt.worker).link
        await self._copies.bring_back(link, attempt.payload, outcome)
        return outcome

    async def cancel(self, handle: Handle) -> None:
        """Kill the worker running the attempt (every rank's, for a gang), and its process group."""
        if handle.id in self._gangs.attempts:
            await self._gangs.cancel(handle)
            return
        await cancel_attempt(self._attempts, handle, self._discard)

    def gang_unfit(self, gang: Gang, cpu: float, gpu: int) -> str | None:
        """Why the hosts can never hold ``gang`` (``ranks_per_host`` and each host's slots), or None."""
        return self._gangs.unfit(gang, cpu, gpu)

    async def submit_gang(self, payload: Payload, gang: Gang, hooks: AttemptHooks) -> Handle:
        """Place ``gang.nodes`` ranks over the hosts, all or none, each in a fresh worker (see ``_ssh_gang``)."""
        if self._context is None or not self._links:
            raise OffloadError(
                f"{self!r} is not open: use it through an engine, or `async with offload.SSH(...)`"
            )
        return await self._gangs.submit(payload, gang, hooks)

    async def reattach(self, handle: Handle) -> Handle | None:
        # Workers die with the connection that started them: nothing to find again.
        return None

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
            queued: tuple[_Link, RemoteWorker] | None = None
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
                slots = max(1, self._workers_on(link)) * self.concurrency
                busy = sum(len(w.in_flight) for w in link.workers) + link.starting
                if busy >= slots:
                    # No free slot here: a place in a worker's queue (once
                    # all its workers are up), pipelining short attempts.
                    if len(link.workers) >= self._workers_on(link):
                        for w in link.workers:
                            if room(w, self.concurrency) > 0 and (
                                queued is None or len(w.in_flight) < len(queued[1].in_flight)
                            ):
                                queued = (link, w)
                    continue
                if best is None or busy / slots < best_load:
                    best, best_load = link, busy / slots
            if best is not None:
                link = best
                gpus_held = self._hold(link, payload.cpu, payload.gpu)
                idle = [w for w in link.workers if len(w.in_flight) < self.concurrency]
                if idle:
                    return link, min(idle, key=lambda w: len(w.in_flight)), gpus_held
                link.starting += 1
                try:
                    worker = await start_worker(self, link, self._copies.worker_env(), self._copies.worker_args())
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
            if queued is not None:
                link, worker = queued
                return link, worker, self._hold(link, payload.cpu, payload.gpu)
            await self._await_room(connected, "")

    async def _await_room(self, connected: bool, what: str) -> None:
        """Nothing fits now: ``HostLost`` if no host is up nor coming back, else wait for the slots to change.

        ``what`` is said after "no host is up" (what was waiting: a gang).
        """
        if not connected and not self._reconnects:
            raise HostLost(
                f"no host of {self!r} is up{what}: "
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
        self._gangs.host_lost(link, why)
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
        self._gangs.drop_spare(worker)
        self._wake()

    async def _discard(self, worker: WorkerClient, why: str) -> None:
        """Kill a worker and its process group, failing what else it ran; replaced lazily."""
        await worker.kill(why)
        self._wake()


def _count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"offload.SSH {name}= takes a whole number >= {least}, got {value!r}")
    return value


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"offload.SSH {name}= takes a number of seconds > 0, got {value!r}")
    return float(value)
