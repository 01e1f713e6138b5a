"""What crosses a process boundary between the engine and a worker.

Every backend (``offload.Local``, SSH hosts, AWS Batch) speaks this one
protocol; only the transport differs (pipes, an SSH channel, objects in
S3).  Messages are tagged msgspec Structs, msgpack-encoded, each sent as
one *frame*: a 4-byte big-endian length, then the body.

A conversation::

    worker -> Hello                       versions, CPUs, GPUs, host, pid
    engine -> Start(id, payload)          many, possibly several at once
    worker -> NeedBundle(digest)          only when the code bundle is not cached
    engine -> BundleData(digest, data)
    worker -> Log / Trace                 while the attempt runs
    engine -> Cancel(id)                  optional
    engine -> Withdraw(id)                optional: take back an attempt still queued
    worker -> Withdrawn(id, dropped)      one per Withdraw
    worker -> Done(id, outcome)           exactly one per Start that was not withdrawn
    engine -> FindPort                    optional: a gang's rank 0 is to listen on this host
    worker -> PortFound(port)             one per FindPort, in order
    engine -> Shutdown                    or the transport closes

A worker started with a concurrency (``--concurrency N``) runs at most N
attempts at once; the engine may send it more, which wait in the worker,
in the order they came, and start as running ones end (pipelining: the
worker never waits a round trip for its next attempt).  ``Withdraw`` drops
such a queued attempt (``Withdrawn(dropped=True)``, and no Done follows);
one that has started is not stopped by it (``dropped=False``; its Done
comes, or came, as usual).  ``Cancel`` of a queued attempt drops it too,
answered with its Done.

The engine's ``parallel_map`` pool speaks the same protocol to its own
worker processes, with one more pair of messages::

    engine -> Chunk(fn, items)            many, answered strictly in order
    worker -> ChunkDone | ChunkFailed     exactly one per Chunk

Values travel encoded by :func:`engine._codec.encode_value` (msgpack, or
pickle for what msgspec cannot encode, marked by ``kind``); ``File``,
``Dir`` and ``DataFrame`` are references and travel as such.  A chunk's
items and results are the user's objects and stay pickled bytes (msgpack
would not keep their types); the frame only carries them.
"""

# No `from __future__ import annotations`: msgspec reads these annotations.
import struct
from typing import Any, Final, Literal

import msgspec

from ._cluster import Cluster
from ._records import ErrorInfo

__all__ = [
    "MAX_FRAME",
    "BundleData",
    "Cancel",
    "Chunk",
    "ChunkDone",
    "ChunkFailed",
    "Done",
    "FindPort",
    "FunctionRef",
    "Hello",
    "Log",
    "Message",
    "NeedBundle",
    "Outcome",
    "Payload",
    "PortFound",
    "Shutdown",
    "Start",
    "Trace",
    "Withdraw",
    "Withdrawn",
    "decode_message",
    "encode_frame",
    "frame_length",
    "frame_parts",
]

#: Version of this protocol; a worker speaking another one is refused at hello.
PROTOCOL: Final = 2
#: Largest frame either side accepts (a bigger value goes through the blob store).
MAX_FRAME: Final = 1 << 30
HEADER: Final = struct.Struct(">I")


class FunctionRef(msgspec.Struct, frozen=True):
    """How a worker finds a task's function: by import path, from the code bundle.

    ``module`` is the module to import and ``qualname`` the task inside it.
    For a task defined in a script (``python flow.py``, ``shoal run
    flow.py``), ``path`` is the script's path inside the bundle (POSIX
    separators), imported under ``module`` (never as ``__main__``).
    """

    module: str
    qualname: str
    path: str | None = None

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.module}:{self.qualname}{where}"


class Payload(msgspec.Struct, frozen=True):
    """One attempt of one action, as a worker needs it."""

    run_id: str
    key: str
    attempt: int
    task: str
    fn: FunctionRef
    #: ``(values, named)`` of the call, encoded with ``encode_value``.
    args_kind: str
    args: bytes
    timeout: float | None = None
    env: dict[str, str] = {}
    cpu: float = 0.0
    memory: int = 0
    gpu: int = 0
    #: SHA-256 of the code bundle to put first on ``sys.path`` (None: none).
    bundle: str | None = None
    #: URI of the blob store that ``File``/``Dir`` made by the attempt go to.
    blob_store: str | None = None
    #: Trace results this action recorded before (in earlier attempts, or
    #: earlier runs of a resumed run), by trace key: the worker returns
    #: them instead of running those traces again.
    traces: dict[str, tuple[str, bytes]] = {}
    #: This rank's place when the attempt is one rank of a gang (None: a
    #: single attempt).  The worker makes it what ``engine.cluster()``
    #: returns, and sets its variables in the environment.
    cluster: Cluster | None = None


class Outcome(msgspec.Struct, frozen=True):
    """How an attempt ended on the worker: a value or an error."""

    ok: bool
    value_kind: str = ""
    value: bytes = b""
    error: ErrorInfo | None = None
    #: The exception itself, pickled, when it could be: rebuilt as its own
    #: type on the engine's side if that side can import it.
    error_pickle: bytes | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    #: Where it ran: ``host:pid``, or a job id.
    where: str = ""
    #: The task's own exception (``"user"``) or the worker's (``"system"``:
    #: the function could not be imported, the arguments not decoded).
    error_kind: str = "user"
    #: For a gang: the rank this outcome is of (rank 0's when all
    #: succeeded, else the first rank that failed) and where each rank ran,
    #: by rank.  None and empty for a single attempt.
    rank: int | None = None
    ranks: list[str] = []


# -- messages -------------------------------------------------------------


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    python: str
    shoal: str
    cpus: int
    gpus: int
    hostname: str
    pid: int
    protocol: int = PROTOCOL
    #: The interpreter running the worker (``sys.executable``).
    executable: str = ""


class Start(msgspec.Struct, frozen=True, tag="start"):
    id: int
    payload: Payload


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    id: int


class Withdraw(msgspec.Struct, frozen=True, tag="withdraw"):
    """Take back attempt ``id`` if it is still queued in the worker (it has not started)."""

    id: int


class Withdrawn(msgspec.Struct, frozen=True, tag="withdrawn"):
    """The answer to ``Withdraw(id)``: ``dropped`` if it never ran (no Done follows), else it had started."""

    id: int
    dropped: bool


class FindPort(msgspec.Struct, frozen=True, tag="find-port"):
    """Ask the worker for a TCP port free on every address of its host now (answered by PortFound)."""


class PortFound(msgspec.Struct, frozen=True, tag="port-found"):
    port: int


class NeedBundle(msgspec.Struct, frozen=True, tag="need-bundle"):
    digest: str


class BundleData(msgspec.Struct, frozen=True, tag="bundle"):
    digest: str
    data: bytes


class Log(msgspec.Struct, frozen=True, tag="log"):
    id: int
    stream: str
    text: str
    at: float = 0.0


class Trace(msgspec.Struct, frozen=True, tag="trace"):
    """A trace call inside attempt ``id`` succeeded: journal its result."""

    id: int
    key: str
    name: str
    kind: str
    data: bytes


class Done(msgspec.Struct, frozen=True, tag="done"):
    id: int
    outcome: Outcome


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    pass


class Chunk(msgspec.Struct, frozen=True, tag="chunk"):
    """Items of one ``parallel_map`` call for a worker of the engine's process pool.

    ``fn`` is the call's function id.  ``function`` is the pickled
    ``(sys.path, pickled function)``, sent only the first time this worker
    gets that id (it keeps the most recent ones; the pool mirrors which),
    else empty.  ``items`` is the pickled list of items.
    """

    fn: int
    items: bytes
    function: bytes = b""


class ChunkDone(msgspec.Struct, frozen=True, tag="chunk-done"):
    """The results of the oldest unanswered Chunk: a pickled list, one per item."""

    results: bytes
    #: Seconds spent in the function (the pool sizes chunks from them).
    seconds: float = 0.0


class ChunkFailed(msgspec.Struct, frozen=True, tag="chunk-failed"):
    """The oldest unanswered Chunk failed.

    ``stage`` says where: ``"call"`` the function raised on item ``index``
    of the chunk (or a result could not be pickled); ``"function"`` the
    function could not be unpickled (the worker did not keep it);
    ``"items"`` the items could not be unpickled.
    """

    stage: Literal["call", "function", "items"]
    error: ErrorInfo
    index: int = 0
    seconds: float = 0.0
    #: The exception itself, pickled, when it can be rebuilt (see Outcome).
    error_pickle: bytes | None = None
    #: The module a ModuleNotFoundError could not find (the pool then ships
    #: that module's functions by value).
    missing_module: str | None = None


Message = (
    Hello
    | Start
    | Cancel
    | Withdraw
    | Withdrawn
    | FindPort
    | PortFound
    | NeedBundle
    | BundleData
    | Log
    | Trace
    | Done
    | Shutdown
    | Chunk
    | ChunkDone
    | ChunkFailed
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Message)


def encode_frame(message: Any) -> bytes:
    """One message as a frame: its length, then its msgpack body."""
    header, body = frame_parts(message)
    return header + body


def frame_parts(message: Any) -> tuple[bytes, bytes]:
    """One message as a frame in two pieces, its header and its body.

    For a large message (a chunk of items) written to a transport as two
    writes, so that the body is not copied once more behind the header.
    """
    body = _encoder.encode(message)
    if len(body) > MAX_FRAME:
        raise ValueError(f"a {type(message).__name__} message of {len(body)} bytes is over the frame limit")
    return HEADER.pack(len(body)), body


def frame_length(header: bytes) -> int:
    """The body length announced by a frame's 4-byte header."""
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ValueError(f"a frame of {length} bytes is over the limit: not a shoal worker stream")
    return int(length)


def decode_message(body: bytes | bytearray | memoryview) -> Message:
    """A frame's body back as its message (``msgspec.DecodeError`` if it is not one)."""
    message: Message = _decoder.decode(body)
    return message
