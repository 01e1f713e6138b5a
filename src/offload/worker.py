"""``python -m offload.worker [--cache DIR] [--concurrency N]``: serve offloaded attempts over stdin and stdout.

(``python -m offload.worker --batch S3_URI --pack DIGEST`` instead runs the
one attempt of an AWS Batch job: see :mod:`offload._batch_job`; with
``--master-port PORT``, one node of a gang's multi-node job: see
:mod:`offload._batch_node`.)

The serving loop is the engine's (:func:`engine.extend.serve`, the same
that the ``parallel_map`` pool's workers run); this module gives it the
process's stdio as its transport and the code bundle cache.

Started by a backend (``offload.Local`` through pipes, SSH through a
channel), never by hand.  The protocol's frames travel over the original
stdin and stdout file descriptors; before anything else runs, the worker
takes them for itself and points file descriptor 1 (and ``sys.stdout``) at
stderr and file descriptor 0 at ``/dev/null``, so that nothing an attempt
does (a ``print``, a C library writing to fd 1, a child process reading
stdin) can touch the stream.  What attempts print and log is sent back to
the engine; the rest of stderr is the worker's own log.

``--concurrency N``: at most N attempts run at once; further ones the
engine sends wait in the worker, in order (the engine pipelines them).
Without it every attempt sent starts at once (the engine keeps the count).

``--cache`` is the worker's folder (default ``~/.cache/shoal``): code
bundles are unpacked under it, and it holds the worker's private
``SHOAL_HOME`` (``home/``, with a config file of its own named by
``SHOAL_CONFIG``: no journal, ``store = "memory"``) so that the worker
never writes into the folder it was started in and never reads a project's
config.  ``File``/``Dir``/``DataFrame`` made by an attempt go to the blob
store named by ``SHOAL_BLOB_STORE``, which the backend sets; ``--blobs-of
STORE_URI`` sets it instead to a copy of that (``file://``) store kept under
``--cache`` (an SSH host of an engine with a local store: see
:mod:`offload._mirror`).

Exit status 0 after ``Shutdown`` or the end of stdin (the engine has gone:
the worker ends by itself); :data:`engine.extend.EXIT_STUCK` after
giving up on a sync attempt past its timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

__all__ = ["BundleDir", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run a worker on this process's stdin and stdout; its exit status."""
    parser = argparse.ArgumentParser(prog="python -m offload.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default="~/.cache/shoal", help="folder for code bundles and the worker's home")
    parser.add_argument(
        "--concurrency", type=_positive, default=None, metavar="N",
        help="attempts run at once; the rest wait in order (default: every one sent)",
    )
    parser.add_argument("--batch", metavar="S3_URI", help="run one attempt of an AWS Batch job, stored under S3_URI")
    parser.add_argument("--pack", metavar="DIGEST", help="with --batch: the pack holding the job's payload")
    parser.add_argument(
        "--blobs-of", metavar="STORE_URI", help="keep a copy of this (file://) blob store under the cache, and use it"
    )
    parser.add_argument(
        "--master-port",
        type=int,
        metavar="PORT",
        help="with --batch: run one node of a gang's multi-node job, rank 0 listening on PORT",
    )
    args = parser.parse_args(argv)
    cache = Path(args.cache).expanduser().absolute()
    if args.blobs_of:
        from ._mirror import mirror_uri

        os.environ["SHOAL_BLOB_STORE"] = mirror_uri(str(cache / "blobs"), args.blobs_of)
    if args.batch:
        # A Batch job: no protocol stream; stdout and stderr are the job's log.
        if not args.pack:
            parser.error("--batch needs --pack")
        _private_home(cache)
        if args.master_port is not None:
            from ._batch_node import run_node

            return asyncio.run(run_node(args.batch, args.pack, cache, args.master_port))
        from ._batch_job import run_job

        return asyncio.run(run_job(args.batch, args.pack, cache))
    proto_in, proto_out = _take_stdio()
    _private_home(cache)
    abandoned = asyncio.run(_serve(proto_in, proto_out, cache, args.concurrency))
    if abandoned and os.getpgrp() == os.getpid():
        # The engine went away under running attempts: what they started
        # (child processes in this worker's process group) goes too.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(os.getpgrp(), signal.SIGTERM)
    if any(t.name.startswith("shoal-attempt") and t.is_alive() for t in threading.enumerate()):
        # A sync attempt that nothing can stop is still running: do not wait for it.
        sys.stderr.flush()
        os._exit(0)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 1, got {text!r}")
    return value


def _take_stdio() -> tuple[int, int]:
    """Keep the original stdin/stdout for the protocol; fd 1 becomes stderr, fd 0 /dev/null."""
    sys.stdout.flush()
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return proto_in, proto_out


def _private_home(cache: Path) -> None:
    home = cache / "home"
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = home / "shoal.toml"
    if not config.exists():
        # Written whole, then renamed: workers starting together all read a complete file.
        temp = home / f".shoal.toml.{os.getpid()}"
        temp.write_text('# The config of shoal workers started with this cache: no journal.\nstore = "memory"\n')
        os.replace(temp, config)
    os.environ["SHOAL_HOME"] = str(home)
    os.environ["SHOAL_CONFIG"] = str(config)


class BundleDir:
    """A worker's code bundles, unpacked under ``cache`` (see :mod:`offload._bundle`).

    The :class:`engine.extend.BundleCache` of ``python -m offload.worker``
    and of Batch jobs; it imports the unpacking code only when used.
    """

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def cached(self, digest: str) -> Path | None:
        from ._bundle import bundle_cached  # only workers that get bundles need it

        return bundle_cached(digest, self.cache)

    def unpack(self, data: bytes, digest: str) -> Path:
        from ._bundle import unpack_bundle

        return unpack_bundle(data, digest, self.cache)


async def _serve(proto_in: int, proto_out: int, cache: Path, concurrency: int | None) -> int:
    from engine.extend import Frames, serve

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(proto_in, "rb", 0)
    )
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), os.fdopen(proto_out, "wb", 0)
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    try:
        return await serve(Frames(reader, writer, "the engine"), BundleDir(cache), concurrency=concurrency)
    finally:
        read_transport.close()


if __name__ == "__main__":
    raise SystemExit(main())
