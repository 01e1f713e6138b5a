"""Framed messages over an asyncio stream pair: the transport of the worker protocol.

One :class:`Frames` wraps a reader and a writer (the pipes of a local
worker process, an SSH channel, the socket of a ``parallel_map`` worker)
and moves the messages of :mod:`engine._wire` over them, each as one
frame (a 4-byte length, then the msgpack body).  Both ends of the
protocol use it: the engine's side in each backend, and the worker
(:mod:`engine._serve`).

Frames never interleave: each is handed to the writer by a single
``write()`` call made on the loop's thread (:meth:`Frames.send`, or
:meth:`Frames.post`, which threads use), and ``write()`` takes the whole
frame into the transport's buffer at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from ._errors import OffloadError
from ._wire import decode_message, encode_frame, frame_length

if TYPE_CHECKING:
    from ._wire import Message

__all__ = ["FrameReader", "FrameWriter", "Frames", "StreamBroken"]


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
        self.writer = writer
        self.peer = peer
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # Serialises waiting for the writer's buffer to drain; the frames
        # themselves cannot interleave (see the module docstring).
        self._drain_lock = asyncio.Lock()

    async def send(self, message: Any) -> None:
        """Send one message; waits while the peer is slow to read (flow control).

        Raises ``ConnectionError`` when the peer has gone away.
        """
        self.writer.write(encode_frame(message))
        async with self._drain_lock:
            await self.writer.drain()

    async def drain(self) -> None:
        """Wait until what was posted has been handed to the transport (flow control)."""
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
        if not self.writer.is_closing():
            self.writer.write(frame)

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

    async def aclose(self) -> None:
        """Close the writing side (the peer sees EOF) and wait until it is closed."""
        if self.writer.is_closing():
            return
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
