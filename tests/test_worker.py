"""``python -m offload.worker`` spoken to over its stdin and stdout, and the framed transport."""

from __future__ import annotations

import asyncio
import os
import pickle
import platform
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

import _pmap_funcs as funcs
from _offload_kit import gone, payload, until, value, worker_env
from engine.extend import (
    VERSION,
    Cancel,
    Chunk,
    ChunkDone,
    ChunkFailed,
    Done,
    FindPort,
    Frames,
    Hello,
    Log,
    PortFound,
    Shutdown,
    Start,
    StreamBroken,
    Withdraw,
    Withdrawn,
    encode_frame,
    serve,
    usable_cpus,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


class Worker:
    """A worker process and our end of its frames."""

    def __init__(self, proc: asyncio.subprocess.Process, frames: Frames) -> None:
        self.proc = proc
        self.frames = frames

    async def recv(self) -> Any:
        return await asyncio.wait_for(self.frames.recv(), 30)

    async def done(self, id: int) -> tuple[Done, list[Log]]:
        """The Done of attempt ``id``, and the Logs that came before it (other messages are dropped)."""
        logs: list[Log] = []
        while True:
            message = await self.recv()
            assert message is not None, "the worker closed its stream"
            if isinstance(message, Log) and message.id == id:
                logs.append(message)
            if isinstance(message, Done) and message.id == id:
                return message, logs

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()


async def start_worker(cache: Path, *args: str, **kwargs: Any) -> Worker:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "offload.worker", "--cache", str(cache), *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **worker_env()},
        start_new_session=True,
        **kwargs,
    )
    assert proc.stdout is not None and proc.stdin is not None
    return Worker(proc, Frames(proc.stdout, proc.stdin, f"worker {proc.pid}"))


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[Worker]:
    w = await start_worker(tmp_path / "cache")
    hello = await w.recv()
    assert isinstance(hello, Hello)
    yield w
    if w.proc.returncode is None:
        w.proc.kill()
    await w.proc.wait()
    await w.frames.aclose()


async def test_hello_then_exit_zero_at_the_end_of_stdin(tmp_path: Path) -> None:
    w = await start_worker(tmp_path / "cache")
    hello = await w.recv()
    assert isinstance(hello, Hello)
    assert hello.pid == w.proc.pid and hello.shoal == VERSION and hello.python == platform.python_version()
    assert hello.hostname == socket.gethostname() and hello.cpus == usable_cpus()
    assert hello.executable == sys.executable and hello.gpus >= 0
    # The engine going away (its end of stdin closed) ends the worker by itself.
    await w.frames.aclose()
    assert await w.recv() is None
    assert await w.proc.wait() == 0


async def test_shutdown_ends_the_worker_with_status_zero(worker: Worker) -> None:
    await worker.frames.send(Shutdown())
    assert await worker.recv() is None
    assert await worker.proc.wait() == 0


async def test_the_end_of_stdin_ends_a_worker_stuck_in_sync_code_and_what_it_started(
    worker: Worker, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pids"
    await worker.frames.send(Start(1, payload("spawn_and_sleep", str(pidfile))))
    await until(pidfile.exists, "the attempt to spawn its child")
    _, child = map(int, pidfile.read_text().split())
    await worker.frames.aclose()
    assert await worker.proc.wait() == 0
    await until(lambda: gone(child), "the attempt's child process to go", seconds=5)


async def test_writes_to_file_descriptor_1_cannot_corrupt_the_stream(worker: Worker) -> None:
    await worker.frames.send(Start(1, payload("write_to_fd1")))
    done, logs = await worker.done(1)
    assert value(done.outcome) == "intact"
    assert "".join(log.text for log in logs if log.stream == "stdout") == "printed too\n"
    await worker.frames.send(Shutdown())
    assert await worker.recv() is None
    assert "garbage written to fd 1" in await worker.stderr()


async def test_several_async_attempts_run_at_once_and_one_can_be_cancelled(
    worker: Worker, tmp_path: Path
) -> None:
    folder = tmp_path / "arrived"
    folder.mkdir()
    await worker.frames.send(Start(1, payload("sleepy", 60.0)))
    for i in (2, 3):
        await worker.frames.send(Start(i, payload("rendezvous", str(folder), f"r{i}", 2, key=f"r{i}")))
    seen: dict[int, Done] = {}
    while len(seen) < 2:
        message = await worker.recv()
        if isinstance(message, Done):
            seen[message.id] = message
    assert sorted(seen) == [2, 3] and value(seen[2].outcome) == worker.proc.pid
    await worker.frames.send(Cancel(1))
    cancelled, _ = await worker.done(1)
    assert not cancelled.outcome.ok and cancelled.outcome.error_kind == "system"
    assert cancelled.outcome.error is not None and "cancelled" in cancelled.outcome.error.message
    # Still serving.
    await worker.frames.send(Start(4, payload("add", 20, 22)))
    assert value((await worker.done(4))[0].outcome) == 42


async def test_env_is_set_around_the_attempt(worker: Worker) -> None:
    name = "SHOAL_TEST_WORKER_VAR"
    await worker.frames.send(Start(1, payload("getenv", name, env={name: "set"})))
    assert value((await worker.done(1))[0].outcome) == "set"
    await worker.frames.send(Start(2, payload("getenv", name)))
    assert value((await worker.done(2))[0].outcome) is None


async def test_the_worker_has_a_private_home_under_its_cache(worker: Worker, tmp_path: Path) -> None:
    await worker.frames.send(Start(1, payload("getenv", "SHOAL_HOME")))
    home = value((await worker.done(1))[0].outcome)
    assert home == str(tmp_path / "cache" / "home")
    await worker.frames.send(Start(2, payload("getenv", "SHOAL_CONFIG")))
    assert value((await worker.done(2))[0].outcome).startswith(home)


async def test_a_sync_attempt_past_its_timeout_is_reported_and_the_worker_exits(worker: Worker) -> None:
    await worker.frames.send(Start(1, payload("sleepy_sync", 60.0, timeout=0.2)))
    done, _ = await worker.done(1)
    assert done.outcome.error is not None and done.outcome.error.type == "engine.ActionTimeout"
    assert done.outcome.error_kind == "user"
    assert await worker.recv() is None
    from engine.extend import EXIT_STUCK

    assert await worker.proc.wait() == EXIT_STUCK


async def test_an_async_attempt_past_its_timeout_is_cancelled_and_the_worker_serves_on(worker: Worker) -> None:
    await worker.frames.send(Start(1, payload("sleepy", 60.0, timeout=0.2)))
    done, _ = await worker.done(1)
    assert done.outcome.error is not None and done.outcome.error.type == "engine.ActionTimeout"
    await worker.frames.send(Start(2, payload("add", 1, 2)))
    assert value((await worker.done(2))[0].outcome) == 3


async def test_a_task_raising_its_own_timeout_error_is_not_a_worker_timeout(worker: Worker) -> None:
    await worker.frames.send(Start(1, payload("own_timeout", timeout=30.0)))
    done, _ = await worker.done(1)
    assert done.outcome.error is not None and done.outcome.error.type == "TimeoutError"
    assert done.outcome.error.message == "the task's own deadline"


async def test_an_attempt_cancelled_before_it_ran_still_gets_its_done(worker: Worker) -> None:
    # Both frames in one write: the worker reads the Cancel before the attempt's task took a step.
    worker.frames.writer.write(encode_frame(Start(1, payload("sleepy", 60.0))) + encode_frame(Cancel(1)))
    done, _ = await worker.done(1)
    assert done.outcome.error is not None and "cancelled" in done.outcome.error.message
    await worker.frames.send(Start(2, payload("add", 2, 2)))
    assert value((await worker.done(2))[0].outcome) == 4


async def test_a_killed_worker_takes_nothing_with_it_but_its_stream(worker: Worker) -> None:
    await worker.frames.send(Start(1, payload("sleepy", 60.0)))
    os.kill(worker.proc.pid, signal.SIGKILL)
    assert await worker.recv() is None
    assert await worker.proc.wait() == -signal.SIGKILL
    await until(lambda: gone(worker.proc.pid), "the worker to be gone")


async def test_a_worker_finds_a_port_free_on_its_host_while_an_attempt_runs(worker: Worker) -> None:
    await worker.frames.send(Start(1, payload("sleepy", 0.5)))
    await worker.frames.send(FindPort())
    await worker.frames.send(FindPort())
    found: list[int] = []
    while len(found) < 2:
        message = await worker.recv()
        assert message is not None
        if isinstance(message, PortFound):
            found.append(message.port)
    for port in found:
        assert 0 < port < 65536
        # Free on every address: rank 0 of a gang can listen there.
        with socket.create_server(("", port)):
            pass


# -- pipelining: a worker with a concurrency queues what it is sent beyond it ------------


@pytest.fixture
async def queueing(tmp_path: Path) -> AsyncIterator[Worker]:
    """A worker that runs one attempt at a time and queues the others."""
    w = await start_worker(tmp_path / "cache", "--concurrency", "1")
    assert isinstance(await w.recv(), Hello)
    yield w
    if w.proc.returncode is None:
        w.proc.kill()
    await w.proc.wait()
    await w.frames.aclose()


async def answers(worker: Worker, until_done: int) -> list[Any]:
    """The Done and Withdrawn messages the worker sends, up to and including the Done of ``until_done``."""
    seen: list[Any] = []
    while True:
        message = await worker.recv()
        assert message is not None, "the worker closed its stream"
        if isinstance(message, Done | Withdrawn):
            seen.append(message)
        if isinstance(message, Done) and message.id == until_done:
            return seen


async def test_attempts_beyond_the_concurrency_wait_and_start_in_the_order_they_came(
    queueing: Worker, tmp_path: Path
) -> None:
    folder = tmp_path / "arrived"
    folder.mkdir()
    await queueing.frames.send(Start(1, payload("rendezvous", str(folder), "first", 2)))
    await queueing.frames.send(Start(2, payload("add", 1, 2)))
    await queueing.frames.send(Start(3, payload("add", 2, 2)))
    (folder / "second").touch()  # lets the first one end
    dones = await answers(queueing, 3)
    # Run one at a time: the quick ones waited for the first (without the
    # queue they would have ended while it waited).
    assert [d.id for d in dones] == [1, 2, 3]
    assert [value(d.outcome) for d in dones[1:]] == [3, 4]
    assert dones[1].outcome.started_at >= dones[0].outcome.finished_at
    assert dones[2].outcome.started_at >= dones[1].outcome.finished_at


async def test_a_queued_attempt_can_be_withdrawn_or_cancelled_and_a_started_one_is_not_withdrawn(
    queueing: Worker,
) -> None:
    await queueing.frames.send(Start(1, payload("sleepy", 60.0)))
    for i in (2, 3):
        await queueing.frames.send(Start(i, payload("add", i, 0)))
    await queueing.frames.send(Start(4, payload("add", 20, 22)))
    await queueing.frames.send(Withdraw(2))
    await queueing.frames.send(Cancel(3))
    await queueing.frames.send(Withdraw(1))
    await queueing.frames.send(Cancel(1))
    seen = await answers(queueing, 4)
    withdrawn = {m.id: m.dropped for m in seen if isinstance(m, Withdrawn)}
    assert withdrawn == {2: True, 1: False}
    dones = {m.id: m.outcome for m in seen if isinstance(m, Done)}
    assert sorted(dones) == [1, 3, 4]  # none for the withdrawn attempt: it never ran
    for cancelled in (dones[1], dones[3]):
        assert cancelled.error is not None and "cancelled" in cancelled.error.message
        assert cancelled.error_kind == "system"
    assert value(dones[4]) == 42


async def test_time_spent_in_the_queue_counts_against_the_timeout(queueing: Worker) -> None:
    await queueing.frames.send(Start(1, payload("sleepy", 1.0)))
    await queueing.frames.send(Start(2, payload("add", 1, 1, timeout=0.1)))
    seen = await answers(queueing, 2)
    dones = {m.id: m.outcome for m in seen if isinstance(m, Done)}
    assert value(dones[1]) == 1.0
    late = dones[2].error
    assert late is not None and late.type == "engine.ActionTimeout"
    assert "waiting in the worker's queue and did not run" in late.message
    await queueing.frames.send(Start(3, payload("add", 2, 3)))
    assert value((await queueing.done(3))[0].outcome) == 5


def test_a_concurrency_below_one_is_refused(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "offload.worker", "--cache", str(tmp_path), "--concurrency", "0"],
        capture_output=True, text=True, env={**os.environ, **worker_env()}, check=False,
    )
    assert out.returncode == 2 and "--concurrency: takes a whole number >= 1, got '0'" in out.stderr


# -- one serving loop for offloaded attempts and parallel_map chunks --------------------


def chunk(fn_id: int, items: Any, function: Any = None) -> Chunk:
    """A Chunk as the pool sends it: items pickled; the function with this process's sys.path.

    ``items`` or ``function`` given as bytes are sent as they are (as if pickled).
    """
    if function is None:
        shipped = b""
    else:
        pickled = function if isinstance(function, bytes) else pickle.dumps(function)
        shipped = pickle.dumps((sys.path, pickled))
    blob = items if isinstance(items, bytes) else pickle.dumps(items)
    return Chunk(fn_id, blob, shipped)


async def test_the_offload_worker_serves_parallel_map_chunks_in_order_between_attempts(
    worker: Worker,
) -> None:
    frames = worker.frames
    await frames.send(chunk(1, [1, 2, 3], funcs.square))
    await frames.send(Start(1, payload("add", 1, 2)))
    await frames.send(chunk(1, [4, 5]))  # the worker kept function 1
    await frames.send(chunk(2, [5, 6, 7, 8], funcs.fail_on_seven))
    await frames.send(chunk(2, b"not a pickle"))
    await frames.send(chunk(3, [1], b"not a function"))
    replies: list[Any] = []
    done: Done | None = None
    while len(replies) < 5 or done is None:
        message = await worker.recv()
        assert message is not None, "the worker closed its stream"
        if isinstance(message, ChunkDone | ChunkFailed):
            replies.append(message)
        elif isinstance(message, Done):
            done = message
    assert value(done.outcome) == 3
    first, second, raised, bad_items, bad_function = replies
    assert isinstance(first, ChunkDone) and pickle.loads(first.results) == [1, 4, 9]
    assert isinstance(second, ChunkDone) and pickle.loads(second.results) == [16, 25]
    # One error description for both kinds of work: ErrorInfo, and the exception when it rebuilds.
    assert isinstance(raised, ChunkFailed) and raised.stage == "call" and raised.index == 2
    assert raised.error.type == "ValueError" and raised.error.message == "seven is not allowed (got 7)"
    assert "fail_on_seven" in raised.error.traceback
    assert raised.error_pickle is not None
    assert str(pickle.loads(raised.error_pickle)) == "seven is not allowed (got 7)"
    assert isinstance(bad_items, ChunkFailed) and bad_items.stage == "items"
    assert isinstance(bad_function, ChunkFailed) and bad_function.stage == "function"
    await frames.aclose()
    assert await worker.proc.wait() == 0


async def test_the_serving_loop_runs_over_a_socket_pair_in_this_process() -> None:
    left, right = socket.socketpair()
    r1, w1 = await asyncio.open_connection(sock=left)
    r2, w2 = await asyncio.open_connection(sock=right)
    engine_side = Frames(r1, w1, "the worker")
    server = asyncio.create_task(serve(Frames(r2, w2, "the engine"), capture=False))
    assert isinstance(await engine_side.recv(), Hello)
    # A mapped function that runs an event loop of its own, from inside the serving loop.
    await engine_side.send(chunk(1, [1, 2], funcs.doubled_by_its_own_event_loop))
    reply = await asyncio.wait_for(engine_side.recv(), 30)
    assert isinstance(reply, ChunkDone) and pickle.loads(reply.results) == [2, 4]
    # Without a bundle cache (the pool's workers) an attempt that needs a bundle is refused, clearly.
    bundled = msgspec.structs.replace(payload("add", 1, 2), bundle="0" * 64)
    await engine_side.send(Start(7, bundled))
    done = await asyncio.wait_for(engine_side.recv(), 30)
    assert isinstance(done, Done) and not done.outcome.ok and done.outcome.error_kind == "system"
    assert done.outcome.error is not None and "has no bundle cache" in done.outcome.error.message
    await engine_side.send(Start(8, payload("add", 2, 3)))
    done = await asyncio.wait_for(engine_side.recv(), 30)
    assert isinstance(done, Done) and value(done.outcome) == 5
    await engine_side.aclose()
    assert await asyncio.wait_for(server, 30) == 0
    assert await engine_side.recv() is None


# -- the framed transport --------------------------------------------------------------


async def test_frames_round_trip_over_a_socket_pair_and_end_cleanly() -> None:
    left, right = socket.socketpair()
    r1, w1 = await asyncio.open_connection(sock=left)
    r2, w2 = await asyncio.open_connection(sock=right)
    a, b = Frames(r1, w1, "left"), Frames(r2, w2, "right")
    messages = [Start(i, payload("add", i, i)) for i in range(50)]
    await asyncio.gather(*(a.send(m) for m in messages))
    got = [await b.recv() for _ in messages]
    assert got == messages
    await a.aclose()
    assert await b.recv() is None
    await b.aclose()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\x00\x00", "inside a frame header (2 of 4 bytes)"),
        (encode_frame(Shutdown())[:-1], "closed its stream inside a frame ("),
        (b"\x00\x00\x00\x03abc", "not a message of the shoal worker protocol"),
        (b"\xff\xff\xff\xff", "not a shoal frame"),
    ],
)
async def test_a_broken_stream_is_an_error_naming_the_peer(data: bytes, says: str) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = Frames(reader, None, "the worker on gpu7")  # type: ignore[arg-type]
    with pytest.raises(StreamBroken) as broken:
        await frames.recv()
    assert "the worker on gpu7" in str(broken.value) and says in str(broken.value)
