"""A moto server whose AWS Batch jobs really run, as local processes: ``python _batch_rig.py``.

Started by the ``batch_rig`` fixture (:mod:`_moto_batch`) in a process of
its own, it prints ``READY <port>`` once moto listens on 127.0.0.1.  In
that process:

- ``moto.batch.models.Job.run`` is replaced by :func:`run_job`, which walks
  a job through SUBMITTED -> PENDING -> RUNNABLE -> STARTING -> RUNNING ->
  SUCCEEDED | FAILED and runs its container command (the image is not
  pulled: the command runs on this machine's Python) as a local process in
  a process group of its own, with a fresh HOME and TMPDIR, the job's
  environment plus ``AWS_BATCH_JOB_ID``, ``AWS_BATCH_JOB_ATTEMPT``,
  ``AWS_BATCH_JOB_ARRAY_INDEX`` (array children) and ``AWS_ENDPOINT_URL``
  (this server).  At most ``--slots`` jobs run at once; the others wait in
  RUNNABLE, as on a real queue.  ``terminate_job`` kills the process group
  and fails the job with the reason given (how a test injects a spot
  reclaim), and terminating an array job terminates its children, as on
  AWS; ``attemptDurationSeconds`` kills it too.  What the job printed
  goes to CloudWatch Logs (``/aws/batch/job``) under its ``logStreamName``.
- An image whose name starts with ``missing/`` fails the job without
  running it, as AWS does when it cannot pull the image
  (``CannotPullContainerError``): moto has no registry to ask.
- Every request is counted by operation (``SubmitJob``, ``DescribeJobs``...),
  and chosen operations can be made to fail (throttling, 5xx).
- Control endpoints under ``/_rig/``: ``GET calls`` (counts), ``POST reset``,
  ``POST fault`` (``{"operation", "status", "code", "times"}``), ``GET
  processes`` (pids of running jobs).

Moto, and every job, die with the process that started this one
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from typing import Any

PR_SET_PDEATHSIG = 1
#: Batch operations by the REST path botocore sends them to.
OPERATIONS = {
    "/v1/submitjob": "SubmitJob",
    "/v1/describejobs": "DescribeJobs",
    "/v1/listjobs": "ListJobs",
    "/v1/terminatejob": "TerminateJob",
    "/v1/canceljob": "CancelJob",
    "/v1/registerjobdefinition": "RegisterJobDefinition",
    "/v1/describejobdefinitions": "DescribeJobDefinitions",
    "/v1/describejobqueues": "DescribeJobQueues",
}


def die_with_parent() -> None:
    """In a child, before exec: get SIGKILL when the process that started it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Rig:
    def __init__(self, slots: int, scratch: str) -> None:
        self.slots = threading.BoundedSemaphore(slots)
        self.scratch = scratch
        self.endpoint = ""
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        # operation -> [status, code, times left (-1: always)]
        self.faults: dict[str, list[Any]] = {}
        self.processes: dict[str, int] = {}

    # -- WSGI -----------------------------------------------------------------

    def wrap(self, app: Any) -> Any:
        def middleware(environ: dict[str, Any], start_response: Any) -> Any:
            path = environ.get("PATH_INFO", "")
            if path.startswith("/_rig/"):
                return self.control(path[len("/_rig/") :], environ, start_response)
            target = environ.get("HTTP_X_AMZ_TARGET", "")
            operation = OPERATIONS.get(path) or (target.rpartition(".")[2] if target else "")
            if not operation:
                operation = f"{environ.get('REQUEST_METHOD')} {path.split('/')[1] if '/' in path else path}"
            with self.lock:
                self.calls[operation] = self.calls.get(operation, 0) + 1
                fault = self.faults.get(operation)
                if fault is not None and fault[2] != 0:
                    fault[2] -= 1
                else:
                    fault = None
            if fault is None:
                return app(environ, start_response)
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if length:
                environ["wsgi.input"].read(length)
            status, code = fault[0], fault[1]
            body = json.dumps({"__type": code, "message": f"injected {code}"}).encode()
            start_response(
                f"{status} Injected",
                [
                    ("Content-Type", "application/json"),
                    ("x-amzn-ErrorType", code),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]

        return middleware

    def control(self, what: str, environ: dict[str, Any], start_response: Any) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = json.loads(environ["wsgi.input"].read(length) or b"{}") if length else {}
        with self.lock:
            if what == "calls":
                answer: Any = dict(self.calls)
            elif what == "reset":
                self.calls.clear()
                self.faults.clear()
                answer = {}
            elif what == "fault":
                self.faults[body["operation"]] = [body["status"], body["code"], body.get("times", 1)]
                answer = {}
            elif what == "processes":
                answer = dict(self.processes)
            else:
                answer = {"error": f"unknown control {what}"}
        data = json.dumps(answer).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    # -- jobs -----------------------------------------------------------------

    def run_job(self, job: Any) -> None:
        """Replaces ``moto.batch.models.Job.run``: run the job's command for real."""
        try:
            self._run(job)
        except Exception as exc:  # a job must end, whatever went wrong here
            job.job_stopped_reason = f"rig error: {type(exc).__name__}: {exc}"
            job._mark_stopped(success=False)
        finally:
            self._settle_parent(job)

    def _run(self, job: Any) -> None:
        job.status = "PENDING"
        job.status = "RUNNABLE"
        with self.slots:
            if job.stop:
                job._mark_stopped(success=False)
                return
            job.status = "STARTING"
            job.job_started_at = datetime.now()
            job._start_attempt()
            props = job.job_definition.container_properties or {}
            image = props.get("image", "")
            if image.startswith("missing/"):
                job.job_stopped_reason = (
                    f"CannotPullContainerError: pull image manifest has been retried 5 time(s): "
                    f"failed to resolve ref {image}: not found"
                )
                job._mark_stopped(success=False)
                return
            job.status = "RUNNING"
            self._execute(job)

    def _execute(self, job: Any) -> None:
        command = list(job._get_container_property("command", []))
        env = {e["name"]: e["value"] for e in job._get_container_property("environment", [])}
        folder = tempfile.mkdtemp(prefix="job-", dir=self.scratch)
        home = os.path.join(folder, "home")
        tmp = os.path.join(folder, "tmp")
        os.makedirs(home)
        os.makedirs(tmp)
        env.update(
            {
                "PATH": os.environ["PATH"],
                "HOME": home,
                "TMPDIR": tmp,
                "AWS_BATCH_JOB_ID": job.job_id,
                "AWS_BATCH_JOB_ATTEMPT": "1",
                "AWS_BATCH_JQ_NAME": job.job_queue.name,
                "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
        index = (job.array_properties or {}).get("index")
        if index is not None:
            env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(index)
        limit = None
        for timeout in (job.timeout, job.job_definition.timeout):
            if timeout and timeout.get("attemptDurationSeconds"):
                limit = float(timeout["attemptDurationSeconds"])
                break
        out_path = os.path.join(folder, "output")
        started = time.monotonic()
        with open(out_path, "wb") as out:
            try:
                proc = subprocess.Popen(
                    command,
                    env=env,
                    cwd=folder,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            except OSError as exc:
                job.job_stopped_reason = f"CannotStartContainerError: {exc}"
                job._mark_stopped(success=False)
                return
            with self.lock:
                self.processes[job.job_id] = proc.pid
            timed_out = False
            while proc.poll() is None:
                if job.stop or (limit is not None and time.monotonic() - started > limit):
                    timed_out = not job.stop
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.02)
            with self.lock:
                self.processes.pop(job.job_id, None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what the job left running goes with it
        self._logs(job, out_path)
        shutil.rmtree(folder, ignore_errors=True)
        job.exit_code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        if timed_out:
            job.job_stopped_reason = "Job attempt duration exceeded timeout"
        elif proc.returncode != 0 and not job.stop:
            job.job_stopped_reason = "Essential container in task exited"
        job._mark_stopped(success=proc.returncode == 0 and not job.stop and not timed_out)

    def _logs(self, job: Any, path: str) -> None:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        job.log_stream_name = job._stream_name
        logs = job._log_backend
        logs.ensure_log_group(job._log_group)
        logs.ensure_log_stream(job._log_group, job.log_stream_name)
        now = int(time.time() * 1000)
        events = [{"timestamp": now, "message": line} for line in lines] or []
        if events:
            logs.put_log_events(job._log_group, job.log_stream_name, events)

    def _settle_parent(self, job: Any) -> None:
        """An array parent ends when its children have: FAILED if any failed (moto leaves it)."""
        job_id = job.job_id
        if ":" not in job_id:
            return
        parent = job.backend.get_job_by_id(job_id.split(":")[0])
        children = getattr(parent, "_child_jobs", None) if parent is not None else None
        if not children or not all(c.job_stopped for c in children):
            return
        if any(c.status == "FAILED" for c in children):
            parent.job_stopped = True
            parent.job_stopped_at = datetime.now()
            parent.status = "FAILED"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--scratch", required=True)
    args = parser.parse_args()
    # Die with the test process that started us, whatever it died of.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.batch import models
    from moto.moto_api import state_manager
    from moto.server import ThreadedMotoServer

    rig = Rig(args.slots, args.scratch)
    # Statuses change only when the runner sets them, never on being described.
    state_manager.set_transition("batch::job", {"progression": "manual", "times": 10**9})
    models.Job.run = lambda self: rig.run_job(self)  # type: ignore[method-assign]
    terminate = models.BatchBackend.terminate_job

    def terminate_job(backend: Any, job_id: str, reason: str) -> None:
        # AWS terminates an array job's children with it; moto stops only the parent.
        terminate(backend, job_id, reason)
        parent = backend.get_job_by_id(job_id)
        for child in getattr(parent, "_child_jobs", None) or ():
            child.terminate(reason)

    models.BatchBackend.terminate_job = terminate_job  # type: ignore[method-assign,assignment]
    details = models.Job._container_details

    def container_details(job: Any) -> dict[str, Any]:
        # AWS gives a stopped job's exit code in describe_jobs; moto 5.2 leaves it out.
        found: dict[str, Any] = details(job)
        if job.exit_code is not None:
            found["exitCode"] = job.exit_code
        return found

    models.Job._container_details = container_details  # type: ignore[method-assign,assignment]

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    rig.endpoint = f"http://{host}:{port}"
    wsgi = server._server
    assert wsgi is not None
    wsgi.app = rig.wrap(wsgi.app)
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
