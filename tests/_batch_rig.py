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
- Multi-node parallel jobs (a job definition of ``type="multinode"``) run
  one local process per node, the main node first, each with the job's
  node variables (``AWS_BATCH_JOB_NODE_INDEX``, ``AWS_BATCH_JOB_NUM_NODES``,
  ``AWS_BATCH_JOB_MAIN_NODE_INDEX``, and on the other nodes
  ``AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS``, this machine's
  address), its ``AWS_BATCH_JOB_ID`` being the node's ``JOBID#INDEX``, and
  the ``nodeOverrides`` of the submit applied (moto ignores them; and
  ``describe_job_definitions`` gives a multi-node definition's
  ``nodeProperties``, which moto leaves out).  Every
  node is a job of its own that ``describe_jobs`` knows (``JOBID#INDEX``,
  with ``nodeDetails`` and its own log stream) and ``terminate_job`` can
  stop; a job takes as many slots as it has nodes, all at once.  When the
  main node exits, the other nodes are stopped and the job's status is the
  main node's, as on AWS.
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
import socket
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
        self.slot_count = slots
        # Held while a multi-node job takes its slots: two jobs never hold part of them each.
        self.gang_lock = threading.Lock()
        # The nodeOverrides of the submit being handled in this thread (moto drops them).
        self.local = threading.local()
        #: What the main node of a multi-node job is reached at (AWS: its private IPv4).
        try:
            self.address = socket.gethostbyname(socket.gethostname())
        except OSError:
            self.address = "127.0.0.1"
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
        if job.job_definition.type == "multinode":
            self._run_nodes(job)
            return
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

    def _folder(self, job: Any, env: dict[str, str]) -> str:
        """A fresh folder for one job's process (its HOME and TMPDIR), and the job's variables in ``env``."""
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
        return folder

    def _execute(self, job: Any) -> None:
        command = list(job._get_container_property("command", []))
        env = {e["name"]: e["value"] for e in job._get_container_property("environment", [])}
        folder = self._folder(job, env)
        index = (job.array_properties or {}).get("index")
        if index is not None:
            env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(index)
        limit = _limit(job)
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

    # -- multi-node parallel jobs ---------------------------------------------

    def _run_nodes(self, job: Any) -> None:
        props = job.job_definition.node_properties or {}
        overrides = getattr(job, "node_overrides", None) or {}
        nodes = int(overrides.get("numNodes") or props.get("numNodes") or 1)
        main = int(props.get("mainNode", 0))
        if nodes > self.slot_count:
            job.job_stopped_reason = f"the rig's compute environment has {self.slot_count} nodes; the job asks for {nodes}"
            job._mark_stopped(success=False)
            return
        with self.gang_lock:
            for _ in range(nodes):
                self.slots.acquire()
        try:
            if job.stop:
                job._mark_stopped(success=False)
                return
            job.status = "STARTING"
            job.job_started_at = datetime.now()
            job._start_attempt()
            containers = [_node_container(props, overrides, i) for i in range(nodes)]
            image = containers[main].get("image", "")
            if image.startswith("missing/"):
                job.job_stopped_reason = f"CannotPullContainerError: failed to resolve ref {image}: not found"
                job._mark_stopped(success=False)
                return
            members = [self._node_job(job, i, main) for i in range(nodes)]
            job.status = "RUNNING"
            self._execute_nodes(job, members, containers, main)
        finally:
            for _ in range(nodes):
                self.slots.release()

    def _node_job(self, job: Any, index: int, main: int) -> Any:
        """Node ``index`` of a multi-node job, as a job of its own (``JOBID#INDEX``) that AWS describes."""
        from moto.batch import models

        node: Any = models.Job(
            job.job_name,
            job.job_definition,
            job.job_queue,
            job.backend,
            log_backend=job._log_backend,
            container_overrides=None,
            eks_properties_override=None,
            depends_on=None,
            parameters=None,
            all_jobs=job.all_jobs,
            timeout=job.timeout,
            array_properties={},
            provided_job_id=f"{job.job_id}#{index}",
        )
        node.job_queue.jobs.remove(node)  # listed through its job, not in the queue
        node.node_details = {"nodeIndex": index, "isMainNode": index == main}
        node.status = "PENDING"
        node.status = "RUNNABLE"
        node.status = "STARTING"
        node.job_started_at = datetime.now()
        node._start_attempt()
        job.all_jobs[node.job_id] = node
        return node

    def _execute_nodes(self, job: Any, members: list[Any], containers: list[dict[str, Any]], main: int) -> None:
        nodes = len(members)
        running: dict[int, tuple[subprocess.Popen[bytes], str, str, Any]] = {}
        order = [main] + [i for i in range(nodes) if i != main]  # the main node starts first
        for index in order:
            node, container = members[index], containers[index]
            env = {e["name"]: e["value"] for e in container.get("environment") or ()}
            folder = self._folder(node, env)
            env.update(
                {
                    "AWS_BATCH_JOB_NODE_INDEX": str(index),
                    "AWS_BATCH_JOB_NUM_NODES": str(nodes),
                    "AWS_BATCH_JOB_MAIN_NODE_INDEX": str(main),
                }
            )
            if index != main:
                env["AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"] = self.address
            out_path = os.path.join(folder, "output")
            out = open(out_path, "wb")  # noqa: SIM115 - closed when the node ends
            try:
                proc = subprocess.Popen(
                    list(container.get("command") or ()),
                    env=env,
                    cwd=folder,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            except OSError as exc:
                out.close()
                node.job_stopped_reason = job.job_stopped_reason = f"CannotStartContainerError: {exc}"
                break
            node.status = "RUNNING"
            running[index] = (proc, folder, out_path, out)
            with self.lock:
                self.processes[node.job_id] = proc.pid
        limit = _limit(job)
        started = time.monotonic()
        timed_out = False
        while main in running and running[main][0].poll() is None:
            if job.stop or (limit is not None and time.monotonic() - started > limit):
                timed_out = not job.stop
                break
            for index in [i for i in running if i != main]:
                proc = running[index][0]
                if members[index].stop and proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                if proc.poll() is not None:
                    self._end_node(members[index], *running.pop(index))
            time.sleep(0.02)
        # The main node has exited (or the job is stopped): AWS stops the other nodes.
        ended = running.pop(main, None)
        code = None
        if ended is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ended[0].pid, signal.SIGKILL)
            ended[0].wait()
            code = ended[0].returncode if ended[0].returncode >= 0 else 128 - ended[0].returncode
        if timed_out:
            job.job_stopped_reason = "Job attempt duration exceeded timeout"
        elif code != 0 and not job.stop:
            job.job_stopped_reason = job.job_stopped_reason or "Essential container in task exited"
        # The job's status is the main node's, set before the other nodes are seen stopped.
        job.exit_code = code
        job.log_stream_name = members[main]._stream_name
        if ended is not None:
            self._end_node(members[main], *ended)
        job._mark_stopped(success=code == 0 and not job.stop and not timed_out)
        for index in list(running):
            members[index].terminate(job.job_stopped_reason if job.stop else "the main node of its job exited")
            self._end_node(members[index], *running.pop(index))
        for node in members:
            node.job_stopped_reason = node.job_stopped_reason or job.job_stopped_reason
            node._mark_stopped(success=False)  # those that never ran

    def _end_node(self, node: Any, proc: subprocess.Popen[bytes], folder: str, out_path: str, out: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what the node left running goes with it
        proc.wait()
        out.close()
        with self.lock:
            self.processes.pop(node.job_id, None)
        self._logs(node, out_path)
        shutil.rmtree(folder, ignore_errors=True)
        node.exit_code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        if proc.returncode != 0 and not node.stop:
            node.job_stopped_reason = "Essential container in task exited"
        node._mark_stopped(success=proc.returncode == 0 and not node.stop)

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


def _limit(job: Any) -> float | None:
    """The job's ``attemptDurationSeconds``, from the submit or its definition."""
    for timeout in (job.timeout, job.job_definition.timeout):
        if timeout and timeout.get("attemptDurationSeconds"):
            return float(timeout["attemptDurationSeconds"])
    return None


def _covers(target: str, index: int, nodes: int) -> bool:
    """Whether a ``targetNodes`` range ("2", "0:", ":3", "1:4") covers node ``index``."""
    start, sep, end = str(target).partition(":")
    low = int(start) if start else 0
    high = (int(end) if end else nodes - 1) if sep else low
    return low <= index <= high


def _node_container(props: dict[str, Any], overrides: dict[str, Any], index: int) -> dict[str, Any]:
    """The container node ``index`` runs: its node range's, with the submit's node overrides."""
    nodes = int(overrides.get("numNodes") or props.get("numNodes") or 1)
    container: dict[str, Any] = {}
    for node_range in props.get("nodeRangeProperties") or ():
        if _covers(node_range.get("targetNodes", ""), index, nodes):
            container = dict(node_range.get("container") or {})
    for override in overrides.get("nodePropertyOverrides") or ():
        if _covers(override.get("targetNodes", ""), index, nodes):
            changes = override.get("containerOverrides") or {}
            if "command" in changes:
                container["command"] = changes["command"]
            if "environment" in changes:
                env = {e["name"]: e["value"] for e in container.get("environment") or ()}
                env.update({e["name"]: e["value"] for e in changes["environment"]})
                container["environment"] = [{"name": k, "value": v} for k, v in env.items()]
            if "resourceRequirements" in changes:
                container["resourceRequirements"] = changes["resourceRequirements"]
    return container


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
    from moto.batch import models, responses
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
    describe = models.Job.describe

    def describe_job(job: Any) -> dict[str, Any]:
        # A node of a multi-node job says which it is; a stopped one, its exit code.
        found: dict[str, Any] = describe(job)
        if getattr(job, "node_details", None):
            found["nodeDetails"] = job.node_details
        if job.job_definition.type == "multinode" and job.exit_code is not None:
            found.setdefault("container", {})["exitCode"] = job.exit_code
        return found

    models.Job.describe = describe_job  # type: ignore[method-assign,assignment]
    describe_definition = models.JobDefinition.describe

    def describe_job_definition(definition: Any) -> dict[str, Any]:
        # AWS describes a multi-node definition's nodes; moto 5.2 leaves them out.
        found: dict[str, Any] = describe_definition(definition)
        if definition.node_properties is not None:
            found["nodeProperties"] = definition.node_properties
        return found

    models.JobDefinition.describe = describe_job_definition  # type: ignore[method-assign,assignment]

    def describe_jobs(backend: Any, jobs: list[str] | None) -> list[dict[str, Any]]:
        # By id, from a copy: moto walks every job it has (and its dict of
        # jobs grows from the runner's threads, nodes of multi-node jobs).
        known = dict(backend._jobs)
        if not jobs:
            return [job.describe() for job in known.values()]
        arns = {job.arn: job for job in known.values()} if any(j.startswith("arn:") for j in jobs) else {}
        found = [known.get(j) or arns.get(j) for j in jobs]
        return [job.describe() for job in found if job is not None]

    models.BatchBackend.describe_jobs = describe_jobs  # type: ignore[method-assign,assignment]
    init = models.Job.__init__

    def job_init(job: Any, *args: Any, **kwargs: Any) -> None:
        init(job, *args, **kwargs)
        job.node_overrides = getattr(rig.local, "node_overrides", None)

    models.Job.__init__ = job_init  # type: ignore[method-assign,assignment]
    submit = responses.BatchResponse.submitjob

    def submit_job(handler: Any) -> str:
        # moto reads no nodeOverrides: kept for the job this request makes.
        rig.local.node_overrides = handler._get_param("nodeOverrides")
        try:
            answer: str = submit(handler)
        finally:
            rig.local.node_overrides = None
        return answer

    responses.BatchResponse.submitjob = submit_job  # type: ignore[method-assign,assignment]

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
