"""What an AWS Batch job of ``offload.Batch`` looks like: its name, resources and job definition.

Pure functions and small records, kept apart from the backend's traffic
with AWS (``_batch``): a job definition per (image, resources, python,
role, environment) is named ``shoal-<hash>`` of those, so that two engines
(or two runs) find the same one instead of registering another.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Mapping

    from engine.extend import AttemptHooks, Handle, Payload

__all__ = ["DEFAULT_MEMORY_MIB", "Submit", "Watch", "definition", "job_name", "requirements_of"]

#: Memory (MiB) of a job whose task names none.
DEFAULT_MEMORY_MIB: Final = 2048
MiB: Final = 1 << 20


def definition(
    image: str | None, requirements: list[dict[str, str]], python: str, role: str | None, env: Mapping[str, str]
) -> tuple[str, dict[str, Any]]:
    """(name, ``containerProperties``) of the job definition for these settings."""
    spec = repr((image, requirements, python, role, sorted(env.items())))
    name = "shoal-" + hashlib.sha256(spec.encode()).hexdigest()[:20]
    properties: dict[str, Any] = {
        "image": image,
        "command": [python, "-m", "offload.worker", "--batch"],
        "resourceRequirements": requirements,
    }
    if role:
        properties["jobRoleArn"] = role
    if env:
        properties["environment"] = [{"name": k, "value": v} for k, v in sorted(env.items())]
    return name, properties





class Submit:
    """A submit waiting to go out in the next (array) job."""

    __slots__ = ("cancelled", "future", "hooks", "payload")

    def __init__(self, payload: Payload, hooks: AttemptHooks, future: asyncio.Future[Handle]) -> None:
        self.payload = payload
        self.hooks = hooks
        self.future = future
        #: The submitting action was cancelled while this waited to go out.
        self.cancelled = False


class Watch:
    """A submitted job being polled for.

    For a multi-node job (a gang) ``nodes`` is its node count, and ``lost``
    the description of the first node job seen failed while the job still
    ran (a rank that died or lost its node without an outcome).
    """

    __slots__ = ("future", "job_id", "lost", "nodes")

    def __init__(self, job_id: str, future: asyncio.Future[dict[str, Any]], nodes: int = 0) -> None:
        self.job_id = job_id
        self.future = future
        self.nodes = nodes
        self.lost: dict[str, Any] | None = None


def requirements_of(payload: Payload) -> list[dict[str, str]]:
    """``resourceRequirements`` for a payload's ``Resources`` (vCPUs, memory in MiB, GPUs)."""
    vcpus = max(1, math.ceil(payload.cpu)) if payload.cpu else 1
    memory = math.ceil(payload.memory / MiB) if payload.memory else DEFAULT_MEMORY_MIB
    found = [{"type": "VCPU", "value": str(vcpus)}, {"type": "MEMORY", "value": str(max(memory, 4))}]
    if payload.gpu:
        found.append({"type": "GPU", "value": str(payload.gpu)})
    return found


def job_name(task: str) -> str:
    """A job name AWS accepts (letters, digits, - and _, at most 128) that says which task."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", task).strip("-") or "task"
    return f"shoal-{name}"[:128]
