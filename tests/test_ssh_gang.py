"""Gangs (``nodes=``) on offload.SSH against real OpenSSH servers: placement, admission, fail fast, logs.

Loopback hosts (``ssh_host``, several ranks on one host) keep the cheap
checks fast; the namespace hosts h1..h4 (``ns_hosts``, on one bridge, so
that they reach each other) run ranks on different hosts and lose links.
Rank processes are found the way a user would look for them on a host:
by the target's mark in their environment (see ``_Link.spawn``), here from
this machine, which holds every host's processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

import _gang_tasks as g
import engine
import offload
from offload import Host

if TYPE_CHECKING:
    from collections.abc import Sequence

    from _sshd import SSHHost, SSHRig


def target(rig: SSHRig, hosts: Sequence[str | Host], **options: Any) -> offload.SSH:
    options.setdefault("known_hosts", str(rig.known_hosts))
    options.setdefault("client_keys", [str(rig.client_key)])
    return offload.SSH(list(hosts), **options)


def rank_workers(backend: offload.SSH) -> dict[int, tuple[str, int]]:
    """Like :func:`workers_of`, without the target's idle workers: warm ones for single attempts, and spares for gangs."""
    warm = {worker.pid for link in backend._links for worker in link.workers}
    warm |= {worker.pid for spares in backend._gangs.spares.values() for worker in spares}
    return {mine: (ns, pid) for mine, (ns, pid) in workers_of(backend).items() if pid not in warm}


def workers_of(backend: offload.SSH) -> dict[int, tuple[str, int]]:
    """The live worker processes ``backend`` started on any host: pid here -> (net namespace, pid on its host)."""
    spaces = {}
    with_ns = Path("/run/netns")
    if with_ns.is_dir():
        spaces = {os.stat(p).st_ino: p.name for p in with_ns.iterdir()}
    mark = f"SHOAL_SSH_OWNER={backend.token}"
    found: dict[int, tuple[str, int]] = {}
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or "offload.worker" not in " ".join(proc.cmdline()):
                continue
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            if mark.encode() not in environ:
                continue
            status = Path(f"/proc/{proc.pid}/status").read_text()
            inner = int(next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[-1])
            space = spaces.get(os.stat(f"/proc/{proc.pid}/ns/net").st_ino, "")
        except (psutil.Error, OSError, StopIteration):
            continue
        found[proc.pid] = (space, inner)
    return found


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def until(check: Any, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{check} did not hold within {within:g}s"
        await asyncio.sleep(0.02)


def ranks_seen(folder: Path, count: int) -> list[tuple[str, int]]:
    """The (host name, pid) each of ``count`` ranks of a ``held`` gang wrote, by rank."""
    seen = []
    for rank in range(count):
        host, pid = (folder / f"rank-{rank}").read_text().split()
        seen.append((host, int(pid)))
    return seen


async def logs(home: Path, run_id: str) -> tuple[str, list[dict[str, Any]]]:
    """``shoal logs RUN`` as printed, and as ``--json`` (the CLI runs its own loop: in a thread)."""
    from typer.testing import CliRunner

    from engine._cli import build_app

    env = {"SHOAL_HOME": str(home)}
    plain = await asyncio.to_thread(CliRunner().invoke, build_app(), ["logs", run_id], env=env)
    assert plain.exit_code == 0, plain.output
    as_json = await asyncio.to_thread(CliRunner().invoke, build_app(), ["logs", run_id, "--json"], env=env)
    assert as_json.exit_code == 0, as_json.output
    return plain.stdout, json.loads(as_json.stdout)


# -- one host, several ranks (cheap) ----------------------------------------------------------


async def test_four_ranks_on_one_host_allreduce_and_see_their_cluster(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    backend = target(sshd_rig, [ssh_host.spec], ranks_per_host=4)
    home = tmp_path / "home"
    async with engine.Engine(home=home, targets={"lab": backend}) as eng:
        run = await eng.run(g.allreduce.override(offload="lab"), 10)
        assert run.status == "succeeded", run.error
        shown = await eng.get_run(run.id, actions=True)
    value = run.result
    assert value["total"] == 10 + 20 + 30 + 40 and value["rank"] == 0
    cluster = value["cluster"]
    assert cluster["world_size"] == 4 and cluster["local_world_size"] == 4 and cluster["local_rank"] == 0
    assert cluster["master_addr"] == "127.0.0.1" and cluster["hosts"] == ["127.0.0.1"] * 4
    assert 0 < cluster["master_port"] < 65536
    assert value["env"]["MASTER_PORT"] == str(cluster["master_port"]) and value["env"]["WORLD_SIZE"] == "4"
    [action] = [a for a in shown.action_records if a.task == "allreduce"]
    [attempt] = action.attempts
    assert attempt.state == "succeeded" and attempt.backend == "ssh"
    assert attempt.where == f"{ssh_host.hostname}:{value['pid']}" == attempt.ranks[0]
    assert len(set(attempt.ranks)) == 4  # a process of its own for each rank
    assert not any(alive(int(place.rsplit(":", 1)[1])) for place in attempt.ranks)  # ended with the gang
    text, lines = await logs(home, run.id)
    for rank in range(4):
        assert f"[rank {rank}] rank {rank} of 4 summed 100" in text
    assert {line["rank"] for line in lines if "summed" in line["text"]} == {0, 1, 2, 3}


async def test_a_rank_that_raises_has_the_others_killed_within_two_seconds_and_is_named(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    backend = target(sshd_rig, [ssh_host.spec], ranks_per_host=3)
    pids = sshd_rig.folder / f"pids-{tmp_path.name}"
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        run = await eng.submit(g.fails_on.override(offload="lab"), 1, str(pids))
        await until(lambda: len(list(pids.glob("rank-*"))) == 3)
        ranks = {int(p.name.split("-")[1]): int(p.read_text()) for p in pids.glob("rank-*")}
        await run.wait()
        ended = time.monotonic()
        assert run.status == "failed"
        assert isinstance(run.error, ValueError) and "rank 1 gives up" in str(run.error)
        assert any("raised on rank 1 of 3" in note for note in getattr(run.error, "__notes__", []))
        # Rank 1 raised once all three ran; the engine had the others killed before it said so.
        await until(lambda: not alive(ranks[0]) and not alive(ranks[2]), within=2.0 + 3.0)
        assert time.monotonic() - ended < 2.0 + 3.0
    assert workers_of(backend) == {}


async def test_a_rank_that_dies_has_the_others_killed_and_the_gang_is_lost_naming_it(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    backend = target(sshd_rig, [ssh_host.spec], ranks_per_host=2, retries=0)
    pids = sshd_rig.folder / f"dies-{tmp_path.name}"
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        run = await eng.submit(g.dies_on.override(offload="lab"), 1, str(pids))
        await until(lambda: len(list(pids.glob("rank-*"))) == 2)
        survivor = int((pids / "rank-0").read_text())
        await run.wait()
        ended = time.monotonic()
        assert run.status == "failed" and isinstance(run.error, offload.WorkerLost), run.error
        assert "rank 1 of 2" in str(run.error) and "SIGKILL" in str(run.error)
        await until(lambda: not alive(survivor), within=2.0 + 3.0)
        assert time.monotonic() - ended < 2.0 + 3.0
    assert workers_of(backend) == {}


async def test_gpu_ranks_each_get_their_own_gpus(sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path) -> None:
    backend = target(sshd_rig, [Host("127.0.0.1", port=ssh_host.port, gpus=2)], ranks_per_host=2)
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        run = await eng.run(g.gpu_ranks.override(offload="lab"))
    assert run.status == "succeeded", run.error
    mine, total = run.result
    assert mine in ("0", "1") and total == str(0b11)  # rank 0 holds one, rank 1 the other


async def test_a_gang_reads_files_of_the_local_store_and_its_result_brings_one_back(
    sshd_rig: SSHRig, honest_host: SSHHost, tmp_path: Path
) -> None:
    backend = target(sshd_rig, [honest_host.spec], ranks_per_host=2)
    data = os.urandom(3000)
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        made_here = await engine.File.from_bytes(data, store=eng.blob_store)
        run = await eng.run(g.read_and_make.override(offload="lab"), made_here)
        assert run.status == "succeeded", run.error
        (rank, size), made_there = run.result
        assert (rank, size) == (0, len(data))
        # The File rank 0 made on the host is in this engine's store now.
        text = await made_there.read_bytes(store=eng.blob_store)
    assert text == hashlib.sha256(data).hexdigest().encode() + b" seen by rank 0"


async def test_a_gang_waits_for_all_its_places_and_never_starts_part_of_it(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    # Four rank places on the host; a gang of 2 holds two, so one of 4 must wait for both.
    backend = target(sshd_rig, [ssh_host.spec], ranks_per_host=4, workers=2)
    first, second = sshd_rig.folder / f"first-{tmp_path.name}", sshd_rig.folder / f"second-{tmp_path.name}"
    second.mkdir()
    (second / "go").touch()
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        holding = await eng.submit(g.held.override(offload="lab", nodes=2), 1, str(first))
        await until(lambda: len(list(first.glob("rank-*"))) == 2)
        waiting = await eng.submit(g.held.override(offload="lab", nodes=4), 100, str(second))
        for _ in range(40):  # 2 s in all: no rank of the second gang starts
            await asyncio.sleep(0.05)
            assert len(rank_workers(backend)) == 2
            assert not list(second.glob("rank-*"))
            assert not waiting.done
        (first / "go").touch()
        await holding.wait()
        await waiting.wait()
        assert holding.status == waiting.status == "succeeded", (holding.error, waiting.error)
    assert holding.result["total"] == 1 + 2
    assert waiting.result["total"] == 100 + 200 + 300 + 400


async def test_a_gang_the_hosts_can_never_hold_is_a_resource_error_naming_their_slots(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    two_cpus = Host("127.0.0.1", port=ssh_host.port, cpus=2)
    backend = target(sshd_rig, [two_cpus], ranks_per_host=4)
    started = time.monotonic()
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        run = await eng.run(g.allreduce.override(offload="lab", resources=engine.Resources(cpu=1)), 1)
        assert run.status == "failed"
        assert isinstance(run.error, engine.ResourceError)
        message = str(run.error)
        assert "nodes=4" in message and "'lab'" in message
        assert f"127.0.0.1:{ssh_host.port} holds 2 (2 CPUs and 0 GPUs)" in message
        assert "ranks_per_host=4" in message and "1 CPUs per rank" in message
        # One rank per host (the default) on one host: never four.
        one = await eng.run(g.allreduce.override(offload="lab", ranks_per_host=1), 1)
        assert isinstance(one.error, engine.ResourceError)
        assert "ranks_per_host=1" in str(one.error) and "the 1 hosts hold 1" in str(one.error)
    assert time.monotonic() - started < 30  # refused, not waited for
    assert workers_of(backend) == {}


async def test_a_gang_past_its_timeout_has_every_rank_killed(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    backend = target(sshd_rig, [ssh_host.spec], ranks_per_host=3)
    folder = sshd_rig.folder / f"late-{tmp_path.name}"  # no "go": the ranks wait until killed
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        run = await eng.run(g.held.override(offload="lab", timeout=2.0, retries=0), 1, str(folder))
        assert run.status == "failed" and isinstance(run.error, engine.ActionTimeout), run.error
        pids = [pid for _, pid in ranks_seen(folder, 3)]
        await until(lambda: not any(alive(p) for p in pids), within=10.0)
        again = await eng.run(g.allreduce.override(offload="lab", nodes=3), 1)  # the places were given back
        assert again.status == "succeeded" and again.result["total"] == 1 + 2 + 3, again.error


async def test_closing_the_engine_mid_gang_leaves_no_rank_on_the_host(
    sshd_rig: SSHRig, honest_host: SSHHost, tmp_path: Path
) -> None:
    backend = target(sshd_rig, [honest_host.spec], ranks_per_host=3)
    folder = sshd_rig.folder / f"closed-{tmp_path.name}"
    eng = engine.Engine(home=tmp_path / "home", targets={"lab": backend})
    await eng.__aenter__()
    run = await eng.submit(g.held.override(offload="lab"), 1, str(folder))
    await until(lambda: len(list(folder.glob("rank-*"))) == 3)
    assert len(rank_workers(backend)) == 3
    await asyncio.wait_for(eng.aclose(), 30)
    assert run.done and run.status == "cancelled"
    assert workers_of(backend) == {}
    async with target(sshd_rig, [honest_host.spec]) as check:
        left = await check._link(honest_host.spec).run("pgrep -f 'offload[.]worker' || true")
    assert left.stdout.strip() == ""


def test_ranks_per_host_must_be_a_whole_number_of_at_least_one() -> None:
    with pytest.raises(engine.ConfigError, match="ranks_per_host= takes a whole number >= 1"):
        offload.SSH(["gpu1"], known_hosts="kh", ranks_per_host=0)
    assert offload.SSH(["gpu1"], known_hosts="kh").ranks_per_host == 1


# -- namespace hosts: ranks on different hosts ------------------------------------------------


async def test_ranks_on_four_hosts_reach_rank_zeros_host_and_every_ranks_output_comes_back(
    sshd_rig: SSHRig, ns_hosts: list[SSHHost], tmp_path: Path
) -> None:
    backend = target(sshd_rig, [h.spec for h in ns_hosts])
    home = tmp_path / "home"
    async with engine.Engine(home=home, targets={"lab": backend}) as eng:
        run = await eng.run(g.allreduce.override(offload="lab"), 1)
        assert run.status == "succeeded", run.error
        shown = await eng.get_run(run.id, actions=True)
    value = run.result
    assert value["total"] == 1 + 2 + 3 + 4
    addresses = [h.address for h in ns_hosts]
    cluster = value["cluster"]
    assert cluster["hosts"] == addresses and cluster["master_addr"] == addresses[0]
    assert (cluster["local_rank"], cluster["local_world_size"], value["host"]) == (0, 1, "h1")
    [action] = [a for a in shown.action_records if a.task == "allreduce"]
    [attempt] = action.attempts
    assert attempt.where == f"h1:{value['pid']}"
    assert [where.split(":")[0] for where in attempt.ranks] == ["h1", "h2", "h3", "h4"]
    assert attempt.ranks[0] == attempt.where and all(where.split(":")[1].isdigit() for where in attempt.ranks)
    text, _ = await logs(home, run.id)
    for rank in range(4):
        assert f"[rank {rank}] rank {rank} of 4 summed 10" in text


@pytest.mark.slow
async def test_a_host_lost_mid_gang_has_every_rank_stopped_and_the_gang_retried_on_the_others(
    sshd_rig: SSHRig, ns_hosts: list[SSHHost], tmp_path: Path
) -> None:
    interval, count = 0.3, 2
    backend = target(
        sshd_rig, [h.spec for h in ns_hosts], keepalive_interval=interval, keepalive_count_max=count, retries=2
    )
    folder = sshd_rig.folder / f"held-{tmp_path.name}"
    by_name = {h.hostname: h for h in ns_hosts}
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        run = await eng.submit(g.held.override(offload="lab", nodes=3), 1, str(folder))
        await until(lambda: len(list(folder.glob("rank-*"))) == 3)
        first = ranks_seen(folder, 3)
        assert [host for host, _ in first] == ["h1", "h2", "h3"]
        running = workers_of(backend)
        here = {(by_name[host].netns, pid): None for host, pid in first}
        pids = {key: mine for mine, key in running.items() if key in here}
        assert len(pids) == 3
        for rank_file in folder.glob("rank-*"):
            rank_file.unlink()
        ns_hosts[0].cut("down")
        cut = time.monotonic()
        others = [mine for (space, _), mine in pids.items() if space != ns_hosts[0].netns]
        await until(lambda: not any(alive(p) for p in others), within=interval * count + 2.0 + 5.0)
        gone_after = time.monotonic() - cut
        # The retry: three ranks on the hosts that are up.
        await until(lambda: len(list(folder.glob("rank-*"))) == 3)
        assert sorted(host for host, _ in ranks_seen(folder, 3)) == ["h2", "h3", "h4"]
        (folder / "go").touch()
        await run.wait()
        assert run.status == "succeeded", run.error
        assert run.result["total"] == 1 + 2 + 3 and run.result["hosts"] == [h.address for h in ns_hosts[1:]]
        shown = await eng.get_run(run.id, actions=True)
        [action] = [a for a in shown.action_records if a.task == "held"]
        assert [a.state for a in action.attempts] == ["lost", "succeeded"]
        ns_hosts[0].mend()
    # Keepalives notice within interval x count; the others went within 2 s of that (with slack).
    assert gone_after < interval * count + 2.0 + 3.0
    # After aclose no worker is left on any host (h1's, cut off, was killed over a new connection).
    await until(lambda: workers_of(backend) == {}, within=10.0)


@pytest.mark.slow
async def test_a_torch_distributed_gloo_allreduce_across_the_hosts_works_unchanged(
    sshd_rig: SSHRig, ns_hosts: list[SSHHost], tmp_path: Path
) -> None:
    import importlib.util

    import _sshd

    if importlib.util.find_spec("torch") is None:
        _sshd.missing("no torch here (CPU-only: pip install torch==2.13.0+cpu, as .ci/run does)")
    backend = target(sshd_rig, [h.spec for h in ns_hosts])
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        run = await eng.run(g.gloo_allreduce.override(offload="lab"), 5)
    assert run.status == "succeeded", run.error
    assert run.result == {"total": 5 * (1 + 2 + 3 + 4), "world_size": 4, "rank": 0}
