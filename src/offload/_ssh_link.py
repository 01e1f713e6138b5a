"""One SSH connection to one host of an ``offload.SSH`` target.

A :class:`_Link` opens the connection (host keys checked, keepalives on),
runs commands and starts remote processes in process groups of their own
(marked, so that a later connection can kill what an earlier one left),
notices a lost connection, and reconnects with backoff.  The backend
(``_ssh.SSH``) owns one link per host and decides what runs where.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import random
from typing import TYPE_CHECKING, Any, Final

from engine import OffloadError
from engine.extend import Backoff, HostLost

from ._errors import AuthenticationFailed, HostKeyError
from ._ssh_remote import Facts, ensure_bundle, probe, shell_prefix

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from pathlib import Path

    import asyncssh

    from ._ssh import SSH, Host
    from ._ssh_workers import RemoteWorker

__all__ = ["RECONNECT", "Completed", "_Link"]

#: Waits before a lost host is connected to again: 1 s, doubled per failure
#: in a row, up to a minute, spread by +-10% so that hosts lost together do
#: not all come back at once.
RECONNECT: Final = Backoff(base=1.0, max_delay=60.0, jitter=0.1)

_log = logging.getLogger("offload.ssh")


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

    def told(self, facts: Facts, conn: asyncssh.SSHClientConnection | None) -> None:
        """What a worker's hello over connection ``conn`` says of the host: the probe of that connection."""
        if conn is not None and conn is self._conn:
            self.facts, self._facts_of = facts, conn

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
        """Start a long-lived ``command`` on the host: see :meth:`start`, which also says where it runs."""
        process, pid, _ = await self.start(command)
        return process, pid

    async def start(self, command: str) -> tuple[asyncssh.SSHClientProcess[bytes], int, str]:
        """Start a long-lived ``command`` on the host, in ``remote_dir`` with the target's env; it, its pid and that folder.

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
            f'{shell_prefix(self)}export SHOAL_SSH_OWNER={self.target.token}; echo $$ "$(pwd -P)"; exec {command}'
        )
        with self._mapped(f"starting {command!r}"):
            process = await conn.create_process(line, encoding=None)
            first = await process.stdout.readline()
        pid_text, _, folder = first.decode("utf-8", "replace").rstrip("\n").partition(" ")
        try:
            pid = int(pid_text)
        except ValueError:
            process.close()
            err = _text(await process.stderr.read(2000)) if not first else first.decode(errors="replace")
            raise OffloadError(
                f"host {self.host} did not start {command!r}: {' '.join(err.split()) or 'it exited at once'}"
            ) from None
        self._spawned.add(pid)
        return process, pid, folder

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
