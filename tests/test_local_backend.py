"""offload.Local, driven directly through the backend protocol, with real worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, cast

import msgspec
import psutil
import pytest

import _offload_tasks as t
import engine
import offload
from _offload_funcs import Point
from _offload_kit import Hooks, gone, payload, until, value, worker_env
from engine.extend import VERSION, Backend, BackendContext, decode_value
from offload._local import QUEUE

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable
    from pathlib import Path


def context(tmp_path: Path) -> BackendContext:
    return BackendContext(home=tmp_path / "home", blob_store=str(tmp_path / "blobs"))


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[offload.Local]:
    backend = offload.Local(workers=1, env=worker_env())
    await backend.open(context(tmp_path))
    yield backend
    await backend.aclose()


def worker_pid(handle: engine.extend.Handle) -> int:
    return int(handle.id.split(":")[0])


async def test_an_attempt_runs_in_a_warm_worker_process_and_its_result_comes_back(
    local: offload.Local,
) -> None:
    assert isinstance(local, Backend) and local.kind == "local" and not local.reattachable
    first = await local.submit(payload("whoami"), Hooks())
    outcome = await local.wait(first)
    pid = value(outcome)
    assert pid != os.getpid() and pid == worker_pid(first)
    assert first.backend == "local" and first.where == outcome.where == f"{socket.gethostname()}:{pid}"
    assert outcome.started_at <= outcome.finished_at
    # The same worker serves the next attempt.
    assert value(await local.wait(await local.submit(payload("whoami"), Hooks()))) == pid
    # Task arguments are converted against the annotations (a Struct arrives as itself).
    summed = await local.submit(payload("add", 2, 3), Hooks())
    assert value(await local.wait(summed)) == 5
    typed = await local.submit(payload("norm1", Point(3, -4), scale=2), Hooks())
    assert value(await local.wait(typed)) == 14
    plain = await local.submit(payload("plain_double", 21), Hooks())
    assert value(await local.wait(plain)) == 42


async def test_an_exception_keeps_its_type_message_and_traceback(local: offload.Local) -> None:
    outcome = await local.wait(await local.submit(payload("explode", "no good"), Hooks()))
    assert not outcome.ok and outcome.error_kind == "user" and outcome.error is not None
    assert outcome.error.type == "ValueError" and outcome.error.message == "no good"
    assert "_offload_funcs.py" in outcome.error.traceback and "in _deep" in outcome.error.traceback
    assert outcome.error_pickle is not None
    rebuilt = pickle.loads(outcome.error_pickle)
    assert type(rebuilt) is ValueError and str(rebuilt) == "no good"


async def test_a_function_the_worker_cannot_import_is_a_system_failure(local: offload.Local) -> None:
    missing = await local.wait(await local.submit(payload("nope"), Hooks()))
    assert not missing.ok and missing.error_kind == "system" and missing.error is not None
    assert missing.error.type == "engine.ImportFailed"
    assert "_offload_funcs:nope" in missing.error.message
    no_module = await local.wait(await local.submit(payload("f", module="no_such_module_here"), Hooks()))
    assert no_module.error_kind == "system" and no_module.error is not None
    assert "no_such_module_here" in no_module.error.message and "install it" in no_module.error.message
    # The worker survives both and serves the next attempt.
    assert value(await local.wait(await local.submit(payload("add", 1, 1), Hooks()))) == 2


async def test_prints_and_logs_arrive_through_the_hooks(local: offload.Local) -> None:
    hooks = Hooks()
    assert value(await local.wait(await local.submit(payload("chatty", 7), hooks))) == 7
    assert hooks.text("stdout") == "hello 7 from stdout\n"
    assert hooks.text("stderr") == "and 7 to stderr\n"
    assert hooks.text("log") == "WARNING chatty: careful with 7\n"


async def test_a_print_from_a_thread_the_task_started_is_still_its_own(local: offload.Local) -> None:
    hooks = Hooks()
    outcome = await local.wait(await local.submit(payload("print_from_own_thread"), hooks))
    assert outcome.ok and hooks.text("stdout") == "from a thread of the task\n"


async def test_output_streams_back_while_the_attempt_runs(local: offload.Local) -> None:
    hooks = Hooks()
    handle = await local.submit(payload("print_then_sleep", "still going"), hooks)
    await until(lambda: "still going\n" in hooks.text("stdout"), "the line printed before the sleep")
    await local.cancel(handle)


async def test_a_trace_is_sent_back_and_a_recorded_one_is_not_run_again(
    local: offload.Local, tmp_path: Path
) -> None:
    marker = tmp_path / "calls"
    hooks = Hooks()
    assert value(await local.wait(await local.submit(payload("traced", 3, str(marker)), hooks))) == 31
    assert marker.read_text() == "3\n"
    [(key, name, kind, data)] = hooks.traces
    assert name.endswith("lookup") and decode_value(kind, data) == 30
    # The next attempt gets the recorded value and does not call the trace again.
    again = Hooks()
    retried = payload("traced", 3, str(marker), attempt=2, traces={key: (kind, data)})
    assert value(await local.wait(await local.submit(retried, again))) == 31
    assert marker.read_text() == "3\n" and again.traces == []
    # Another action has other trace keys: it runs the trace.
    other = payload("traced", 3, str(marker), key="action-2", traces={key: (kind, data)})
    assert value(await local.wait(await local.submit(other, Hooks()))) == 31
    assert marker.read_text() == "3\n3\n"


@pytest.mark.parametrize("fn", ["sleepy", "sleepy_sync"])
async def test_the_worker_enforces_the_timeout_and_the_worker_goes(local: offload.Local, fn: str) -> None:
    handle = await local.submit(payload(fn, 30.0, timeout=0.3), Hooks())
    outcome = await local.wait(handle)
    assert not outcome.ok and outcome.error is not None
    assert outcome.error.type == "engine.ActionTimeout" and "timeout of 0.3s" in outcome.error.message
    assert outcome.error_pickle is not None
    assert isinstance(pickle.loads(outcome.error_pickle), engine.ActionTimeout)
    # A timed-out attempt takes its worker with it; the next attempt gets a new one.
    assert gone(worker_pid(handle))
    fresh = await local.submit(payload("whoami"), Hooks())
    assert value(await local.wait(fresh)) != worker_pid(handle)


async def test_a_worker_killed_mid_attempt_is_worker_lost_and_is_replaced(local: offload.Local) -> None:
    hooks = Hooks()
    handle = await local.submit(payload("print_then_sleep", "started"), hooks)
    await until(lambda: "started" in hooks.text("stdout"), "the attempt to start")
    pid = worker_pid(handle)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(offload.WorkerLost) as lost:
        await local.wait(handle)
    message = str(lost.value)
    assert f"process {pid}" in message and "SIGKILL" in message and "print_then_sleep" in message
    assert isinstance(lost.value, engine.OffloadError)
    fresh = await local.submit(payload("whoami"), Hooks())
    new_pid = value(await local.wait(fresh))
    assert new_pid != pid and worker_pid(fresh) == new_pid


async def test_cancel_kills_the_whole_process_group(local: offload.Local, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    handle = await local.submit(payload("spawn_and_sleep", str(pidfile)), Hooks())
    await until(pidfile.exists, "the attempt to spawn its child")
    worker, child = map(int, pidfile.read_text().split())
    assert worker == worker_pid(handle) and not gone(child)
    await local.cancel(handle)
    assert gone(worker)
    await until(lambda: gone(child), "the attempt's child process to go", seconds=5)
    assert value(await local.wait(await local.submit(payload("add", 2, 2), Hooks()))) == 4


async def test_concurrent_async_attempts_share_one_worker(tmp_path: Path) -> None:
    folder = tmp_path / "arrived"
    folder.mkdir()
    async with offload.Local(workers=1, concurrency=3, env=worker_env()) as backend:
        # Three run at once; the target takes a queue's worth more (pipelined).
        assert backend.capacity() == 3 + QUEUE
        handles = [
            await backend.submit(payload("rendezvous", str(folder), f"a{i}", 3, key=f"a{i}"), Hooks())
            for i in range(3)
        ]
        pids = {value(o) for o in await asyncio.gather(*(backend.wait(h) for h in handles))}
        assert len(pids) == 1


async def test_submits_beyond_capacity_wait_for_a_free_worker(local: offload.Local) -> None:
    hooks = Hooks()
    busy = await local.submit(payload("sleepy", 0.5), hooks)
    waiting = asyncio.create_task(local.submit(payload("add", 1, 2), Hooks()))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # one worker, one slot: it waits for the first attempt
    assert value(await local.wait(busy)) == 0.5
    assert value(await local.wait(await waiting)) == 3


async def test_waiting_submits_are_served_in_the_order_they_came(local: offload.Local) -> None:
    busy = await local.submit(payload("sleepy", 30.0), Hooks())
    waiting = [asyncio.create_task(local.submit(payload("add", i, 0), Hooks())) for i in range(4)]
    await asyncio.sleep(0.05)
    # The worker goes: every waiter wakes, one starts a new worker, the others wait again.
    await local.cancel(busy)
    handles = [await w for w in waiting]
    served = [int(h.id.split(":")[1]) for h in handles]  # n of "pid:n": the worker's n-th attempt
    assert served == sorted(served) and len({worker_pid(h) for h in handles}) == 1
    assert [value(await local.wait(h)) for h in handles] == [0, 1, 2, 3]


# -- pipelining: attempts queued in a worker ------------------------------------------------


async def warm(backend: offload.Local) -> int:
    """Run short attempts (a worker takes a queue once its attempts are seen to be short); the pid.

    Eight, so that the first (which imports the task's module) is all but
    forgotten by the worker's running mean.
    """
    pids = {value(await backend.wait(await backend.submit(payload("whoami"), Hooks()))) for _ in range(8)}
    [pid] = pids
    assert isinstance(pid, int)
    return pid


async def test_a_cancelled_attempt_still_queued_is_dropped_and_its_worker_serves_on(
    local: offload.Local, tmp_path: Path
) -> None:
    pid = await warm(local)
    folder = tmp_path / "arrived"
    folder.mkdir()
    marker = tmp_path / "ran"
    busy = await local.submit(payload("rendezvous", str(folder), "busy", 2), Hooks())
    queued = await local.submit(payload("traced", 1, str(marker)), Hooks())
    after = await local.submit(payload("add", 1, 2), Hooks())
    # One worker running one attempt at a time: the other two wait in it.
    assert worker_pid(busy) == worker_pid(queued) == worker_pid(after) == pid
    await local.cancel(queued)
    assert not gone(pid)
    (folder / "go").touch()  # lets the running attempt end
    assert value(await local.wait(busy)) == pid
    assert value(await local.wait(after)) == 3
    assert not marker.exists()  # the cancelled attempt never ran
    assert value(await local.wait(await local.submit(payload("whoami"), Hooks()))) == pid
    with pytest.raises(engine.OffloadError, match="has no attempt"):
        await local.wait(queued)


async def test_cancelling_a_running_attempt_with_others_queued_still_kills_its_worker(
    local: offload.Local,
) -> None:
    pid = await warm(local)
    hooks = Hooks()
    busy = await local.submit(payload("print_then_sleep", "started"), hooks)
    queued = [await local.submit(payload("add", i, 0), Hooks()) for i in range(3)]
    await until(lambda: "started" in hooks.text("stdout"), "the attempt to start")
    await local.cancel(busy)
    assert gone(pid)
    for handle in queued:
        assert worker_pid(handle) == pid
        with pytest.raises(offload.WorkerLost, match="was cancelled"):
            await local.wait(handle)


async def test_a_worker_that_dies_fails_every_attempt_it_held_queued_or_running(
    local: offload.Local,
) -> None:
    pid = await warm(local)
    hooks = Hooks()
    running = await local.submit(payload("print_then_sleep", "started"), hooks)
    queued = [await local.submit(payload("add", i, 0, key=f"q{i}"), Hooks()) for i in range(3)]
    assert {worker_pid(h) for h in [running, *queued]} == {pid}
    await until(lambda: "started" in hooks.text("stdout"), "the attempt to start")
    os.kill(pid, signal.SIGKILL)
    for handle, name in [(running, "print_then_sleep"), *((h, "add") for h in queued)]:
        with pytest.raises(offload.WorkerLost) as lost:
            await local.wait(handle)
        assert f"process {pid}" in str(lost.value) and "SIGKILL" in str(lost.value) and name in str(lost.value)
    assert value(await local.wait(await local.submit(payload("whoami"), Hooks()))) != pid


async def test_pipelined_attempts_are_spread_evenly_in_order_and_their_results_are_right(
    tmp_path: Path,
) -> None:
    async with offload.Local(workers=2, env=worker_env()) as backend:
        # Both workers up (a second one starts while the first is busy), and warm.
        first = [await backend.submit(payload("sleepy", 0.05, key=f"s{i}"), Hooks()) for i in range(2)]
        pids = [worker_pid(h) for h in first]
        assert len(set(pids)) == 2
        await asyncio.gather(*(backend.wait(h) for h in first))
        for _ in range(8):
            pair = [await backend.submit(payload("whoami"), Hooks()) for _ in range(2)]
            assert sorted(value(o) for o in await asyncio.gather(*(backend.wait(h) for h in pair))) == sorted(pids)
        room = backend.capacity()
        handles = [await backend.submit(payload("add", i, i, key=f"a{i}"), Hooks()) for i in range(room)]
        # Each goes to the worker holding fewer: the first two to one each, then both take some.
        assert {worker_pid(h) for h in handles[:2]} == set(pids)
        assert all(sum(worker_pid(h) == p for h in handles) >= 2 for p in pids)
        more = [await backend.submit(payload("add", i, 1, key=f"b{i}"), Hooks()) for i in range(200)]
        outcomes = await asyncio.gather(*(backend.wait(h) for h in handles + more))
        assert [value(o) for o in outcomes] == [2 * i for i in range(room)] + [i + 1 for i in range(200)]
        assert {o.where.split(":")[1] for o in outcomes} == {str(p) for p in pids}
        assert len(set(pids)) == len(backend._workers) == 2  # nothing was lost on the way


@engine.task
async def warm_up(n: int) -> int:
    for i in range(n):
        await t.where(i)
    return n


@engine.task
async def fan_behind_one(marker: str, n: int) -> list[int]:
    """``dies_once`` first; once it runs, ``n`` quick actions (queued behind it in the one worker)."""
    # A sync task, called from async code: what the call returns is awaited.
    first: asyncio.Future[int] = asyncio.ensure_future(cast("Awaitable[int]", t.dies_once(marker)))
    await until(lambda: os.path.exists(marker), "dies_once to start")
    rest = await asyncio.gather(*(t.where(i) for i in range(n)))
    return [await first, *(x for x, _ in rest)]


async def test_a_worker_that_dies_with_attempts_queued_has_every_one_retried(tmp_path: Path) -> None:
    box = offload.Local(workers=1)
    marker = tmp_path / "runs"
    async with engine.Engine(home=tmp_path / "home", targets={"box": box}) as eng:
        assert (await eng.run(warm_up, 8)).result == 8
        run = await eng.submit(fan_behind_one, str(marker), 4)
        await until(lambda: marker.exists() and marker.read_text().strip(), "the first attempt to start")
        pid = int(marker.read_text().split()[0])
        await until(lambda: sum(len(w.in_flight) for w in box._workers) == 5, "the others to be queued behind it")
        os.kill(pid, signal.SIGKILL)
        await run.wait()
        assert (run.status, run.result) == ("succeeded", [2, 0, 2, 4, 6])
        shown = await eng.get_run(run.id, actions=True)
    held = [a for a in shown.action_records if a.task in ("where", "dies_once")]
    assert len(held) == 5
    for action in held:
        # Lost with the worker (running or queued), retried on a new one, the task's retries untouched.
        assert [(a.attempt, a.state) for a in action.attempts] == [(1, "lost"), (1, "succeeded")]
        assert action.attempts[0].where.endswith(f":{pid}") and not action.attempts[1].where.endswith(f":{pid}")
    assert run.stats["retries"] == 5


async def test_files_made_in_an_attempt_go_to_the_engines_blob_store(
    local: offload.Local, tmp_path: Path
) -> None:
    outcome = await local.wait(await local.submit(payload("make_file", "made remotely"), Hooks()))
    made = value(outcome, engine.File)
    assert isinstance(made, engine.File)
    store = engine.LocalBlobStore(tmp_path / "blobs")
    assert await made.read_bytes(store=store) == b"made remotely"
    # The worker kept nothing in the folder it ran in.
    assert not (tmp_path / ".shoal").exists()


async def test_aclose_leaves_no_worker_process(tmp_path: Path) -> None:
    backend = offload.Local(workers=2, env=worker_env())
    await backend.open(context(tmp_path))
    handles = [await backend.submit(payload("sleepy", 30.0, key=f"s{i}"), Hooks()) for i in range(2)]
    pids = {worker_pid(h) for h in handles}
    assert len(pids) == 2 and not any(gone(p) for p in pids)
    await backend.aclose()
    assert all(gone(p) for p in pids)
    me = psutil.Process()
    assert not [p for p in me.children(recursive=True) if "offload.worker" in " ".join(p.cmdline())]
    for handle in handles:
        with pytest.raises(engine.OffloadError):
            await backend.wait(handle)
    # Workers that wrote nothing to stderr leave no log file.
    assert list((tmp_path / "home" / "offload-local" / "logs").iterdir()) == []


def _project(tmp_path: Path) -> tuple[Path, str]:
    """A project folder with one task module, bundled; (the bundles' folder, the digest)."""
    from offload._bundle import build_bundle

    project = tmp_path / "project"
    project.mkdir()
    (project / "bundled_flow.py").write_text(
        "import os\n\nimport engine\n\n\n@engine.task\ndef where(x: int) -> str:\n"
        "    return f'{x} from {os.path.dirname(__file__)}'\n"
    )
    built = build_bundle(project, dest=tmp_path / "bundles")
    return tmp_path / "bundles", built.digest


async def test_a_code_bundle_is_sent_once_unpacked_and_put_first_on_the_path(tmp_path: Path) -> None:
    bundles, digest = _project(tmp_path)
    asked: list[str] = []

    def bundle_path(wanted: str) -> Path:
        asked.append(wanted)
        return bundles / f"{wanted}.tar.gz"

    backend = offload.Local(workers=1, env=worker_env())
    await backend.open(
        BackendContext(home=tmp_path / "home", blob_store=str(tmp_path / "blobs"), bundle_path=bundle_path)
    )
    job = msgspec.structs.replace(payload("where", 7, module="bundled_flow"), bundle=digest)
    try:
        first = await backend.submit(job, Hooks())
        text = value(await backend.wait(first))
        # Imported from the unpacked bundle, not from the project folder (which is not on the path).
        assert text.startswith("7 from ") and digest in text and str(tmp_path / "project") not in text
        assert asked == [digest]
        # A new worker finds the bundle unpacked in the cache and does not ask again.
        await backend.cancel(await backend.submit(payload("sleepy", 30.0), Hooks()))
        second = await backend.submit(job, Hooks())
        assert worker_pid(second) != worker_pid(first)
        assert value(await backend.wait(second)) == text
        assert asked == [digest]
    finally:
        await backend.aclose()


@pytest.mark.parametrize(("copy", "says"), [("missing", "missing"), ("damaged", "damaged in transit")])
async def test_a_bundle_the_engine_cannot_send_fails_the_attempt_naming_it(
    tmp_path: Path, copy: str, says: str
) -> None:
    bundles, digest = _project(tmp_path)
    sent = bundles / f"{digest}.tar.gz"
    if copy == "missing":
        sent.unlink()
    else:
        sent.write_bytes(sent.read_bytes()[:-10] + b"0123456789")
    backend = offload.Local(workers=1, env=worker_env())
    await backend.open(BackendContext(home=tmp_path / "home", bundle_path=lambda d: bundles / f"{d}.tar.gz"))
    job = msgspec.structs.replace(payload("where", 7, module="bundled_flow"), bundle=digest)
    try:
        outcome = await backend.wait(await backend.submit(job, Hooks()))
        assert not outcome.ok and outcome.error_kind == "system" and outcome.error is not None
        assert digest[:16] in outcome.error.message and says in outcome.error.message
    finally:
        await backend.aclose()


def _script(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


async def test_a_worker_of_another_shoal_version_is_refused_before_any_attempt(tmp_path: Path) -> None:
    sent = tmp_path / "sent"
    fake = _script(
        tmp_path / "old-python",
        f"""\
        import os, sys
        from engine.extend import Hello, encode_frame
        hello = Hello(python="3.11.0", shoal="0.0.1", cpus=1, gpus=0, hostname="oldbox", pid=os.getpid(),
                      executable=sys.argv[0])
        with open({str(sent)!r}, "wb") as f:
            sys.stdout.buffer.write(encode_frame(hello))
            sys.stdout.flush()
            while chunk := sys.stdin.buffer.read1(65536):
                f.write(chunk)
                f.flush()
        """,
    )
    async with offload.Local(workers=1, python=fake) as backend:
        with pytest.raises(engine.OffloadError) as refused:
            await backend.submit(payload("whoami"), Hooks())
    message = str(refused.value)
    assert "oldbox" in message and fake in message and "0.0.1" in message and VERSION in message
    assert not isinstance(refused.value, offload.SubmitFailed)
    assert sent.read_bytes() == b""  # no Start was sent


async def test_an_interpreter_without_shoal_is_a_clear_error(tmp_path: Path) -> None:
    venv = tmp_path / "bare"
    base = getattr(sys, "_base_executable", sys.executable)
    made = await asyncio.create_subprocess_exec(base, "-m", "venv", "--without-pip", str(venv))
    assert await made.wait() == 0
    python = str(venv / "bin" / "python")
    async with offload.Local(workers=1, python=python) as backend:
        with pytest.raises(engine.OffloadError) as refused:
            await backend.submit(payload("whoami"), Hooks())
    message = str(refused.value)
    assert python in message and "shoal is not installed there" in message
    assert f"{python} -m pip install shoal=={VERSION}" in message


async def test_a_worker_that_dies_at_start_is_submit_failed_quoting_its_stderr(tmp_path: Path) -> None:
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'fatal: cannot map the GPU driver' >&2\nexit 3\n")
    broken.chmod(0o755)
    async with offload.Local(workers=1, python=str(broken)) as backend:
        with pytest.raises(offload.SubmitFailed) as failed:
            await backend.submit(payload("whoami"), Hooks())
    message = str(failed.value)
    assert "exit status 3" in message and "fatal: cannot map the GPU driver" in message


async def test_a_missing_interpreter_is_a_clear_error(tmp_path: Path) -> None:
    async with offload.Local(python=str(tmp_path / "no-such-python")) as backend:
        with pytest.raises(engine.OffloadError, match=r"no-such-python.*has shoal installed"):
            await backend.submit(payload("whoami"), Hooks())


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"workers": 0}, "workers"),
        ({"workers": True}, "workers"),
        ({"retries": -1}, "retries"),
        ({"concurrency": 1.5}, "concurrency"),
        ({"env": {"A": 1}}, "env"),
        ({"python": ""}, "python"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, object], named: str) -> None:
    with pytest.raises(engine.ConfigError, match=f"{named}="):
        offload.Local(**kwargs)  # type: ignore[arg-type]


def test_unfit_requests_are_named() -> None:
    local = offload.Local(env={"CUDA_VISIBLE_DEVICES": "0"})
    assert local.unfit(1, 0) is None and local.unfit(0, 1) is None
    reason = local.unfit(10_000, 0)
    assert reason is not None and "10000 CPUs" in reason
    assert local.unfit(0, 2) == "it asks for 2 GPUs and the local workers' machine has 1"


async def test_closing_while_a_worker_starts_leaves_no_process(tmp_path: Path) -> None:
    backend = offload.Local(workers=1, env=worker_env())
    await backend.open(context(tmp_path))
    submit = asyncio.create_task(backend.submit(payload("whoami"), Hooks()))
    await asyncio.sleep(0)  # the worker is being started
    await backend.aclose()
    with pytest.raises(engine.OffloadError, match="closed while this attempt waited for a worker"):
        await submit
    me = psutil.Process()
    assert not [p for p in me.children(recursive=True) if "offload.worker" in " ".join(p.cmdline())]


async def test_closing_with_submits_waiting_for_a_slot_starts_no_new_worker(tmp_path: Path) -> None:
    backend = offload.Local(workers=1, env=worker_env())
    await backend.open(context(tmp_path))
    busy = await backend.submit(payload("sleepy", 30.0), Hooks())
    waiting = asyncio.create_task(backend.submit(payload("whoami"), Hooks()))
    await asyncio.sleep(0.05)
    await backend.aclose()
    with pytest.raises(engine.OffloadError, match="closed while this attempt waited for a worker"):
        await waiting
    assert gone(worker_pid(busy))
    me = psutil.Process()
    assert not [p for p in me.children(recursive=True) if "offload.worker" in " ".join(p.cmdline())]


def test_import_offload_stays_cheap() -> None:
    code = "import sys, offload; print(sorted(m for m in sys.modules if m.startswith('offload')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['offload']"


def test_offload_errors_pickle_and_print_as_offload_names() -> None:
    for cls in (offload.WorkerLost, offload.HostLost, offload.Reclaimed, offload.SubmitFailed):
        assert cls.__module__ == "offload" and issubclass(cls, engine.OffloadError)
        back = pickle.loads(pickle.dumps(cls("gone")))
        assert type(back) is cls and str(back) == "gone"
    assert offload.Local.__module__ == "offload"


def _open_fds_to(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
    return found


async def test_a_worker_log_whose_opener_was_cancelled_is_closed_not_leaked(tmp_path: Path) -> None:
    # The ranks of a gang start their workers together; when one cannot
    # start, the others are cancelled, some while a thread opens their log.
    # The file that thread opens must be closed (an unclosed one is a
    # ResourceWarning, an error in this suite, whenever it is collected).
    from offload._local import _open_log

    for i in range(20):
        path = tmp_path / f"worker-{i}.log"
        opening = asyncio.ensure_future(_open_log(path))
        await asyncio.sleep(0)  # the thread is opening it now
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        for _ in range(200):
            if path.exists() and not _open_fds_to(path):
                break
            await asyncio.sleep(0.01)
        assert path.exists() and not _open_fds_to(path)
    gc.collect()  # a file left to the collector would warn here
