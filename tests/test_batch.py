"""offload.Batch against a real moto server whose Batch jobs really run (see ``_batch_rig``).

Each job is a fresh ``python -m offload.worker --batch ...`` process with
its own HOME and TMPDIR and no access to the tests' folder: the code bundle,
the payload and the result really travel through S3.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

import pytest

import _batch_tasks as tasks
import engine
import offload
from _moto_batch import PYTHON, QUEUE, BatchRig, batch_env, batch_rig, kill_driver_then_resume

__all__ = ["batch_env", "batch_rig"]  # fixtures used by name

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

#: Jobs here take about a second each; poll often so that tests do not wait on the poller.
POLL = 0.2


def aws(**options: Any) -> offload.Batch:
    options.setdefault("image", "shoal-test:1")
    return offload.Batch(QUEUE, python=PYTHON, poll_interval=POLL, **options)


@pytest.fixture
async def eng(batch_env: str) -> AsyncIterator[engine.Engine]:
    async with engine.Engine(targets={"aws": aws()}, blob_store=f"s3://{batch_env}/blobs") as e:
        yield e


async def attempts_of(eng: engine.Engine, run_id: str) -> list[Any]:
    details = await eng.get_run(run_id, actions=True)
    return [a for action in details.action_records if action.task != "root" for a in action.attempts]


async def failure(eng: engine.Engine, task: Any, *args: Any) -> BaseException | None:
    """The exception a run of ``task`` failed with (the cause of its RunFailed)."""
    run = await eng.run(task, *args)
    assert run.status == "failed", run.status
    with pytest.raises(engine.RunFailed) as info:
        run.result  # noqa: B018 - reading it raises
    return info.value.__cause__


async def until(check: Any, what: str, seconds: float = 30.0) -> Any:
    for _ in range(int(seconds / 0.05)):
        found = await asyncio.to_thread(check)
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- one call, a fan-out, errors, logs ----------------------------------------------


async def test_one_offloaded_call_runs_as_a_plain_batch_job(batch_env: str, batch_rig: BatchRig) -> None:
    async with engine.Engine(targets={"aws": aws(image=f"shoal-test:{batch_env}")}, blob_store=f"s3://{batch_env}/b") as eng:
        run = await eng.run(tasks.where)
        attempts = await attempts_of(eng, run.id)
    seen = run.result
    # It ran in a job of its own: not an array child, in a fresh HOME.
    assert seen["AWS_BATCH_JOB_ID"] and ":" not in seen["AWS_BATCH_JOB_ID"]
    assert seen["AWS_BATCH_JOB_ARRAY_INDEX"] == ""
    assert seen["HOME"] != os.environ.get("HOME")
    calls = batch_rig.calls()
    assert calls["SubmitJob"] == 1 and calls["RegisterJobDefinition"] == 1
    # The journal says where the attempt ran: its job id.
    (attempt,) = attempts
    assert attempt.backend == "batch" and attempt.target == "aws" and attempt.state == "succeeded"
    assert attempt.where == seen["AWS_BATCH_JOB_ID"]


async def test_a_map_goes_out_as_one_array_job_and_comes_back_in_order(
    batch_env: str, batch_rig: BatchRig
) -> None:
    @engine.task
    async def root(n: int) -> list[int]:
        return [x async for x in engine.map(tasks.square, range(n))]

    target = aws()
    async with engine.Engine(targets={"aws": target}, blob_store=f"s3://{batch_env}/b") as eng:
        run = await eng.run(root, 8)
        attempts = await attempts_of(eng, run.id)
        rounds = target._rounds
    assert run.result == [x * x for x in range(8)]
    calls = batch_rig.calls()
    assert calls["SubmitJob"] == 1
    # Polled through the array's parent: one DescribeJobs a round, not one per child.
    assert 0 < calls["DescribeJobs"] <= rounds
    wheres = sorted(a.where for a in attempts)
    parent = wheres[0].split(":")[0]
    assert wheres == sorted(f"{parent}:{i}" for i in range(8))


@pytest.mark.slow
async def test_a_map_of_fifty_takes_a_handful_of_submits(eng: engine.Engine, batch_rig: BatchRig) -> None:
    @engine.task
    async def root(n: int) -> list[int]:
        return [x async for x in engine.map(tasks.square, range(n))]

    run = await eng.run(root, 50)
    assert run.result == [x * x for x in range(50)]
    assert batch_rig.calls()["SubmitJob"] <= 3


@pytest.mark.slow
async def test_max_array_size_splits_a_fan_out_and_array_false_sends_plain_jobs(
    batch_env: str, batch_rig: BatchRig
) -> None:
    @engine.task
    async def root(n: int) -> list[int]:
        calls: list[Any] = [tasks.square(i) for i in range(n)]  # awaitable inside a task
        return list(await asyncio.gather(*calls))

    async with engine.Engine(targets={"aws": aws(max_array_size=2)}, blob_store=f"s3://{batch_env}/b") as eng:
        assert (await eng.run(root, 4)).result == [0, 1, 4, 9]
    assert batch_rig.calls()["SubmitJob"] == 2
    batch_rig.reset()
    async with engine.Engine(targets={"aws": aws(array=False)}, blob_store=f"s3://{batch_env}/b") as eng:
        assert (await eng.run(root, 2)).result == [0, 1]
    assert batch_rig.calls()["SubmitJob"] == 2


async def test_a_task_exception_comes_back_as_its_own_type_with_the_remote_traceback(
    eng: engine.Engine,
) -> None:
    error = await failure(eng, tasks.unlucky, 3)
    assert isinstance(error, tasks.Unlucky) and str(error) == "no luck with 3"
    assert "raise Unlucky" in str(error.__cause__)


async def test_a_job_that_dies_without_a_result_says_its_exit_code_and_log(eng: engine.Engine) -> None:
    error = await failure(eng, tasks.die, 3)
    assert isinstance(error, engine.OffloadError) and not isinstance(error, engine.extend.InfrastructureError)
    message = str(error)
    assert "failed without a result" in message and "(exit code 3)" in message
    assert "about to die" in message  # the end of its CloudWatch log


async def test_a_timeout_stops_the_job_and_travels_as_attempt_duration(
    eng: engine.Engine, batch_rig: BatchRig
) -> None:
    error = await failure(eng, tasks.overdue)
    assert isinstance(error, engine.ActionTimeout)
    batch = batch_rig.client("batch")
    (summary,) = batch.list_jobs(jobQueue=QUEUE, filters=[{"name": "JOB_NAME", "values": ["shoal-overdue"]}])["jobSummaryList"]
    (job,) = batch.describe_jobs(jobs=[summary["jobId"]])["jobs"]
    assert job["timeout"] == {"attemptDurationSeconds": 60}  # AWS's floor, so it holds without us
    await until(lambda: not batch_rig.processes(), "the job to be stopped")


async def test_an_existing_job_definition_is_used_as_it_is(batch_env: str, batch_rig: BatchRig) -> None:
    batch = batch_rig.client("batch")
    batch.register_job_definition(
        jobDefinitionName=f"mine-{batch_env}",
        type="container",
        containerProperties={"image": "shoal-test:1", "vcpus": 1, "memory": 512, "command": ["true"]},
    )
    batch_rig.reset()
    target = offload.Batch(QUEUE, job_definition=f"mine-{batch_env}", python=PYTHON, poll_interval=POLL)
    async with engine.Engine(targets={"aws": target}, blob_store=f"s3://{batch_env}/b") as eng:
        assert (await eng.run(tasks.square, 6)).result == 36
    assert "RegisterJobDefinition" not in batch_rig.calls()


async def test_what_the_job_prints_is_captured_under_the_action(eng: engine.Engine) -> None:
    run = await eng.run(tasks.chatty, 5)
    assert run.result == 5
    journal = await eng.journal()
    lines = [(stream, text) for _, _, stream, text, _ in await journal.logs(run.id)]
    assert ("stdout", "hello 5 from a job") in lines
    assert ("stderr", "warning 5 on stderr") in lines


@pytest.mark.slow
async def test_a_large_argument_travels_through_s3(eng: engine.Engine) -> None:
    data = os.urandom(9 << 20)  # over the S3 store's multipart threshold
    assert (await eng.run(tasks.size_of, data)).result == len(data)


async def test_a_config_table_with_backend_batch_and_its_own_storage(
    tmp_path: Path, batch_env: str, batch_rig: BatchRig
) -> None:
    (tmp_path / "pyproject.toml").write_text(
        f"""
[tool.shoal.offload.aws]
backend = "batch"
job_queue = "{QUEUE}"
image = "shoal-test:1"
python = "{PYTHON}"
storage = "s3://{batch_env}/shoal"
endpoint_url = "{batch_rig.endpoint}"
region = "us-east-1"
poll_interval = {POLL}
env = {{ GREETING = "hi" }}
"""
    )
    # The engine's blob store is local: storage= is where the jobs' objects go.
    async with engine.Engine(blob_store=str(tmp_path / "blobs")) as eng:
        assert (await eng.run(tasks.square, 3)).result == 9
    keys = [o["Key"] for o in batch_rig.client("s3").list_objects_v2(Bucket=batch_env)["Contents"]]
    assert any(k.startswith("shoal/batch/results/") for k in keys), keys


async def test_throttled_calls_are_retried(eng: engine.Engine, batch_rig: BatchRig) -> None:
    batch_rig.fault("SubmitJob", times=2)
    batch_rig.fault("DescribeJobs", times=2)
    assert (await eng.run(tasks.square, 4)).result == 16
    assert batch_rig.calls()["SubmitJob"] == 3


async def test_a_poll_round_that_fails_through_its_retries_does_not_fail_the_wait(
    batch_env: str, batch_rig: BatchRig
) -> None:
    async def quick(seconds: float) -> None:  # backoff without the wait
        await asyncio.sleep(min(seconds, 0.05))

    async with engine.Engine(targets={"aws": aws()}, blob_store=f"s3://{batch_env}/b", sleep=quick) as eng:
        batch_rig.fault("DescribeJobs", status=503, code="ServiceUnavailable", times=10)
        assert (await eng.run(tasks.square, 5)).result == 25
    assert batch_rig.calls()["DescribeJobs"] > 10


@pytest.mark.slow
async def test_the_job_definition_is_registered_once_across_runs(batch_env: str, batch_rig: BatchRig) -> None:
    image = f"shoal-test:{batch_env}"  # an image no other test used
    for _ in range(2):
        async with engine.Engine(targets={"aws": aws(image=image)}, blob_store=f"s3://{batch_env}/b") as eng:
            assert (await eng.run(tasks.square, 3)).result == 9
    calls = batch_rig.calls()
    assert calls["RegisterJobDefinition"] == 1 and calls["DescribeJobDefinitions"] == 2
    assert calls["SubmitJob"] == 2


# -- spot reclaims, cancel ----------------------------------------------------------


async def test_a_spot_reclaim_is_retried_and_the_run_succeeds(eng: engine.Engine, batch_rig: BatchRig) -> None:
    running = asyncio.ensure_future(eng.run(tasks.slow, 2.0))
    job_id = await until(lambda: next(iter(batch_rig.processes()), None), "the job to start")
    batch_rig.client("batch").terminate_job(jobId=job_id, reason="Host EC2 (instance i-0123456789abcdef0) terminated.")
    run = await running
    assert run.result == 2.0
    assert batch_rig.calls()["SubmitJob"] == 2
    states = [(a.attempt, a.state) for a in await attempts_of(eng, run.id)]
    assert states == [(1, "lost"), (1, "succeeded")]


async def test_cancelling_a_run_terminates_its_job(eng: engine.Engine, batch_rig: BatchRig) -> None:
    running = asyncio.ensure_future(eng.run(tasks.slow, 60.0))
    job_id = await until(lambda: next(iter(batch_rig.processes()), None), "the job to start")
    running.cancel()
    with pytest.raises((asyncio.CancelledError, engine.EngineError)):
        await running
    await until(lambda: job_id not in batch_rig.processes(), "the job's process to be killed")
    (job,) = batch_rig.client("batch").describe_jobs(jobs=[job_id])["jobs"]
    assert job["status"] == "FAILED" and "cancelled" in job["statusReason"]
    assert batch_rig.calls()["TerminateJob"] == 1


async def test_cancelling_a_whole_fan_out_terminates_its_array_job_in_one_call(
    eng: engine.Engine, batch_rig: BatchRig
) -> None:
    @engine.task
    async def root(n: int) -> list[float]:
        calls: list[Any] = [tasks.slow(60.0 + i) for i in range(n)]
        return list(await asyncio.gather(*calls))

    running = asyncio.ensure_future(eng.run(root, 3))
    await until(lambda: len(batch_rig.processes()) == 3, "the array's children to start")
    running.cancel()
    with pytest.raises((asyncio.CancelledError, engine.EngineError)):
        await running
    await until(lambda: not batch_rig.processes(), "every child's process to be killed")
    assert batch_rig.calls()["TerminateJob"] == 1


async def test_closing_the_engine_leaves_no_job_running(batch_env: str, batch_rig: BatchRig) -> None:
    async with engine.Engine(targets={"aws": aws()}, blob_store=f"s3://{batch_env}/b") as eng:
        await eng.submit(tasks.slow, 60.0)
        await until(lambda: batch_rig.processes(), "the job to start")
    await until(lambda: not batch_rig.processes(), "every job to be stopped")


# -- re-attach after the driving process died -----------------------------------------

FLOW = """\
import sys
import engine, offload

aws = offload.Batch("{queue}", image="shoal-test:1", python={python!r}, poll_interval=0.2)


@engine.task(offload=aws, retries=0)
async def slow(seconds: float) -> float:
    import asyncio
    print("job started", flush=True)
    await asyncio.sleep(seconds)
    return seconds * 2


@engine.task
async def root() -> float:
    return await slow(3.0)


if __name__ == "__main__":
    run = engine.resume(sys.argv[1]) if len(sys.argv) > 1 else engine.run(root)
    print("RESULT", run.status, run.result, flush=True)
"""


def test_a_killed_driver_is_resumed_and_reattaches_to_its_running_job(
    tmp_path: Path, batch_env: str, batch_rig: BatchRig
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    flow = project / "flow.py"
    flow.write_text(FLOW.format(queue=QUEUE, python=PYTHON))
    env = {**os.environ, "SHOAL_BLOB_STORE": f"s3://{batch_env}/blobs", "SHOAL_HOME": str(tmp_path / "home")}
    running, resumed = kill_driver_then_resume(batch_rig, flow, env, tmp_path / "home", jobs=1)
    assert len(running) == 1  # the job runs on without its driver
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "RESULT succeeded 6.0" in resumed.stdout
    calls = batch_rig.calls()
    assert calls["SubmitJob"] == 1, calls  # waited for, never submitted twice


# -- bad input ----------------------------------------------------------------------------


def test_a_batch_target_needs_a_job_queue_and_an_image_or_job_definition() -> None:
    with pytest.raises(engine.ConfigError, match="needs a job_queue"):
        offload.Batch("", image="x")
    with pytest.raises(engine.ConfigError, match=r"image= .* or job_definition="):
        offload.Batch("q")
    with pytest.raises(engine.ConfigError, match="not an S3 URI"):
        offload.Batch("q", image="x", storage="/tmp/here")


async def test_a_local_blob_store_and_no_storage_says_what_to_set(batch_env: str, tmp_path: Path) -> None:
    async with engine.Engine(targets={"aws": aws()}, blob_store=str(tmp_path / "blobs")) as eng:
        error = await failure(eng, tasks.square, 2)
    assert isinstance(error, engine.ConfigError) and "storage='s3://bucket/prefix'" in str(error)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"queue": "no-such-queue"}, "job queue 'no-such-queue' does not exist"),
        ({"job_definition": "no-such-definition", "image": None}, "job definition 'no-such-definition' .*does not exist"),
        ({"storage": "s3://no-such-bucket-here/p"}, "bucket 'no-such-bucket-here' does not exist"),
    ],
)
async def test_what_does_not_exist_is_named(batch_env: str, options: dict[str, Any], message: str) -> None:
    queue = options.pop("queue", QUEUE)
    target = offload.Batch(queue, python=PYTHON, poll_interval=POLL, **{"image": "shoal-test:1", **options})
    async with engine.Engine(targets={"aws": target}, blob_store=f"s3://{batch_env}/b") as eng:
        error = await failure(eng, tasks.square, 2)
    assert isinstance(error, engine.OffloadError)
    assert __import__("re").search(message, str(error)), str(error)


async def test_no_credentials_is_a_clear_error(batch_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with engine.Engine(targets={"aws": aws(storage=f"s3://{batch_env}/p")}, store="memory") as eng:
        error = await failure(eng, tasks.square, 2)
    assert isinstance(error, engine.OffloadError) and "no AWS credentials" in str(error)


async def test_an_image_that_cannot_be_pulled_fails_with_the_status_reason(batch_env: str) -> None:
    async with engine.Engine(targets={"aws": aws(image="missing/app:1")}, blob_store=f"s3://{batch_env}/b") as eng:
        error = await failure(eng, tasks.square, 2)
    assert isinstance(error, engine.OffloadError) and not isinstance(error, engine.extend.InfrastructureError)
    assert "failed without a result: CannotPullContainerError" in str(error)
