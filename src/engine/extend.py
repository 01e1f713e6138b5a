"""The surface that backends, blob stores and workers build on.

``offload`` (and any third-party backend) imports from here, never from an
``engine._*`` module: what is listed in ``__all__`` is kept stable for them.
Users of shoal do not need it.

- the backend protocol: :class:`Backend`, :class:`BackendContext`,
  :class:`Handle`, :class:`AttemptHooks`; gangs: :class:`GangBackend`,
  :class:`Gang` (what is asked) and :class:`Cluster` (each rank's place);
- the wire: :class:`Payload`, :class:`Outcome`, :class:`FunctionRef` and
  the messages and framing of the worker protocol; :class:`Frames` over
  any reader/writer pair (:class:`FrameReader`, :class:`FrameWriter`);
- the worker: :func:`serve`, the one serving loop of every worker process
  (``python -m offload.worker`` runs it over stdin/stdout with a
  :class:`BundleCache`; any :class:`Channel` will do as transport), :data:`EXIT_STUCK`, :data:`TIMEOUT_GRACE`,
  :data:`FLUSH_EVERY`;
- values and errors across a process boundary: :func:`encode_value`,
  :func:`decode_value`, :func:`describe`, :class:`ErrorInfo`;
- the worker's side of traces: :class:`TraceSink`, :data:`trace_sink_var`,
  :func:`trace_key`, :data:`MISSING`;
- the infrastructure errors that backends raise, and the one retry
  :class:`Backoff` policy (with the engine's ``sleep``/``monotonic`` in
  :class:`BackendContext` and its ``rng``) for polling and reconnects;
- blob stores: :class:`BlobStore`, :class:`BlobReader`, :class:`ClosingStore`
  and the helpers a store needs (:func:`check_digest`, :func:`corrupt_blob`,
  :func:`hash_file`, :func:`private_folder`, :func:`run_bounded`,
  :func:`unwritable_destination`, :data:`CHUNK`);
- facts about this machine: :func:`usable_cpus`, :func:`detect_gpus`,
  :data:`VERSION`.
"""

from __future__ import annotations

from ._backend import AttemptHooks as AttemptHooks
from ._backend import Backend as Backend
from ._backend import BackendContext as BackendContext
from ._backend import GangBackend as GangBackend
from ._backend import Handle as Handle
from ._blobs import CHUNK as CHUNK
from ._blobs import BlobReader as BlobReader
from ._blobs import BlobStore as BlobStore
from ._blobs import ClosingStore as ClosingStore
from ._blobs import check_digest as check_digest
from ._blobs import corrupt_blob as corrupt_blob
from ._blobs import hash_file as hash_file
from ._blobs import private_folder as private_folder
from ._blobs import run_bounded as run_bounded
from ._blobs import unwritable_destination as unwritable_destination
from ._cluster import Cluster as Cluster
from ._cluster import Gang as Gang
from ._codec import decode_value as decode_value
from ._codec import encode_value as encode_value
from ._engine import detect_gpus as detect_gpus
from ._engine import usable_cpus as usable_cpus
from ._entries import describe as describe
from ._errors import HostLost as HostLost
from ._errors import InfrastructureError as InfrastructureError
from ._errors import Reclaimed as Reclaimed
from ._errors import SubmitFailed as SubmitFailed
from ._errors import WorkerLost as WorkerLost
from ._frames import FrameReader as FrameReader
from ._frames import Frames as Frames
from ._frames import FrameWriter as FrameWriter
from ._frames import StreamBroken as StreamBroken
from ._loader import load_function as load_function
from ._options import Backoff as Backoff
from ._records import ErrorInfo as ErrorInfo
from ._run import trace_key as trace_key
from ._serve import EXIT_STUCK as EXIT_STUCK
from ._serve import FLUSH_EVERY as FLUSH_EVERY
from ._serve import TIMEOUT_GRACE as TIMEOUT_GRACE
from ._serve import BundleCache as BundleCache
from ._serve import Channel as Channel
from ._serve import serve as serve
from ._trace import MISSING as MISSING
from ._trace import TraceSink as TraceSink
from ._trace import trace_sink_var as trace_sink_var
from ._version import VERSION as VERSION
from ._wire import MAX_FRAME as MAX_FRAME
from ._wire import PROTOCOL as PROTOCOL
from ._wire import BundleData as BundleData
from ._wire import Cancel as Cancel
from ._wire import Chunk as Chunk
from ._wire import ChunkDone as ChunkDone
from ._wire import ChunkFailed as ChunkFailed
from ._wire import Done as Done
from ._wire import FindPort as FindPort
from ._wire import FunctionRef as FunctionRef
from ._wire import Hello as Hello
from ._wire import Log as Log
from ._wire import Message as Message
from ._wire import NeedBundle as NeedBundle
from ._wire import Outcome as Outcome
from ._wire import Payload as Payload
from ._wire import PortFound as PortFound
from ._wire import Shutdown as Shutdown
from ._wire import Start as Start
from ._wire import Trace as Trace
from ._wire import Withdraw as Withdraw
from ._wire import Withdrawn as Withdrawn
from ._wire import decode_message as decode_message
from ._wire import encode_frame as encode_frame
from ._wire import frame_length as frame_length

__all__ = [
    "CHUNK",
    "EXIT_STUCK",
    "FLUSH_EVERY",
    "MAX_FRAME",
    "MISSING",
    "PROTOCOL",
    "TIMEOUT_GRACE",
    "VERSION",
    "AttemptHooks",
    "Backend",
    "BackendContext",
    "Backoff",
    "BlobReader",
    "BlobStore",
    "BundleCache",
    "BundleData",
    "Cancel",
    "Channel",
    "Chunk",
    "ChunkDone",
    "ChunkFailed",
    "ClosingStore",
    "Cluster",
    "Done",
    "ErrorInfo",
    "FindPort",
    "FrameReader",
    "FrameWriter",
    "Frames",
    "FunctionRef",
    "Gang",
    "GangBackend",
    "Handle",
    "Hello",
    "HostLost",
    "InfrastructureError",
    "Log",
    "Message",
    "NeedBundle",
    "Outcome",
    "Payload",
    "PortFound",
    "Reclaimed",
    "Shutdown",
    "Start",
    "StreamBroken",
    "SubmitFailed",
    "Trace",
    "TraceSink",
    "Withdraw",
    "Withdrawn",
    "WorkerLost",
    "check_digest",
    "corrupt_blob",
    "decode_message",
    "decode_value",
    "describe",
    "detect_gpus",
    "encode_frame",
    "encode_value",
    "frame_length",
    "hash_file",
    "load_function",
    "private_folder",
    "run_bounded",
    "serve",
    "trace_key",
    "trace_sink_var",
    "unwritable_destination",
    "usable_cpus",
]
