"""Tasks run as gangs (``nodes=``) by the gang tests of every backend.

Imported by name on the workers' side; the target is given per test
(``task.override(offload=...)``), so each task here says only what its
ranks do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import engine

if TYPE_CHECKING:
    from collections.abc import Callable

#: Seconds a rank keeps trying to reach rank 0 (which starts at the same time).
CONNECT_FOR = 30.0


def _mark(folder: str, name: str, text: str) -> None:
    """Write ``folder/name`` whole at once (a reader polling for it never sees it empty)."""
    where = Path(folder)
    where.mkdir(parents=True, exist_ok=True)
    part = where / f".{name}.part"
    part.write_text(text)
    part.rename(where / name)


async def _until(check: Callable[[], bool], every: float = 0.01) -> None:
    while True:
        if check():
            return
        await asyncio.sleep(every)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionError("the peer closed the connection")
        data += more
    return data


def socket_allreduce(value: int) -> int:
    """The sum of every rank's ``value``, over plain TCP to ``MASTER_ADDR:MASTER_PORT`` (no torch)."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank == 0:
        with socket.create_server(("", port), reuse_port=False) as server:
            server.settimeout(CONNECT_FOR)
            peers = [server.accept()[0] for _ in range(world - 1)]
            total = value + sum(int(struct.unpack(">q", _recv_exactly(p, 8))[0]) for p in peers)
            for peer in peers:
                peer.sendall(struct.pack(">q", total))
                peer.close()
            return int(total)
    deadline = time.monotonic() + CONNECT_FOR
    while True:
        try:
            sock = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with sock:
        sock.sendall(struct.pack(">q", value))
        (total,) = struct.unpack(">q", _recv_exactly(sock, 8))
        return int(total)


@engine.task(nodes=4)
def allreduce(base: int) -> dict[str, Any]:
    """Every rank adds ``base * (rank + 1)``; each returns the sum and what it was told."""
    me = engine.cluster()
    total = socket_allreduce(base * (me.rank + 1))
    print(f"rank {me.rank} of {me.world_size} summed {total}", flush=True)  # noqa: T201
    return {
        "total": total,
        "rank": me.rank,
        "cluster": {
            "rank": me.rank, "world_size": me.world_size, "local_rank": me.local_rank,
            "local_world_size": me.local_world_size, "master_addr": me.master_addr,
            "master_port": me.master_port, "hosts": list(me.hosts),
        },
        "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def _started(pids: str) -> tuple[engine.Cluster, Path]:
    """This rank's place, its pid written under ``pids`` (so a test can watch every rank)."""
    me = engine.cluster()
    _mark(pids, f"rank-{me.rank}", str(os.getpid()))
    return me, Path(pids)


def _all_started(folder: Path, world: int) -> None:
    while len(list(folder.glob("rank-*"))) < world:
        time.sleep(0.01)


def _bad_rank(bad: int, pids: str) -> engine.Cluster:
    """Every rank writes its pid under ``pids``; rank ``bad`` returns once all have, the others sleep."""
    me, folder = _started(pids)
    if me.rank != bad:
        time.sleep(300)
        raise AssertionError(f"rank {me.rank} was not stopped")
    _all_started(folder, me.world_size)
    return me


@engine.task(nodes=3)
def fails_on(bad: int, pids: str) -> int:
    """Rank ``bad`` raises once every rank runs (see ``_bad_rank``)."""
    me = _bad_rank(bad, pids)
    raise ValueError(f"rank {me.rank} gives up")


@engine.task(nodes=2)
def dies_on(bad: int, pids: str) -> int:
    """Like ``fails_on``, but rank ``bad`` dies (SIGKILL of its own process) instead of raising."""
    _bad_rank(bad, pids)
    os.kill(os.getpid(), signal.SIGKILL)
    return -1


@engine.task(nodes=2)
async def rank_only() -> int:
    """Rank 0 returns 100, the others their rank: the action's result is rank 0's."""
    me = engine.cluster()
    print(f"hello from rank {me.rank}", flush=True)  # noqa: T201
    return 100 if me.rank == 0 else me.rank


@engine.task(nodes=2)
async def traced_ranks(n: int) -> int:
    """Each rank runs ``n`` traces; only rank 0's are recorded."""
    total = 0
    for i in range(n):
        total += await _step(i)
    return total


@engine.trace
async def _step(i: int) -> int:
    return i * (engine.cluster().rank + 1)


@engine.task(nodes=3)
async def held(base: int, folder: str) -> dict[str, Any]:
    """Each rank writes ``folder/rank-R`` (its host and pid), waits for ``folder/go``, then joins an allreduce."""
    me = engine.cluster()
    _mark(folder, f"rank-{me.rank}", f"{socket.gethostname()} {os.getpid()}")
    go = Path(folder, "go")
    await _until(go.exists, 0.02)
    total = await asyncio.to_thread(socket_allreduce, base * (me.rank + 1))
    print(f"rank {me.rank} on {socket.gethostname()} summed {total}", flush=True)  # noqa: T201 - output to capture
    return {"total": total, "hosts": list(me.hosts), "master_addr": me.master_addr, "host": socket.gethostname()}


@engine.task(nodes=2, resources=engine.Resources(gpu=1))
async def gpu_ranks() -> list[str]:
    """Every rank's ``CUDA_VISIBLE_DEVICES``, gathered by rank 0 over the allreduce's socket (as a bit mask)."""
    mine = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    mask = sum(1 << int(d) for d in mine.split(",") if d.isdigit())
    total = await asyncio.to_thread(socket_allreduce, mask)
    return [mine, str(total)]


def _interface_towards(addr: str) -> str:
    """The network interface of this host on ``addr``'s network (/16), for gloo to listen on."""
    import subprocess

    listing = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    prefix = ".".join(addr.split(".")[:2]) + "."
    for line in listing.splitlines():
        words = line.split()
        if len(words) > 3 and words[2] == "inet" and words[3].startswith(prefix):
            return words[1].split("@")[0]
    return "lo"


@engine.task(nodes=4)
def gloo_allreduce(value: int) -> dict[str, Any]:
    """A real ``torch.distributed`` allreduce over gloo, set up from the environment alone (``env://``)."""
    import datetime

    import torch
    import torch.distributed as dist

    me = engine.cluster()
    # gloo finds its own address through the host name unless told the
    # interface; the rig's hosts have names no resolver knows.
    os.environ["GLOO_SOCKET_IFNAME"] = _interface_towards(me.master_addr)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        tensor = torch.tensor([value * (me.rank + 1)], dtype=torch.int64)
        dist.all_reduce(tensor)
        return {"total": int(tensor.item()), "world_size": dist.get_world_size(), "rank": dist.get_rank()}
    finally:
        dist.destroy_process_group()


@engine.task(nodes=2)
async def read_and_make(f: engine.File) -> tuple[list[int], engine.File]:
    """Every rank reads ``f`` where it runs (the sizes, summed by rank 0 from the others'), and rank 0 makes a File there."""
    import hashlib

    me = engine.cluster()
    data = await f.read_bytes()
    made = await engine.File.from_bytes(hashlib.sha256(data).hexdigest().encode() + b" seen by rank 0")
    return [me.rank, len(data)], made
