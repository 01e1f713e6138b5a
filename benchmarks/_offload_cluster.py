"""``python benchmarks/offload.py cluster``: how fast a gang of 4 starts and how fast it fails, on SSH and Local.

Four hosts of the tests' rig (``tests/_sshd.py``: honest sshd servers in
network namespaces on one bridge), one rank on each, with the target's
connections warm (an engine kept open, a first gang run before timing);
and ``offload.Local`` with 4 ranks on this machine, the baseline of the
same process.  Taking turns, per round:

* start: from the call (``Engine.submit`` of a flow whose one action is
  the gang; :data:`SETTLE` seconds after the last gang, so that its spare
  workers are up) to the last of the 4 ranks running its function (each writes
  the wall clock when it begins, a clock every host here shares);
  target <= 300 ms;
* fail: from the moment the last rank raises (it writes the clock first)
  to every rank's process gone (polled here every few ms); target <= 2 s.

Reported: medians and ranges of each, and SSH's time over Local's.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import _offload_tasks as tasks
import engine
import offload

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

#: Seconds between looks at whether the ranks' processes are gone.
POLL = 0.002
#: Seconds left between rounds for the spare workers of the last gang to start.
SETTLE = 1.5


@engine.task
async def started_flow(folder: str) -> int:
    return await tasks.gang_started(folder)


@engine.task
async def failing_flow(folder: str) -> int:
    return await tasks.gang_fails(folder)


async def _files(folder: Path, names: list[str], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not all((folder / n).exists() for n in names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{names} did not all appear in {folder}")
        await asyncio.sleep(POLL)


async def start_round(eng: engine.Engine, folder: Path) -> float:
    """Seconds from the call to every rank running."""
    _fresh(folder)
    called = time.time()
    run = await eng.submit(started_flow, str(folder))
    await run.wait()
    assert run.status == "succeeded", run.error
    return max(float((folder / f"rank-{r}").read_text()) for r in range(4)) - called


async def fail_round(eng: engine.Engine, folder: Path, pid_here: Callable[[str, int], int | None]) -> float:
    """Seconds from one rank raising to every rank's process gone."""
    _fresh(folder)
    run = await eng.submit(failing_flow, str(folder))
    await _files(folder, [f"rank-{r}" for r in range(4)])
    pids: list[int] = []
    for rank in range(4):
        host, pid = (folder / f"rank-{rank}").read_text().split()
        mine = pid_here(host, int(pid))
        assert mine is not None, f"rank {rank}'s process {pid} on {host} was not found"
        pids.append(mine)
    await _files(folder, ["failed"])
    while True:
        if not any(_alive(p) for p in pids):
            break
        await asyncio.sleep(POLL)
    gone = time.time()
    failed = float((folder / "failed").read_text())
    await run.wait()
    assert run.status == "failed" and "gives up" in str(run.error), run.error
    return gone - failed


def _fresh(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _line(name: str, times: list[float], target: float, base: list[float] | None = None) -> str:
    median = statistics.median(times)
    ratio = f"   {median / statistics.median(base):5.2f}x offload.Local" if base else ""
    return (
        f"  {name:<34} {median * 1000:7.0f} ms median (range {min(times) * 1000:.0f}-{max(times) * 1000:.0f} ms; "
        f"target <= {target * 1000:.0f} ms){ratio}"
    )


async def cluster_main(rounds: int, tests: str) -> None:
    sys.path.insert(0, tests)
    import _sshd

    rig_of = _sshd.open_rig()
    rig = next(rig_of)
    hosts_of: Any = None
    try:
        hosts_of = _sshd.namespace_hosts(rig, count=4)
        hosts = next(hosts_of)
        by_name = {h.hostname: h for h in hosts}
        lab = offload.SSH(
            [h.spec for h in hosts], known_hosts=str(rig.known_hosts), client_keys=[str(rig.client_key)]
        )
        folder = rig.folder / "bench"  # seen by every host, and here

        def ssh_pid(host: str, pid: int) -> int | None:
            return by_name[host].pid_here(pid)

        def local_pid(host: str, pid: int) -> int | None:
            return pid

        times: dict[str, list[float]] = {k: [] for k in ("ssh start", "ssh fail", "local start", "local fail")}
        async with engine.Engine(store="memory", targets={"lab": lab}) as ssh, \
                engine.Engine(store="memory", targets={"lab": offload.Local()}) as local:
            # Warm: connections open, the code bundle on every host, imports cached.
            await start_round(ssh, folder)
            await start_round(local, folder)
            for _ in range(rounds):
                # Each gang after the last one's spares are up, as gangs
                # between other steps of a flow find them.
                await asyncio.sleep(SETTLE)
                times["local start"].append(await start_round(local, folder))
                times["ssh start"].append(await start_round(ssh, folder))
                await asyncio.sleep(SETTLE)
                times["local fail"].append(await fail_round(local, folder, local_pid))
                times["ssh fail"].append(await fail_round(ssh, folder, ssh_pid))
    finally:
        if hosts_of is not None:
            hosts_of.close()
        rig_of.close()
    print(f"A gang of 4 ranks: offload.SSH on 4 namespace hosts (one rank each, warm connections) vs offload.Local, {rounds} rounds")
    print(_line("offload.Local: call to all running", times["local start"], 0.3))
    print(_line("offload.SSH:   call to all running", times["ssh start"], 0.3, times["local start"]))
    print(_line("offload.Local: a rank fails to all gone", times["local fail"], 2.0))
    print(_line("offload.SSH:   a rank fails to all gone", times["ssh fail"], 2.0, times["local fail"]))
