"""Gang tasks that the AWS Batch gang tests send to multi-node jobs (imported there from the code bundle).

The target is given per test (``task.override(offload=...)``); each rank
prints what it was told, so that every rank's view comes back in its output.
"""

from __future__ import annotations

import asyncio
import json
import os

import engine
from _gang_tasks import socket_allreduce

#: The variables each rank reports.
VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@engine.task(nodes=3, retries=0)
def gang_sum(base: int) -> dict[str, object]:
    """Every rank adds ``base * (rank + 1)`` over TCP to rank 0 and prints its view; each returns the sum."""
    me = engine.cluster()
    total = socket_allreduce(base * (me.rank + 1))
    seen = {
        "rank": me.rank,
        "world_size": me.world_size,
        "local_rank": me.local_rank,
        "local_world_size": me.local_world_size,
        "master_addr": me.master_addr,
        "master_port": me.master_port,
        "hosts": list(me.hosts),
        "env": {k: os.environ.get(k) for k in VARIABLES},
        "node": os.environ.get("AWS_BATCH_JOB_NODE_INDEX"),
        "total": total,
    }
    print("VIEW " + json.dumps(seen), flush=True)  # noqa: T201 - output to capture
    return {"rank": me.rank, "total": total}


@engine.task(nodes=3, retries=0)
async def gang_fails_on(bad: int) -> int:
    """Rank ``bad`` raises at once; the others would sleep for five minutes."""
    me = engine.cluster()
    print(f"rank {me.rank} started", flush=True)  # noqa: T201 - output to capture
    if me.rank == bad:
        raise ValueError(f"rank {me.rank} gives up")
    await asyncio.sleep(300)
    return me.rank


@engine.task(nodes=3, retries=0)
async def gang_sleeps(seconds: float) -> int:
    """Every rank sleeps ``seconds``; rank 0 returns 100, the others their rank."""
    me = engine.cluster()
    print(f"rank {me.rank} sleeps", flush=True)  # noqa: T201 - output to capture
    await asyncio.sleep(seconds)
    return 100 if me.rank == 0 else me.rank
