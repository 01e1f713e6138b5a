"""Gangs on offload.Batch: one multi-node parallel job per attempt, on the moto rig (see ``_batch_rig``).

Each node of a job is a fresh ``python -m offload.worker --batch ...
--master-port PORT`` process with AWS Batch's node variables; the ranks
talk to rank 0 over TCP on this machine, as nodes of one job would over
their VPC.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from typing import TYPE_CHECKING, Any

import pytest

import _batch_gang_tasks as tasks
import engine
import offload
from _moto_batch import PYTHON, QUEUE, BatchRig, batch_env, batch_rig, kill_driver_then_resume

__all__ = ["batch_env", "batch_rig"]  # fixtures used by name

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

POLL = 0.2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def aws(**options: Any) -> offload.Batch:
    options.setdefault("image", "shoal-test:1")
    return offload.Batch(QUEUE, python=PYTHON, poll_interval=POLL, master_port=free_port(), **options)


@pytest.fixture
async def eng(batch_env: str) -> AsyncIterator[engine.Engine]:
    async with engine.Engine(targets={"aws": aws()}, blob_store=f"s3://{batch_env}/blobs") as e:
        yield e


async def until(check: Any, what: str, seconds: float = 30.0) -> Any:
    for _ in range(int(seconds / 0.05)):
        found = await asyncio.to_thread(check)
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def attempts_of(eng: engine.Engine, run_id: str) -> list[Any]:
    details = await eng.get_run(run_id, actions=True)
    return [a for action in details.action_records for a in action.attempts]


async def lost_errors(eng: engine.Engine, run_id: str) -> list[str]:
    """Why each lost attempt of the run was lost, as the journal recorded it."""
    journal = await eng.journal()
    rows = await journal.read(
        lambda db: db.execute(
            "SELECT error FROM attempts WHERE run_id=? AND state='lost' ORDER BY rowid", (run_id,)
        ).fetchall()
    )
    return [str(e) for (e,) in rows]


async def failure(eng: engine.Engine, task: Any, *args: Any) -> BaseException | None:
    run = await eng.run(task, *args)
    assert run.status == "failed", run.status
    with pytest.raises(engine.RunFailed) as info:
        run.result  # noqa: B018 - reading it raises
    return info.value.__cause__


async def test_a_three_node_gang_is_one_multi_node_job_and_returns_rank_0s_result(
    batch_env: str, batch_rig: BatchRig
) -> None:
    target = aws()
    async with engine.Engine(targets={"aws": target}, blob_store=f"s3://{batch_env}/b") as eng:
        run = await eng.run(tasks.gang_sum.override(offload="aws"), 10)
        journal = await eng.journal()
        lines = await journal.logs(run.id)
        (attempt,) = await attempts_of(eng, run.id)
    assert run.result == {"rank": 0, "total": 10 * (1 + 2 + 3)}
    calls = batch_rig.calls()
    assert calls["SubmitJob"] == 1 and calls["RegisterJobDefinition"] == 1
    # One multi-node job: numNodes 3, main node 0, the attempt's command on every node.
    batch = batch_rig.client("batch")
    job_id = attempt.where
    (job,) = batch.describe_jobs(jobs=[job_id])["jobs"]
    assert job["status"] == "SUCCEEDED"
    assert job["nodeProperties"]["numNodes"] == 3 and job["nodeProperties"]["mainNode"] == 0
    nodes = batch.describe_jobs(jobs=[f"{job_id}#{i}" for i in range(3)])["jobs"]
    assert sorted(n["nodeDetails"]["nodeIndex"] for n in nodes) == [0, 1, 2]
    # Every rank saw its own place in the gang, and the same master.
    views = {r: json.loads(t[len("VIEW ") :]) for _, _, _, t, r in lines if t.startswith("VIEW ") and r is not None}
    assert sorted(views) == [0, 1, 2]
    masters = {(v["master_addr"], v["master_port"]) for v in views.values()}
    assert masters == {(socket.gethostbyname(socket.gethostname()), target.master_port)}
    for rank, view in views.items():
        assert view["rank"] == rank and view["node"] == str(rank)
        assert (view["world_size"], view["local_rank"], view["local_world_size"]) == (3, 0, 1)
        assert view["hosts"] == [f"{job_id}#{i}" for i in range(3)]
        assert view["env"] == {
            "RANK": str(rank),
            "WORLD_SIZE": "3",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": view["master_addr"],
            "MASTER_PORT": str(target.master_port),
        }
        assert view["total"] == 60
    # The attempt record names each rank's node job.
    assert attempt.backend == "batch" and attempt.state == "succeeded"
    assert list(attempt.ranks) == [f"{job_id}#{i}" for i in range(3)]


async def test_every_ranks_output_is_captured_under_the_action_with_its_rank(eng: engine.Engine) -> None:
    run = await eng.run(tasks.gang_sleeps.override(offload="aws"), 0.1)
    assert run.result == 100
    journal = await eng.journal()
    lines = await journal.logs(run.id)
    printed = {(rank, text) for _, _, _, text, rank in lines}
    assert {(r, f"rank {r} sleeps") for r in range(3)} <= printed
    assert len({action for action, *_ in lines}) == 1  # all under the gang's one action


async def test_a_child_node_that_raises_fails_the_gang_at_once_with_its_rank_named(
    eng: engine.Engine, batch_rig: BatchRig
) -> None:
    # The other ranks sleep for five minutes: the run ends only because the
    # main node stops the gang as soon as rank 1 reports its failure.
    error = await failure(eng, tasks.gang_fails_on.override(offload="aws"), 1)
    assert isinstance(error, ValueError) and str(error) == "rank 1 gives up"
    assert getattr(error, "rank", None) == 1
    note = "\n".join(getattr(error, "__notes__", []))
    assert "raised on rank 1 of 3" in note and "#1 on " in note
    await until(lambda: not batch_rig.processes(), "every node to be stopped")
    assert batch_rig.calls()["SubmitJob"] == 1  # a task's own exception: not retried


async def test_rank_0_raising_fails_the_gang_with_rank_0_named(eng: engine.Engine, batch_rig: BatchRig) -> None:
    error = await failure(eng, tasks.gang_fails_on.override(offload="aws"), 0)
    assert isinstance(error, ValueError) and getattr(error, "rank", None) == 0
    await until(lambda: not batch_rig.processes(), "every node to be stopped")


async def test_a_lost_node_fails_the_attempt_and_the_gang_is_retried_as_one(
    eng: engine.Engine, batch_rig: BatchRig
) -> None:
    running = asyncio.ensure_future(eng.run(tasks.gang_sleeps.override(offload="aws"), 4.0))
    node = await until(
        lambda: next((j for j in batch_rig.processes() if j.endswith("#1")), None), "node 1 to start"
    )
    batch_rig.client("batch").terminate_job(jobId=node, reason="Host EC2 (instance i-0123456789abcdef0) terminated.")
    run = await running
    assert run.result == 100
    assert batch_rig.calls()["SubmitJob"] == 2
    states = [(a.attempt, a.state) for a in await attempts_of(eng, run.id)]
    assert states == [(1, "lost"), (1, "succeeded")]
    (why,) = await lost_errors(eng, run.id)
    assert f"rank 1 of 3 (node job {node})" in why and "spot reclaim" in why, why


async def test_a_node_killed_without_an_outcome_is_a_lost_rank(eng: engine.Engine, batch_rig: BatchRig) -> None:
    running = asyncio.ensure_future(eng.run(tasks.gang_sleeps.override(offload="aws"), 4.0))
    pid = await until(
        lambda: next((p for j, p in batch_rig.processes().items() if j.endswith("#2")), None), "node 2 to start"
    )
    os.kill(pid, signal.SIGKILL)
    run = await running
    assert run.result == 100  # retried as one gang
    details = await eng.get_run(run.id, actions=True)
    (action,) = [a for a in details.action_records if a.attempts]
    assert [a.state for a in action.attempts] == ["lost", "succeeded"]
    (why,) = await lost_errors(eng, run.id)
    assert "rank 2 of 3" in why and "ended without an outcome" in why and "retried" in why, why


async def test_cancelling_a_gang_terminates_its_job(eng: engine.Engine, batch_rig: BatchRig) -> None:
    running = asyncio.ensure_future(eng.run(tasks.gang_sleeps.override(offload="aws"), 60.0))
    await until(lambda: len(batch_rig.processes()) == 3, "the three nodes to start")
    running.cancel()
    with pytest.raises((asyncio.CancelledError, engine.EngineError)):
        await running
    await until(lambda: not batch_rig.processes(), "every node to be stopped")
    assert batch_rig.calls()["TerminateJob"] == 1


async def test_a_gang_of_an_existing_job_definition_runs_its_container(batch_env: str, batch_rig: BatchRig) -> None:
    batch = batch_rig.client("batch")
    name = f"mine-{batch_env}"
    batch.register_job_definition(
        jobDefinitionName=name,
        type="container",
        containerProperties={"image": "shoal-test:1", "vcpus": 1, "memory": 512, "command": ["true"]},
    )
    batch_rig.reset()
    target = offload.Batch(QUEUE, job_definition=name, python=PYTHON, poll_interval=POLL, master_port=free_port())
    async with engine.Engine(targets={"aws": target}, blob_store=f"s3://{batch_env}/b") as eng:
        run = await eng.run(tasks.gang_sum.override(offload="aws", nodes=2), 5)
        (attempt,) = await attempts_of(eng, run.id)
    assert run.result == {"rank": 0, "total": 5 * (1 + 2)}
    assert batch_rig.calls()["RegisterJobDefinition"] == 1
    (job,) = batch.describe_jobs(jobs=[attempt.where])["jobs"]
    (definition,) = batch.describe_job_definitions(jobDefinitions=[job["jobDefinition"]])["jobDefinitions"]
    assert definition["type"] == "multinode" and definition["nodeProperties"]["numNodes"] == 2
    containers = [r["container"] for r in definition["nodeProperties"]["nodeRangeProperties"]]
    assert [r["targetNodes"] for r in definition["nodeProperties"]["nodeRangeProperties"]] == ["0", "1:"]
    assert all(c["image"] == "shoal-test:1" and c["command"] == ["true"] for c in containers)


# -- bad input ----------------------------------------------------------------------------


async def test_more_ranks_than_a_multi_node_job_allows_fails_at_once(eng: engine.Engine, batch_rig: BatchRig) -> None:
    error = await failure(eng, tasks.gang_sleeps.override(offload="aws", nodes=1001), 0.1)
    assert isinstance(error, engine.ResourceError)
    assert "nodes=1001" in str(error) and "at most 1000 nodes" in str(error)
    assert "SubmitJob" not in batch_rig.calls()


async def test_ranks_per_host_other_than_one_is_refused_on_batch(eng: engine.Engine, batch_rig: BatchRig) -> None:
    error = await failure(eng, tasks.gang_sleeps.override(offload="aws", ranks_per_host=2), 0.1)
    assert isinstance(error, engine.ResourceError)
    assert "ranks_per_host=2 has no meaning on AWS Batch" in str(error) and "one rank per node" in str(error)
    assert "SubmitJob" not in batch_rig.calls()
    # ranks_per_host=1 is what Batch does anyway.
    run = await eng.run(tasks.gang_sleeps.override(offload="aws", ranks_per_host=1, nodes=2), 0.1)
    assert run.result == 100


@pytest.mark.parametrize("port", [0, 70000, "29500"])
def test_master_port_must_be_a_tcp_port(port: Any) -> None:
    with pytest.raises(engine.ConfigError, match="master_port must be a TCP port"):
        offload.Batch(QUEUE, image="x", master_port=port)


# -- re-attach after the driving process died -----------------------------------------

FLOW = """\
import sys
import engine, offload

aws = offload.Batch("{queue}", image="shoal-test:1", python={python!r}, poll_interval=0.2, master_port={port})


@engine.task(offload=aws, retries=0, nodes=3)
async def gang(seconds: float) -> int:
    import asyncio
    me = engine.cluster()
    print("rank", me.rank, "started", flush=True)
    await asyncio.sleep(seconds)
    return 100 + me.rank


@engine.task
async def root() -> int:
    return await gang(3.0)


if __name__ == "__main__":
    run = engine.resume(sys.argv[1]) if len(sys.argv) > 1 else engine.run(root)
    print("RESULT", run.status, run.result, flush=True)
"""


def test_a_killed_driver_is_resumed_and_reattaches_to_its_running_gang(
    tmp_path: Path, batch_env: str, batch_rig: BatchRig
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    flow = project / "flow.py"
    flow.write_text(FLOW.format(queue=QUEUE, python=PYTHON, port=free_port()))
    env = {**os.environ, "SHOAL_BLOB_STORE": f"s3://{batch_env}/blobs", "SHOAL_HOME": str(tmp_path / "home")}
    nodes, resumed = kill_driver_then_resume(batch_rig, flow, env, tmp_path / "home", jobs=3)
    # The gang runs on without its driver, one job per node.
    assert [n.rpartition("#")[2] for n in nodes] == ["0", "1", "2"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "RESULT succeeded 100" in resumed.stdout
    assert batch_rig.calls()["SubmitJob"] == 1  # waited for, never submitted twice
