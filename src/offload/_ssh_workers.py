"""The warm workers of ``offload.SSH``: ``python -m offload.worker`` over an SSH channel.

Each worker is a long-lived process on a host, started by
:meth:`~offload._ssh_link._Link.spawn` (its own process group, marked with the
target's token), speaking the worker protocol over the channel's stdin and
stdout as byte streams; the engine's side of it is the same
:class:`~offload._local.WorkerClient` that ``offload.Local`` uses over
pipes.  Its stderr is drained all the time (unread output would hold the
channel) and the end of it kept, to quote when the worker dies.

The first worker of a host is also its probe when an engine opens its
target: its hello says what the probe would (see ``SSH._ready``).

Ending a worker: closing its stdin (EOF) ends it by itself; a kill is a
SIGKILL of its process group, sent over a command of its own on the same
connection.  When that connection is gone there is nobody to send it: the
link kills what it started once it connects again (see ``_Link._sweep``),
and the attempts fail with ``HostLost`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
from typing import TYPE_CHECKING, Any

from engine import OffloadError
from engine.extend import (
    Frames,
    Hello,
    HostLost,
    StreamBroken,
    SubmitFailed,
    WorkerLost,
)

from ._local import SHUTDOWN_GRACE, START_TIMEOUT, TAIL_BYTES, WorkerClient, check_hello

if TYPE_CHECKING:
    from collections.abc import Sequence

    import asyncssh

    from ._ssh import SSH
    from ._ssh_link import _Link

__all__ = ["RemoteWorker", "start_worker"]


class _Stdout:
    """The reading half of a worker's channel for :class:`Frames`, with asyncssh's errors as ``ConnectionError``."""

    def __init__(self, reader: asyncssh.SSHReader[bytes]) -> None:
        self._reader = reader

    async def readexactly(self, n: int) -> bytes:
        import asyncssh

        try:
            return await self._reader.readexactly(n)
        except asyncssh.Error as exc:
            raise ConnectionResetError(f"the channel failed: {exc.reason or exc}") from exc


class _Stdin:
    """The writing half of a worker's channel for :class:`Frames`: closing it sends EOF, not a channel close.

    So the worker sees the end of its stdin and exits by itself, and its
    last frames and exit status still come back over the channel.
    """

    def __init__(self, writer: asyncssh.SSHWriter[bytes]) -> None:
        self._writer = writer
        self._eof = False

    def write(self, data: bytes) -> None:
        import asyncssh

        try:
            self._writer.write(data)
        except asyncssh.Error as exc:
            raise ConnectionResetError(f"the channel failed: {exc.reason or exc}") from exc

    async def drain(self) -> None:
        import asyncssh

        try:
            await self._writer.drain()
        except asyncssh.Error as exc:
            raise ConnectionResetError(f"the channel failed: {exc.reason or exc}") from exc

    def is_closing(self) -> bool:
        return self._eof or self._writer.is_closing()

    def close(self) -> None:
        if not self._eof:
            self._eof = True
            with contextlib.suppress(Exception):
                self._writer.write_eof()

    async def wait_closed(self) -> None:
        return None


class RemoteWorker(WorkerClient):
    """One worker process on an SSH host, over one channel of the host's connection."""

    retry_note = "the attempt is retried on a new worker"

    def __init__(
        self,
        backend: SSH,
        link: _Link,
        process: asyncssh.SSHClientProcess[bytes],
        pid: int,
        frames: Frames,
        hello: Hello,
        folder: str,
    ) -> None:
        super().__init__(
            backend, frames, hello, pid, f"the worker process {pid} on host {link.host}",
            concurrency=backend.concurrency,
        )
        self.link = link
        #: The folder it runs in: the host's ``remote_dir``, resolved.
        self.folder = folder
        self.process = process
        # The connection it was started over: a kill can only go over that
        # one (after a reconnect the link's sweep kills it instead).
        self.conn = link._conn
        self._stderr = bytearray()
        self._drainer = asyncio.get_running_loop().create_task(self._drain_stderr())

    @property
    def lost_as(self) -> type[OffloadError]:  # type: ignore[override]
        # The connection went with it: the host is lost, not just this worker.
        return HostLost if self.link._conn is not self.conn else WorkerLost

    async def _drain_stderr(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                chunk = await self.process.stderr.read(65536)
                if not chunk:
                    return
                self._stderr += chunk
                del self._stderr[:-TAIL_BYTES]

    async def terminate(self) -> None:
        if self.link._conn is self.conn and self.conn is not None:
            with contextlib.suppress(OffloadError, TimeoutError):
                async with asyncio.timeout(self.link.target.connect_timeout):
                    await self.link.kill_group(self.pid)
        self.process.close()

    async def exited(self, within: float | None) -> str | None:
        try:
            # Bounded even when told to wait: a channel of a dead connection
            # may never say how its process ended.
            await asyncio.wait_for(self.process.wait_closed(), within or SHUTDOWN_GRACE)
        except TimeoutError:
            return None if within is not None else "an unknown status (the channel did not close)"
        process = self.process
        if process.exit_signal is not None:
            name = process.exit_signal[0]
            return f"SIG{name} (signal {_signum(name)})" if _signum(name) else f"signal {name}"
        if process.exit_status is None or process.exit_status < 0:
            return "no exit status: the connection was lost under it"
        return f"exit status {process.exit_status}"

    def stderr_tail(self) -> str:
        text = self._stderr.decode("utf-8", "replace").strip()
        if not text:
            return ""
        return "; its stderr ends with:\n" + "\n".join("    " + line for line in text.splitlines())

    async def lost(self, broken: str | None) -> None:
        await super().lost(broken)
        self._drainer.cancel()


def _signum(name: str) -> int:
    try:
        return int(signal.Signals[f"SIG{name}"])
    except KeyError:
        return 0


async def start_worker(
    backend: SSH, link: _Link, extra_env: dict[str, Any], extra_args: Sequence[str] = ()
) -> RemoteWorker:
    """Start one worker on ``link``'s host and take its hello (refusing another shoal).

    It needs no probe of the host first (the first worker stands in for
    it): it starts in ``remote_dir``, which is its cache.
    """
    words = [
        shlex.quote(backend.python), "-m", "offload.worker", "--cache", ".",
        "--concurrency", str(backend.concurrency), *map(shlex.quote, extra_args),
    ]
    if extra_env:
        words = ["env", *(f"{k}={shlex.quote(str(v))}" for k, v in extra_env.items()), *words]
    command = " ".join(words)
    process, pid, folder = await link.start(command)
    peer = f"the worker process {pid} on host {link.host} ({backend.python})"
    frames = Frames(_Stdout(process.stdout), _Stdin(process.stdin), peer)

    async def give_up() -> None:
        with contextlib.suppress(OffloadError, TimeoutError):
            async with asyncio.timeout(backend.connect_timeout):
                await link.kill_group(pid)
        process.close()

    try:
        try:
            message = await asyncio.wait_for(frames.recv(), START_TIMEOUT)
        except TimeoutError:
            raise SubmitFailed(f"{peer} said nothing for {START_TIMEOUT:g}s after it started") from None
        except StreamBroken as exc:
            raise SubmitFailed(f"{exc} instead of its hello") from None
        except (OffloadError, ConnectionError) as exc:
            raise HostLost(f"host {link.host} was lost while {peer} started: {exc}") from None
        if message is None:
            err = b""
            with contextlib.suppress(Exception):
                err = await asyncio.wait_for(process.stderr.read(TAIL_BYTES), 1.0)
            tail = " ".join(err.decode("utf-8", "replace").split())
            raise SubmitFailed(
                f"{peer} exited before it said hello: {tail or 'it wrote nothing to stderr'}"
            )
        hello = check_hello(message, peer, f"host {link.host}", backend.python, "there")
    except BaseException:
        await give_up()
        raise
    worker = RemoteWorker(backend, link, process, pid, frames, hello, folder)
    worker.reader = asyncio.get_running_loop().create_task(worker.read(), name=f"shoal-ssh-worker-{link.host}-{pid}")
    return worker

