"""The AWS Batch rig: a moto server in a process of its own whose jobs really run (see ``_batch_rig``).

Import the fixtures into a test module::

    from _moto_batch import batch_rig, batch_env  # noqa: F401

``batch_rig`` (one per session) starts the server, creates an IAM role, an
unmanaged compute environment and the job queue :data:`QUEUE`, and stops
the server by its pid at the end.  ``batch_env`` gives a test the AWS
environment of the rig (keys ``testing``, region ``us-east-1``, nothing
from this machine) and a fresh bucket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

REGION = "us-east-1"
KEY = "testing"
QUEUE = "shoal-queue"
#: The folder of the tests: jobs find the tasks of the test modules through it.
TESTS = Path(__file__).resolve().parent
#: What a job's interpreter is: this one (the rig does not pull images).
PYTHON = sys.executable


@dataclass
class BatchRig:
    endpoint: str
    pid: int

    def _control(self, what: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.endpoint}/_rig/{what}", data=data, method="GET" if data is None else "POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def calls(self) -> dict[str, int]:
        """Requests counted by operation since the last :meth:`reset`."""
        counts: dict[str, int] = self._control("calls")
        return counts

    def reset(self) -> None:
        """Forget counted calls and faults."""
        self._control("reset", {})

    def fault(self, operation: str, *, status: int = 429, code: str = "TooManyRequestsException", times: int = 1) -> None:
        """Make the next ``times`` calls of ``operation`` fail with ``status``/``code``."""
        self._control("fault", {"operation": operation, "status": status, "code": code, "times": times})

    def processes(self) -> dict[str, int]:
        """Pids of the job processes running now, by job id."""
        found: dict[str, int] = self._control("processes")
        return found

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=KEY,
            aws_secret_access_key=KEY,
        )


def start_rig(scratch: str, slots: int = 4) -> tuple[subprocess.Popen[str], BatchRig]:
    """Start the rig's server and create its queue (for the fixture and the benchmark)."""
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "_batch_rig.py"), "--slots", str(slots), "--scratch", scratch],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the Batch rig did not start: {line!r}")
    rig = BatchRig(f"http://127.0.0.1:{int(line.split()[1])}", proc.pid)
    iam = rig.client("iam")
    role = iam.create_role(RoleName="shoal-batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    batch = rig.client("batch")
    env = batch.create_compute_environment(
        computeEnvironmentName="shoal-ce", type="UNMANAGED", state="ENABLED", serviceRole=role
    )
    batch.create_job_queue(
        jobQueueName=QUEUE,
        state="ENABLED",
        priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": env["computeEnvironmentArn"]}],
    )
    rig.reset()
    return proc, rig


def _pythonpath() -> str:
    path = os.environ.get("PYTHONPATH")
    return str(TESTS) + (os.pathsep + path if path else "")


@pytest.fixture(scope="session")
def batch_rig() -> Iterator[BatchRig]:
    with tempfile.TemporaryDirectory(prefix="shoal-batch-rig-") as scratch:
        proc, rig = start_rig(scratch)
        try:
            yield rig
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def batch_env(batch_rig: BatchRig, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The rig's AWS environment for this test, and a fresh bucket: its name."""
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", batch_rig.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("PYTHONPATH", _pythonpath())
    bucket = f"shoal-{uuid.uuid4().hex[:12]}"
    s3 = batch_rig.client("s3")
    s3.create_bucket(Bucket=bucket)
    batch_rig.reset()
    try:
        yield bucket
    finally:
        batch_rig.reset()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", ()):
                s3.delete_object(Bucket=bucket, Key=item["Key"])
        s3.close()


def kill_driver_then_resume(
    rig: BatchRig, flow: Path, env: dict[str, str], home: Path, *, jobs: int
) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """Run ``flow`` until ``jobs`` of its Batch jobs run, SIGKILL it, and resume its run in a new driver.

    Returns the jobs that ran on without their driver, and the resumed
    driver's outcome (a flow prints what ``engine.run``/``engine.resume``
    returned; ``flow RUN_ID`` resumes).
    """
    import time

    driver = subprocess.Popen([sys.executable, str(flow)], cwd=flow.parent, env=env, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while len(rig.processes()) < jobs:
            assert driver.poll() is None and time.monotonic() < deadline, "the jobs never started"
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        assert driver.stdout is not None
        driver.stdout.close()
    assert driver.returncode == -signal.SIGKILL
    running = sorted(rig.processes())
    probe = subprocess.run(
        [sys.executable, "-c", "import engine; print(engine.runs()[0].id)"],
        env={**os.environ, "SHOAL_HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    )
    resumed = subprocess.run(
        [sys.executable, str(flow), probe.stdout.strip()],
        cwd=flow.parent, env=env, capture_output=True, text=True, timeout=60,
    )
    return running, resumed

