"""Framed messages over an asyncio stream pair: the transport of the worker protocol.

One :class:`Frames` wraps a reader and a writer (the pipes of a local
worker process, an SSH channel, the socket of a ``parallel_map`` worker)
and moves the messages of :mod:`engine._wire` over them, each as one
frame (a 4-byte length, then the msgpack body).  Both ends of the
protocol use it: the engine's side in each backend, and the worker
(:mod:`engine._serve`).

:class:`SocketFrames` is the same over a socket this process owns (a
``parallel_map`` worker's): there, messages are decoded and handed to the
consumer in the callback where their bytes arrive (:meth:`Frames.each`),
with no task woken per message.

Frames never interleave: each is encoded whole and handed to the writer
on the loop's thread (:meth:`Frames.send`, or :meth:`Frames.post`, which
threads use), in the order they were sent.  :class:`Frames` gathers the
frames sent during one turn of the loop and writes them together at its
end, one ``write()`` (one system call, one wake-up of the peer) for all
of them: with attempts pipelined to a worker, the engine's Starts and the
worker's Dones come in bursts, and a write per frame was a third of
either side's time (measured on pipes).  A frame still goes out in the
same turn it was sent, so nothing waits longer than the loop's turn.
:class:`SocketFrames` writes each frame at once (its peer, the
``parallel_map`` pool, paces chunks by their answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from ._errors import OffloadError
from ._wire import HEADER, MAX_FRAME, decode_message, encode_frame, frame_length

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from ._wire import Message

__all__ = ["FrameReader", "FrameWriter", "Frames", "SocketFrames", "StreamBroken", "take_frames"]

#: Pending bytes past which gathered frames are written at once (and a frame
#: at least this big is written on its own, not copied into a batch).
BATCH_BYTES = 1 << 16


class FrameReader(Protocol):
    """The reading half of a transport (``asyncio.StreamReader``, an asyncssh reader).

    ``readexactly`` raises ``asyncio.IncompleteReadError`` at the end of the stream.
    """

    async def readexactly(self, n: int, /) -> bytes: ...


class FrameWriter(Protocol):
    """The writing half of a transport (``asyncio.StreamWriter``, an asyncssh writer)."""

    def write(self, data: bytes, /) -> Any: ...

    async def drain(self) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> Any: ...

    async def wait_closed(self) -> None: ...


class StreamBroken(OffloadError):
    """The other end of a frame stream sent something that is not a whole frame of the protocol."""


class Frames:
    """Send and receive protocol messages over ``reader``/``writer``; ``peer`` names the other end in errors."""

    def __init__(self, reader: FrameReader, writer: FrameWriter, peer: str) -> None:
        self.reader = reader
        self._setup(writer, peer)

    def _setup(self, writer: FrameWriter, peer: str) -> None:
        self.writer = writer
        self.peer = peer
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # Serialises waiting for the writer's buffer to drain; the frames
        # themselves cannot interleave (see the module docstring).
        self._drain_lock = asyncio.Lock()
        # Invariant: ``_batch`` holds the frames sent during this turn of the
        # loop and not yet written, in order, ``_batched`` bytes in all; a
        # flush is scheduled (call_soon) whenever it is not empty.
        self._batch: list[bytes] = []
        self._batched = 0

    async def send(self, message: Any) -> None:
        """Send one message; waits while the peer is slow to read (flow control).

        The frame is written at the end of this turn of the loop, with the
        others sent during it.  Raises ``ConnectionError`` when the peer
        has gone away.
        """
        self._write(encode_frame(message))
        async with self._drain_lock:
            await self.writer.drain()

    async def drain(self) -> None:
        """Wait until what was posted has been handed to the transport (flow control)."""
        self.flush()
        async with self._drain_lock:
            await self.writer.drain()

    def post(self, message: Any) -> None:
        """Queue one message without waiting, from any thread; messages from one thread keep their order.

        From another thread the frame is encoded there and written by the
        loop, in order with every other callback that thread hands the
        loop afterwards (so a result it reports later comes after it).
        """
        frame = encode_frame(message)
        if threading.get_ident() == self._loop_thread:
            self._write(frame)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                self._loop.call_soon_threadsafe(self._write, frame)

    def _write(self, frame: bytes) -> None:
        batch = self._batch
        if not batch:
            if len(frame) >= BATCH_BYTES:
                self._put(frame)
                return
            self._loop.call_soon(self.flush)
        batch.append(frame)
        self._batched += len(frame)
        if self._batched >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the frames gathered so far now (called at the end of each turn that sent some)."""
        batch = self._batch
        if not batch:
            return
        self._batch = []
        self._batched = 0
        self._put(batch[0] if len(batch) == 1 else b"".join(batch))

    def _put(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def recv(self) -> Message | None:
        """The next message, or None when the peer closed the stream cleanly (between frames).

        A stream that ends inside a frame, or a body that is not a message
        of the protocol, raises :class:`StreamBroken` naming the peer.
        """
        try:
            header = await self.reader.readexactly(4)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise StreamBroken(
                f"{self.peer} closed its stream inside a frame header ({len(exc.partial)} of 4 bytes)"
            ) from None
        try:
            length = frame_length(header)
        except ValueError as exc:
            raise StreamBroken(f"{self.peer} sent something that is not a shoal frame: {exc}") from None
        try:
            body = await self.reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise StreamBroken(
                f"{self.peer} closed its stream inside a frame ({len(exc.partial)} of {length} bytes)"
            ) from None
        try:
            return decode_message(body)
        except msgspec.DecodeError as exc:
            raise StreamBroken(
                f"{self.peer} sent a frame that is not a message of the shoal worker protocol ({exc}); "
                f"check that both sides run the same shoal version"
            ) from None

    async def each(self, handle: Callable[[Message], bool]) -> None:
        """Hand every message to ``handle``, in order, until it returns False or the stream ends.

        ``handle`` is called synchronously, once per message; it must not
        block for long unless nothing else in this loop needs to run.
        """
        while True:
            message = await self.recv()
            if message is None or not handle(message):
                return

    async def aclose(self) -> None:
        """Close the writing side (the peer sees EOF) and wait until it is closed."""
        self.flush()
        if self.writer.is_closing():
            return
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def take_frames(buffer: bytearray, peer: str) -> list[Message]:
    """Decode and remove the whole frames at the start of ``buffer`` (a partial one stays).

    Raises :class:`StreamBroken` when the bytes are not frames of the protocol.
    """
    header = HEADER.size
    messages: list[Message] = []
    start = 0
    end = len(buffer)
    try:
        while end - start >= header:
            (length,) = HEADER.unpack_from(buffer, start)
            if length > MAX_FRAME:
                raise ValueError(f"a frame of {length} bytes is over the limit")
            stop = start + header + length
            if end < stop:
                break
            # Decoded from a view: the body is not copied out first.
            messages.append(decode_message(memoryview(buffer)[start + header : stop]))
            start = stop
    except (ValueError, msgspec.DecodeError) as exc:
        raise StreamBroken(
            f"{peer} sent something that is not a frame of the shoal worker protocol ({exc}); "
            f"check that both sides run the same shoal version"
        ) from None
    finally:
        del buffer[:start]
    return messages


class SocketFrames(Frames):
    """Frames over a connected socket of this process, handed to :meth:`each` as they arrive.

    The worker protocol as :class:`Frames` speaks it, for a worker whose
    transport the engine created (the ``parallel_map`` pool's socket
    pairs).  Each message is decoded and handed on in the very callback
    where its bytes arrive.  Through a stream reader, every message also
    wakes the task waiting on the stream, one more turn of the loop (and
    one more epoll call) each: for a worker answering small chunks one at
    a time that was most of its CPU per chunk (measured ~65 µs per chunk of
    ten tiny items, ~30-45 µs this way).
    """

    def __init__(self, protocol: _FrameProtocol, peer: str) -> None:
        self._protocol = protocol
        self._setup(protocol, peer)

    @classmethod
    async def connect(cls, sock: socket.socket, peer: str) -> SocketFrames:
        """Frames over ``sock`` (connected), bound to the running loop."""
        protocol = _FrameProtocol(peer)
        await asyncio.get_running_loop().create_connection(lambda: protocol, sock=sock)
        return cls(protocol, peer)

    async def recv(self) -> Message | None:
        return await self._protocol.recv()

    def _write(self, frame: bytes) -> None:
        # At once: the pool sends a worker its next chunk when an answer comes.
        self._put(frame)

    async def each(self, handle: Callable[[Message], bool]) -> None:
        await self._protocol.each(handle)


class _FrameProtocol(asyncio.Protocol):
    """The socket's protocol under :class:`SocketFrames`: splits frames, and is its writer."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        # Invariant: ``pending`` holds messages decoded and not yet handed
        # out, oldest first; it is empty while a handler is set (each
        # message goes straight to it).
        self.pending: deque[Message] = deque()
        self.handler: Callable[[Message], bool] | None = None
        # Set once no more messages will be handed out: the stream ended, or
        # the handler said stop, or ``error`` (the stream broke, or the handler raised).
        self.ended = False
        self.error: BaseException | None = None
        # The one recv()/each() waiting for a message or the end, if any.
        self.waiter: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        # Waiting for the transport's buffer to drain (the peer reads slowly).
        self.paused = False
        self.drainers: list[asyncio.Future[None]] = []

    # -- reading -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        self.buffer += data
        try:
            messages = take_frames(self.buffer, self.peer)
            for message in messages:
                handler = self.handler
                if handler is None:
                    self.pending.append(message)
                elif not handler(message):
                    self._end()
                    return
        except Exception as exc:
            self.error = exc
            self._end()
            return
        if self.pending:
            # A recv() waits for these (each() with its handler set waits
            # only for the end: waking it per message would cost a task step).
            self._wake()

    def eof_received(self) -> bool:
        if self.buffer and self.error is None:
            self.error = StreamBroken(f"{self.peer} closed its stream inside a frame ({len(self.buffer)} bytes)")
        self._end()
        return False  # close our side too: the peer is gone

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()
        if not self.closed.done():
            self.closed.set_result(None)
        for drainer in self.drainers:
            if not drainer.done():
                drainer.set_exception(ConnectionResetError(f"{self.peer} closed the connection"))
                drainer.exception()  # seen here; the drain() that awaits it raises it
        self.drainers.clear()

    def _end(self) -> None:
        self.ended = True
        self.buffer.clear()
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter

    async def recv(self) -> Message | None:
        while not self.pending:
            if self.error is not None:
                raise self.error
            if self.ended:
                return None
            await self._wait()
        return self.pending.popleft()

    async def each(self, handle: Callable[[Message], bool]) -> None:
        while self.pending:
            if not handle(self.pending.popleft()):
                return
        self.handler = handle
        try:
            while not self.ended:
                await self._wait()
        finally:
            self.handler = None
        if self.error is not None:
            raise self.error

    # -- writing (the FrameWriter of SocketFrames) -----------------------------

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for drainer in self.drainers:
            if not drainer.done():
                drainer.set_result(None)
        self.drainers.clear()

    async def drain(self) -> None:
        if self.closed.done():
            raise ConnectionResetError(f"{self.peer} closed the connection")
        if self.paused:
            drainer = asyncio.get_running_loop().create_future()
            self.drainers.append(drainer)
            await drainer

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)
