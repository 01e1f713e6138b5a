"""Structured cancellation: cancelling a run reaches every descendant action."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import engine

if TYPE_CHECKING:
    from pathlib import Path
from typing import Any


class Tree:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.all_started = asyncio.Event()


def make_tree(tree: Tree, leaves: int) -> engine.Task[[], Any]:
    @engine.task
    async def grandchild(i: int) -> None:
        tree.started.append(f"g{i}")
        if len(tree.started) == leaves:
            tree.all_started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            tree.cancelled.append(f"g{i}")
            raise
        tree.finished.append(f"g{i}")

    @engine.task
    async def child(k: int) -> None:
        await asyncio.gather(grandchild(2 * k), grandchild(2 * k + 1))

    @engine.task
    async def root() -> None:
        await asyncio.gather(*(child(k) for k in range(leaves // 2)))

    return root


async def test_run_cancel_reaches_grandchildren(eng: engine.Engine) -> None:
    tree = Tree()
    root = make_tree(tree, 6)
    run = await eng.submit(root)
    await asyncio.wait_for(tree.all_started.wait(), 10)
    run.cancel()
    await run.wait()
    assert run.status == "cancelled"
    assert sorted(tree.cancelled) == sorted(tree.started)
    assert tree.finished == []
    assert run.counters["grandchild"].cancelled == 6
    assert run.counters["child"].cancelled == 3
    assert run.counters["root"].cancelled == 1
    assert run.stats["running"] == 0


async def test_cancelling_the_awaiting_coroutine_cancels_the_run(eng: engine.Engine) -> None:
    tree = Tree()
    root = make_tree(tree, 4)
    waiter = asyncio.create_task(eng.run(root))
    await asyncio.wait_for(tree.all_started.wait(), 10)
    [run] = eng.runs_in_flight.values()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    assert run.status == "cancelled"
    assert sorted(tree.cancelled) == sorted(tree.started)
    assert not eng.runs_in_flight


async def test_cancelled_actions_are_recorded_in_the_journal() -> None:
    tree = Tree()
    root = make_tree(tree, 4)
    async with engine.Engine(store="j.db") as eng:
        run = await eng.submit(root)
        await asyncio.wait_for(tree.all_started.wait(), 10)
        run.cancel()
        await run.wait()
        details = await eng.get_run(run.id, actions=True)
    assert details.status == "cancelled"
    states = {(a.task, a.state) for a in details.action_records}
    assert states == {("root", "cancelled"), ("child", "cancelled"), ("grandchild", "cancelled")}
    assert len(details.action_records) == 1 + 2 + 4


async def test_orphaned_actions_do_not_outlive_their_run(eng: engine.Engine) -> None:
    orphan_cancelled = asyncio.Event()
    orphan_started = asyncio.Event()

    @engine.task
    async def orphan() -> None:
        orphan_started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            orphan_cancelled.set()
            raise

    @engine.task
    async def main() -> str:
        asyncio.get_running_loop().create_task(orphan())  # never awaited
        await orphan_started.wait()
        return "done"

    run = await eng.run(main)
    assert run.result == "done"
    assert orphan_cancelled.is_set()


async def test_the_engine_keeps_working_after_a_cancel(eng: engine.Engine) -> None:
    tree = Tree()
    run = await eng.submit(make_tree(tree, 2))
    await asyncio.wait_for(tree.all_started.wait(), 10)
    run.cancel()
    await run.wait()

    @engine.task
    async def fine() -> int:
        return 5

    assert (await eng.run(fine)).result == 5


def test_ctrl_c_cancels_the_run_and_raises_keyboard_interrupt(tmp_path: Path) -> None:
    script = tmp_path / "flow.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, sys
            import engine

            @engine.task
            async def leaf(i: int) -> None:
                print("started", flush=True)
                await asyncio.sleep(60)

            @engine.task
            async def main() -> None:
                await asyncio.gather(*(leaf(i) for i in range(3)))

            try:
                engine.run(main)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                sys.exit(130)
            """
        )
    )
    env = {**os.environ, "SHOAL_HOME": str(tmp_path / ".shoal")}
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        for _ in range(3):
            assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "interrupted" in out
    [run] = engine.runs(limit=5)
    assert run.status == "cancelled"
    details = engine.get_run(run.id, actions=True)
    assert {a.state for a in details.action_records} == {"cancelled"}
    assert len(details.action_records) == 4


async def test_cancel_while_actions_wait_for_a_slot() -> None:
    started = asyncio.Event()

    @engine.task
    async def child(i: int) -> None:
        started.set()
        await asyncio.sleep(60)

    @engine.task
    async def main() -> None:
        await asyncio.gather(*(child(i) for i in range(4)))

    async with engine.Engine(store="j.db", max_concurrency=1) as eng:
        run = await eng.submit(main)
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.05)
        run.cancel()
        await run.wait()
        details = await eng.get_run(run.id, actions=True)
    assert run.status == "cancelled"
    counts = run.counters["child"]
    assert (counts.pending, counts.running, counts.cancelled) == (0, 0, 4)
    assert sorted(a.state for a in details.action_records) == ["cancelled"] * 5


async def test_no_action_outlives_a_failed_run() -> None:
    """Siblings of a failed child, still waiting for a slot, are cancelled with the run."""
    ran_after: list[int] = []

    @engine.task
    async def child(i: int) -> int:
        if i == 0:
            raise ValueError("first child fails")
        await asyncio.sleep(0.05)
        ran_after.append(i)
        return i

    @engine.task
    async def main() -> list[int]:
        return list(await asyncio.gather(*(child(i) for i in range(6))))

    async with engine.Engine(store="memory", max_concurrency=2) as eng:
        run = await eng.run(main)
        stats_at_end = run.stats
        done_at_end = list(ran_after)
        await asyncio.sleep(0.3)
    assert run.status == "failed"
    assert stats_at_end["running"] == 0 and stats_at_end["pending"] == 0
    assert ran_after == done_at_end  # nothing ran after the run ended


async def test_abandoned_call_does_not_run_after_its_run(eng: engine.Engine) -> None:
    ran = asyncio.Event()

    @engine.task
    async def later() -> None:
        ran.set()

    @engine.task
    async def main() -> str:
        asyncio.get_running_loop().create_task(later())  # started after main returns
        return "done"

    run = await eng.run(main)
    await asyncio.sleep(0.05)
    assert run.result == "done"
    assert not ran.is_set()
    assert run.counters["later"].cancelled == 1


async def test_concurrent_journaled_runs_are_watched_each_on_its_own(tmp_path: Path) -> None:
    # One watcher serves every live run of a journal: a cancel request
    # reaches the run it names and no other, while each run's running
    # actions and printed lines still reach the journal.
    gate = asyncio.Event()
    started: list[int] = []

    @engine.task(name="watched_leaf")
    async def leaf(i: int) -> int:
        print(f"leaf {i} waiting")  # noqa: T201 (captured into the journal)
        started.append(i)
        await gate.wait()
        return i

    @engine.task(name="watched_root")
    async def root(i: int) -> int:
        return await leaf(i)

    async with engine.Engine(store=tmp_path / "j.db") as eng:
        journal = await eng.journal()
        runs = [await eng.submit(root, i) for i in range(3)]
        for _ in range(200):
            if len(started) == 3:
                break
            await asyncio.sleep(0.01)
        # Written by the watcher about once a second.
        live: dict[str, list[str]] = {}
        for _ in range(100):
            live = {run.id: sorted(a.task for a in await journal.running_actions(run.id)) for run in runs}
            if all(live.values()):
                break
            await asyncio.sleep(0.05)
        assert live == {run.id: ["watched_leaf", "watched_root"] for run in runs}
        assert await journal.request_cancel(runs[1].id) == "running"
        await asyncio.wait_for(runs[1].wait(), 10)
        assert runs[1].status == "cancelled"
        assert not runs[0].done and not runs[2].done
        for _ in range(100):
            lines = [text for _a, _t, _s, text, _r in await journal.logs(runs[0].id)]
            if lines:
                break
            await asyncio.sleep(0.05)
        assert lines == ["leaf 0 waiting"]  # handed over while the run still runs
        gate.set()
        done = [await run.wait() for run in (runs[0], runs[2])]
    assert [(run.status, run.result) for run in done] == [("succeeded", 0), ("succeeded", 2)]
