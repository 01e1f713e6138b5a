"""Gangs (``nodes=N``) on ``offload.Local``: N real worker processes per attempt, failing fast as one."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from typer.testing import CliRunner

import _gang_tasks as g
import engine
import offload
from _offload_kit import gone, until
from engine._cli import build_app
from engine._overrides import parse_with

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from typer.testing import Result


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[engine.Engine]:
    """A journaled engine whose target "lab" is an offload.Local (one worker for single attempts)."""
    async with engine.Engine(home=tmp_path / "home", targets={"lab": offload.Local(workers=1)}) as eng:
        yield eng


def rank_workers() -> list[psutil.Process]:
    """The worker processes this test process has started and that still run."""
    return [
        p for p in psutil.Process().children(recursive=True)
        if p.status() != psutil.STATUS_ZOMBIE and any("offload.worker" in part for part in p.cmdline())
    ]


async def shoal(*args: str) -> Result:
    """The ``shoal`` command, run in a thread (it runs an event loop of its own)."""
    def invoke() -> Result:
        return CliRunner().invoke(build_app(), list(args))

    return await asyncio.to_thread(invoke)


def pids_in(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(folder.glob("rank-*"))]


async def test_a_four_rank_gang_allreduces_over_sockets_and_returns_rank_0s_result(lab: engine.Engine) -> None:
    run = await lab.run(g.allreduce.override(offload="lab"), 10)
    assert run.status == "succeeded", run.error
    result = run.result
    # 10*1 + 10*2 + 10*3 + 10*4, summed by the ranks themselves over TCP.
    assert result["total"] == 100 and result["rank"] == 0
    seen = result["cluster"]
    assert (seen["rank"], seen["world_size"], seen["local_rank"], seen["local_world_size"]) == (0, 4, 0, 4)
    assert seen["master_addr"] == "127.0.0.1" and seen["master_port"] > 0
    assert seen["hosts"] == ["127.0.0.1"] * 4
    assert result["env"] == {
        "RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(seen["master_port"]),
    }
    assert result["pid"] != os.getpid()

    shown = await lab.get_run(run.id, actions=True)
    [action] = [a for a in shown.action_records if a.task == "allreduce"]
    [attempt] = action.attempts
    assert (attempt.state, attempt.target, attempt.backend) == ("succeeded", "lab", "local")
    assert len(attempt.ranks) == 4 and attempt.where == attempt.ranks[0]
    pids = [int(place.rsplit(":", 1)[1]) for place in attempt.ranks]
    assert len(set(pids)) == 4 and pids[0] == result["pid"]
    # No rank process outlives its gang.
    assert all(gone(pid) for pid in pids)


async def test_every_rank_prints_under_the_action_with_its_rank(lab: engine.Engine) -> None:
    run = await lab.run(g.allreduce.override(offload="lab", nodes=3), 1)
    assert run.status == "succeeded", run.error
    assert run.result["total"] == 6  # 1 + 2 + 3: override(nodes=) makes the gang 3 ranks
    shown = await lab.get_run(run.id)
    lines = await shown.alogs()
    assert sorted((line.rank, line.text) for line in lines) == [
        (r, f"rank {r} of 3 summed 6") for r in range(3)
    ]
    store = str(lab.home / "shoal.db")
    out = await shoal("logs", run.id, "--store", store)
    assert out.exit_code == 0, out.output
    for r in range(3):
        assert f"[rank {r}] rank {r} of 3 summed 6" in out.output
    as_json = await shoal("logs", run.id, "--json", "--store", store)
    assert sorted(line["rank"] for line in json.loads(as_json.output)) == [0, 1, 2]
    show = await shoal("show", run.id, "--actions", "--store", store)
    assert show.exit_code == 0, show.output
    assert "3 ranks" in show.output


async def test_rank_0s_value_is_the_actions_result(lab: engine.Engine) -> None:
    run = await lab.run(g.rank_only.override(offload="lab"))
    assert (run.status, run.result) == ("succeeded", 100)


async def test_a_rank_that_raises_fails_the_gang_naming_it_and_stops_the_others(
    lab: engine.Engine, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    run = await lab.run(g.fails_on.override(offload="lab"), 1, str(pids))
    assert run.status == "failed"
    error = run.error
    assert isinstance(error, ValueError) and str(error) == "rank 1 gives up"
    assert getattr(error, "rank", None) == 1
    assert any(note.startswith("raised on rank 1 of 3 (") for note in getattr(error, "__notes__", []))
    started = pids_in(pids)
    assert len(started) == 3
    # The ranks that were sleeping for minutes are gone by the time the run has failed.
    assert all(gone(pid) for pid in started)


async def test_a_rank_that_dies_loses_the_gang_which_is_retried_as_one(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    async with engine.Engine(home=tmp_path / "home", targets={"lab": offload.Local(retries=1)}) as eng:
        run = await eng.run(g.dies_on.override(offload="lab"), 1, str(pids))
        assert run.status == "failed"
        assert isinstance(run.error, offload.WorkerLost)
        assert "rank 1 of 2" in str(run.error)
        shown = await eng.get_run(run.id, actions=True)
        [action] = [a for a in shown.action_records if a.task == "dies_on"]
        # The first gang and its one infrastructure retry, each lost with all its ranks.
        assert [a.state for a in action.attempts] == ["lost", "lost"]
        assert all(len(a.ranks) == 2 for a in action.attempts)
        assert action.attempt == 1  # the task's own retries were not used
        places = [place for a in action.attempts for place in a.ranks]
    assert all(gone(int(place.rsplit(":", 1)[1])) for place in places)


async def test_cancelling_a_gang_kills_every_rank(lab: engine.Engine, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    run = await lab.submit(g.fails_on.override(offload="lab"), 99, str(pids))  # nobody fails: all sleep
    await until(lambda: len(list(pids.glob("rank-*"))) == 3, "every rank to start")
    run.cancel()
    await run
    assert run.status == "cancelled"
    started = pids_in(pids)
    await until(lambda: all(gone(pid) for pid in started), "every rank to be gone", seconds=2)


async def test_only_rank_0s_traces_are_checkpointed(lab: engine.Engine) -> None:
    run = await lab.run(g.traced_ranks.override(offload="lab"), 4)
    assert (run.status, run.result) == ("succeeded", 0 + 1 + 2 + 3)
    db = sqlite3.connect(lab.home / "shoal.db")
    try:
        traces = db.execute("SELECT count(*) FROM actions WHERE run_id=? AND kind='trace'", (run.id,)).fetchone()
    finally:
        db.close()
    assert traces == (4,)


def test_outside_a_gang_cluster_is_rank_0_of_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    me = engine.cluster()
    assert (me.rank, me.world_size, me.local_rank, me.local_world_size) == (0, 1, 0, 1)
    assert (me.master_addr, me.master_port) == ("127.0.0.1", 0)
    assert len(me.hosts) == 1
    assert "RANK" not in os.environ


# -- bad input ------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [0, -2, 1.5, "4", True])
def test_nodes_must_be_a_whole_number_of_at_least_1(nodes: Any) -> None:
    with pytest.raises(engine.ConfigError, match=r"nodes= is how many ranks"):
        engine.task(nodes=nodes)(g.socket_allreduce)


@pytest.mark.parametrize("per_host", [0, 2.0, "2"])
def test_ranks_per_host_must_be_a_whole_number(per_host: Any) -> None:
    with pytest.raises(engine.ConfigError, match=r"ranks_per_host= is the most ranks"):
        engine.task(nodes=2, ranks_per_host=per_host)(g.socket_allreduce)


async def test_nodes_without_an_offload_target_is_refused_when_called(tmp_path: Path) -> None:
    async with engine.Engine(home=tmp_path / "home") as eng:
        run = await eng.run(g.rank_only)
    assert run.status == "failed"
    assert isinstance(run.error, engine.ConfigError)
    message = str(run.error)
    assert "nodes=2" in message and "offload=" in message and "offload.Local()" in message


async def test_ranks_per_host_that_local_cannot_meet_is_a_resource_error(lab: engine.Engine) -> None:
    run = await lab.run(g.rank_only.override(offload="lab", ranks_per_host=1))
    assert run.status == "failed"
    assert isinstance(run.error, engine.ResourceError)
    assert "ranks_per_host=1" in str(run.error) and "offload.Local runs all 2 ranks" in str(run.error)


def test_with_sets_nodes_and_ranks_per_host_from_the_command_line() -> None:
    assert parse_with(["train.nodes=4", "train.ranks_per_host=2"]) == {"train": {"nodes": 4, "ranks_per_host": 2}}
    with pytest.raises(engine.ConfigError, match=r"--with train.nodes=0: .*nodes= is how many ranks"):
        parse_with(["train.nodes=0"])
    with pytest.raises(engine.ConfigError, match=r"--with train.nodes=four: nodes takes a whole number"):
        parse_with(["train.nodes=four"])


async def test_a_gang_that_cannot_start_leaves_no_rank_behind(tmp_path: Path) -> None:
    broken = offload.Local(python=str(tmp_path / "no-such-python"))
    async with engine.Engine(home=tmp_path / "home", targets={"lab": broken}) as eng:
        run = await eng.run(g.rank_only.override(offload="lab"))
    assert run.status == "failed"
    assert isinstance(run.error, engine.OffloadError) and "no-such-python" in str(run.error)
    await asyncio.sleep(0)
    assert rank_workers() == []


async def test_the_next_gang_starts_on_spares_made_after_the_last_and_close_leaves_none(tmp_path: Path) -> None:
    async with engine.Engine(home=tmp_path / "home", targets={"lab": offload.Local(workers=1)}) as eng:
        first = await eng.run(g.rank_only.override(offload="lab"))
        assert first.status == "succeeded", first.error
        # Once the gang has ended, as many fresh workers as it had ranks wait for the next one.
        await until(lambda: len(rank_workers()) == 2, "two spares to start")
        spares = {p.pid for p in rank_workers()}
        second = await eng.run(g.rank_only.override(offload="lab"))
        assert (second.status, second.result) == ("succeeded", 100)
        shown = await eng.get_run(second.id, actions=True)
        [action] = [a for a in shown.action_records if a.task == "rank_only"]
        assert {int(place.rsplit(":", 1)[1]) for place in action.attempts[0].ranks} == spares
        assert not {int(place.rsplit(":", 1)[1]) for place in action.attempts[0].ranks} & {
            int(place.rsplit(":", 1)[1])
            for a in (await eng.get_run(first.id, actions=True)).action_records
            if a.task == "rank_only"
            for place in a.attempts[0].ranks
        }
    assert rank_workers() == []
