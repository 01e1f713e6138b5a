"""Offloaded actions on ``offload.Local`` workers, against a plain process pool; or on AWS Batch.

    python benchmarks/offload.py            # N = 2,000
    python benchmarks/offload.py --quick    # N = 300
    python benchmarks/offload.py batch [--items N] [--slots S]   # AWS Batch on the moto rig
    python benchmarks/offload.py ssh [--quick]   # offload.SSH on a loopback sshd (see ssh_main)
    python benchmarks/offload.py cluster [--quick]   # gangs of 4 ranks (see _offload_cluster)

``batch`` (see :func:`batch_main`) runs against the tests' moto rig (a
moto server whose Batch jobs really run as local processes, ``--slots`` at
a time): an ``engine.map`` of N items (default 10,000) to a task that
returns its input, against a plain boto3 loop that submits one job per
item (a hand-written job: boto3 writes its item to S3), polls them with
``describe_jobs`` of 100 ids a call at the same interval, and reads each
result back.  Reported: SubmitJob calls (target <= 10),
DescribeJobs calls per 100 jobs per poll round (target <= 1), and wall
times.

In one process, taking turns over several rounds:

  * baseline: ``concurrent.futures.ProcessPoolExecutor(2)`` with one
    ``submit`` per item (a task returning its input), all awaited together;
  * shoal, memory store: the same N items as N offloaded actions of a task
    returning its input, through ``offload.Local(workers=2)``, on an engine
    kept open across rounds (warm workers, as a service would have);
  * shoal, journal: the same on a journaled engine (a temporary home).

Reported: items per second of each, the throughput ratio shoal/baseline
(target >= 1.0x), the journal's cost over the memory store (target <=
1.3x), and the time from creating an ``Engine`` to the first offloaded
result, cold (spawning the worker, its hello, the code bundle; target <=
300 ms), as the median of several fresh engines.

``ssh`` mode starts one sshd on loopback with the tests' rig
(``tests/_sshd.py``: generated keys, a known_hosts file) and, taking turns
in one process, sends the same N tiny actions through
``offload.SSH(workers=4)`` and through ``offload.Local(workers=4)`` (the
baseline: the same worker protocol over pipes), each on an engine kept open
(warm workers).  Reported: actions per second of each and their ratio, and
the time from creating an ``Engine`` with a fresh ``offload.SSH`` target
to the first result, cold (connect, host check, worker start and hello; the
code bundle is on the host after the first), as a median, and the same
with a ``remote_dir`` never used before (the bundle sent and unpacked as
well).  Then a 256 MiB
``File`` argument (fresh random bytes each round, already in the engine's
local store) of one action through ``offload.SSH``, which copies it to the
host by SFTP before the attempt, against a plain asyncssh ``sftp.put`` of
the same file to the same host over a connection opened beforehand
(target: within 1.2x), taking turns.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# This script's folder is first on sys.path, and this script is named
# offload.py: moved to the end, so that `import offload` finds the package.
_HERE = str(Path(__file__).resolve().parent)
_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _HERE] + [_HERE]

import _offload_tasks as tasks  # noqa: E402
import engine  # noqa: E402
import offload  # noqa: E402


@engine.task
async def fan(n: int) -> int:
    return len(await asyncio.gather(*(tasks.echo(i) for i in range(n))))


@engine.task
async def one() -> int:
    return await tasks.echo(1)


async def pool_round(pool: ProcessPoolExecutor, n: int) -> float:
    start = time.perf_counter()
    results = await asyncio.gather(*(asyncio.wrap_future(pool.submit(tasks.echo_plain, i)) for i in range(n)))
    elapsed = time.perf_counter() - start
    assert results == list(range(n))
    return elapsed


async def shoal_round(eng: engine.Engine, n: int) -> float:
    start = time.perf_counter()
    run = await eng.run(fan, n)
    elapsed = time.perf_counter() - start
    assert run.result == n, run.error
    return elapsed


async def cold_first_result(home: Path | None) -> float:
    start = time.perf_counter()
    store = "memory" if home is None else None
    async with engine.Engine(store=store, home=home, targets={"box": offload.Local(workers=2)}) as eng:
        run = await eng.run(one)
        elapsed = time.perf_counter() - start
        assert run.result == 1, run.error
    return elapsed


@engine.task
async def fan_ssh(n: int) -> int:
    return len(await asyncio.gather(*(tasks.echo_ssh(i) for i in range(n))))


@engine.task
async def one_ssh() -> int:
    return await tasks.echo_ssh(1)


async def timed(eng: engine.Engine, flow: engine.Task[..., int], n: int) -> float:
    start = time.perf_counter()
    run = await eng.run(flow, n)
    elapsed = time.perf_counter() - start
    assert run.result == n, run.error
    return elapsed


@engine.task
async def big_ssh(f: engine.File) -> int:
    return await tasks.peek_ssh(f)


async def sftp_put_round(rig: Any, host: Any, source: Path, dest: str) -> float:
    """A plain asyncssh SFTP put of ``source`` to the host, over a connection made beforehand (its defaults)."""
    import asyncssh

    async with asyncssh.connect(
        host.address, host.port, known_hosts=str(rig.known_hosts), client_keys=[str(rig.client_key)]
    ) as conn, conn.start_sftp_client() as sftp:
        start = time.perf_counter()
        await sftp.put(str(source), dest)
        elapsed = time.perf_counter() - start
        await sftp.remove(dest)
    return elapsed


async def ssh_file_round(eng: engine.Engine, source: Path) -> float:
    """One action whose File argument (made beforehand, in the engine's local store) goes to the host."""
    f = await engine.File.from_path(source, store=eng.blob_store)
    start = time.perf_counter()
    run = await eng.run(big_ssh, f)
    elapsed = time.perf_counter() - start
    assert run.result == f.size, run.error
    await eng.blob_store.delete(f.digest)
    return elapsed


async def ssh_file(rig: Any, host: Any, lab: Any, size: int, rounds: int) -> tuple[list[float], list[float]]:
    """A ``size``-byte File argument through offload.SSH against a plain asyncssh put, taking turns."""
    import os

    plain: list[float] = []
    shoal: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        remote = f"{tmp}/host"  # remote_dir, on the loopback host (which shares this machine's disk)
        source = Path(tmp) / "big.bin"
        async with engine.Engine(store="memory", targets={"lab": lab(remote_dir=remote)}) as eng:
            await eng.run(fan_ssh, 4)  # connected, a worker started, the code bundle there
            for _ in range(rounds):
                # Fresh bytes each round: a blob already on the host is (rightly) not sent again.
                await asyncio.to_thread(source.write_bytes, os.urandom(size))
                plain.append(await sftp_put_round(rig, host, source, f"{tmp}/plain.bin"))
                shoal.append(await ssh_file_round(eng, source))
                await asyncio.to_thread(_empty, Path(remote) / "blobs")
    return plain, shoal


def _empty(folder: Path) -> None:
    for shard in folder.glob("??"):
        for blob in shard.iterdir():
            blob.unlink()


async def ssh_spread(rig: Any, n: int, rounds: int) -> list[float]:
    """Seconds per round of ``n`` tiny actions over four hosts in network namespaces, one worker each."""
    import _sshd

    hosts_of = _sshd.namespace_hosts(rig, count=4)
    hosts = next(hosts_of)
    try:
        lab = offload.SSH(
            [h.spec for h in hosts], known_hosts=str(rig.known_hosts), client_keys=[str(rig.client_key)], workers=1
        )
        async with engine.Engine(store="memory", targets={"lab": lab}) as eng:
            await timed(eng, fan_ssh, 50)
            return [await timed(eng, fan_ssh, n) for _ in range(rounds)]
    finally:
        hosts_of.close()


async def ssh_main(n: int, rounds: int, colds: int, file_mib: int) -> None:
    """offload.SSH on one loopback sshd (the tests' rig) against offload.Local, both with four workers."""
    sys.path.insert(0, _TESTS)
    import _sshd

    rig_of = _sshd.open_rig()
    rig = next(rig_of)
    try:
        host = rig.start()

        def lab(**options: Any) -> offload.SSH:
            return offload.SSH(
                [host.spec], known_hosts=str(rig.known_hosts), client_keys=[str(rig.client_key)], workers=4, **options
            )

        ssh_times: list[float] = []
        local_times: list[float] = []
        async with engine.Engine(store="memory", targets={"lab": lab()}) as s, \
                engine.Engine(store="memory", targets={"lab": offload.Local(workers=4)}) as loc:
            await timed(s, fan_ssh, 50)
            await timed(loc, fan_ssh, 50)
            for _ in range(rounds):
                local_times.append(await timed(loc, fan_ssh, n))
                ssh_times.append(await timed(s, fan_ssh, n))
        cold: list[float] = []
        for _ in range(colds):
            start = time.perf_counter()
            async with engine.Engine(store="memory", targets={"lab": lab()}) as eng:
                run = await eng.run(one_ssh)
                cold.append(time.perf_counter() - start)
                assert run.result == 1, run.error
        fresh: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(colds):
                # A remote_dir never used: the code bundle is sent and unpacked too.
                start = time.perf_counter()
                async with engine.Engine(store="memory", targets={"lab": lab(remote_dir=f"{tmp}/{i}")}) as eng:
                    run = await eng.run(one_ssh)
                    fresh.append(time.perf_counter() - start)
                    assert run.result == 1, run.error
        plain, shoal = await ssh_file(rig, host, lab, file_mib << 20, rounds)
        spread = await ssh_spread(rig, n, rounds)
    finally:
        rig_of.close()
    ss, ll = statistics.median(ssh_times), statistics.median(local_times)
    print(f"offload.SSH(workers=4) on a loopback sshd vs offload.Local(workers=4), N = {n:,} tiny actions, {rounds} rounds (medians)")
    print(f"  offload.Local, pipes:        {n / ll:10,.0f} actions/s")
    print(f"  offload.SSH, one channel per worker: {n / ss:10,.0f} actions/s   {ll / ss:5.2f}x offload.Local")
    print(
        f"  Engine start to first SSH result (cold: connect, host check, worker hello): "
        f"{statistics.median(cold) * 1000:6.0f} ms median of {colds} (range {min(cold) * 1000:.0f}-{max(cold) * 1000:.0f} ms)"
    )
    print(
        f"    the same with a fresh remote_dir (the code bundle sent and unpacked as well): "
        f"{statistics.median(fresh) * 1000:6.0f} ms median of {colds} (range {min(fresh) * 1000:.0f}-{max(fresh) * 1000:.0f} ms)"
    )
    pp, sh = statistics.median(plain), statistics.median(shoal)
    # Each round's pair ran back to back: the median of their ratios is the
    # figure least moved by the load of a shared machine changing meanwhile.
    paired = statistics.median(b / a for a, b in zip(plain, shoal, strict=True))
    print(f"  offload.SSH over 4 namespace hosts, one worker each: {n / statistics.median(spread):10,.0f} actions/s"
          f"    (target >= 2,000/s)")
    print(f"  A {file_mib} MiB File argument, {len(plain)} rounds (medians; fresh bytes each round):")
    print(f"    plain asyncssh SFTP put:            {pp:6.2f} s  {file_mib / pp:6.0f} MiB/s")
    print(f"    offload.SSH action taking the File: {sh:6.2f} s  {file_mib / sh:6.0f} MiB/s   {sh / pp:5.2f}x the put; "
          f"median of the rounds' ratios {paired:4.2f}x  (target <= 1.2x)")


async def main(n: int, rounds: int, colds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        base: list[float] = []
        mem: list[float] = []
        jour: list[float] = []
        with ProcessPoolExecutor(2) as pool:
            await pool_round(pool, 50)  # warm: start both processes
            async with engine.Engine(store="memory", targets={"box": offload.Local(workers=2)}) as m, \
                    engine.Engine(home=home / "journal", targets={"box": offload.Local(workers=2)}) as j:
                await shoal_round(m, 50)
                await shoal_round(j, 50)
                for _ in range(rounds):
                    base.append(await pool_round(pool, n))
                    mem.append(await shoal_round(m, n))
                    jour.append(await shoal_round(j, n))
        cold = [await cold_first_result(None) for _ in range(colds)]
    b, mm, jj = (statistics.median(x) for x in (base, mem, jour))
    print(f"offload.Local(workers=2) vs ProcessPoolExecutor(2), N = {n:,} tiny items, {rounds} rounds (medians)")
    print(f"  ProcessPoolExecutor, one submit per item: {n / b:10,.0f} items/s")
    print(f"  shoal offloaded, memory store:            {n / mm:10,.0f} actions/s   {b / mm:5.2f}x the pool  (target >= 1.0x)")
    print(f"  shoal offloaded, journal:                 {n / jj:10,.0f} actions/s   {b / jj:5.2f}x the pool")
    print(f"  journal / memory store, time per action:  {jj / mm:5.2f}x   (target <= 1.3x)")
    print(
        f"  Engine start to first offloaded result (cold): {statistics.median(cold) * 1000:6.0f} ms median "
        f"of {colds} (range {min(cold) * 1000:.0f}-{max(cold) * 1000:.0f} ms; target <= 300 ms)"
    )


POLL = 1.0


def _rig_environment(rig: Any) -> str:
    """Point this process's AWS settings at the rig; a fresh bucket's name."""
    import os
    import uuid

    os.environ.update(
        AWS_ENDPOINT_URL=rig.endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    rig.client("s3").create_bucket(Bucket=bucket)
    return bucket


#: What each job of the boto3 loop runs: a hand-written job that writes its item back to S3.
PLAIN_JOB = (
    "import os, sys, boto3; boto3.client('s3').put_object(Bucket=sys.argv[1], "
    "Key='plain/' + os.environ['AWS_BATCH_JOB_ID'], Body=sys.argv[2].encode())"
)


def boto3_loop(rig: Any, bucket: str, n: int) -> tuple[float, int]:
    """One SubmitJob per item, describe_jobs of 100 ids a call every POLL s, then each result read: (wall, rounds)."""
    from _moto_batch import QUEUE

    batch = rig.client("batch")
    s3 = rig.client("s3")
    start = time.perf_counter()
    definition = batch.register_job_definition(
        jobDefinitionName="bench-plain",
        type="container",
        containerProperties={"image": "bench:1", "vcpus": 1, "memory": 512, "command": [sys.executable, "-c", "pass"]},
    )["jobDefinitionArn"]
    ids = [
        batch.submit_job(
            jobName=f"item-{i}",
            jobQueue=QUEUE,
            jobDefinition=definition,
            containerOverrides={"command": [sys.executable, "-c", PLAIN_JOB, bucket, str(i)]},
        )["jobId"]
        for i in range(n)
    ]
    pending = set(ids)
    rounds = 0
    while pending:
        time.sleep(POLL)
        rounds += 1
        listed = sorted(pending)
        for i in range(0, len(listed), 100):
            for job in batch.describe_jobs(jobs=listed[i : i + 100])["jobs"]:
                if job["status"] in ("SUCCEEDED", "FAILED"):
                    pending.discard(job["jobId"])
    results = [int(s3.get_object(Bucket=bucket, Key=f"plain/{job_id}")["Body"].read()) for job_id in ids]
    assert results == list(range(n))
    return time.perf_counter() - start, rounds


@engine.task
async def batch_fan(n: int) -> int:
    results = [x async for x in engine.map(tasks.echo_batch, range(n), concurrency=n)]
    assert results == list(range(n))
    return len(results)


async def shoal_batch(bucket: str, n: int) -> tuple[float, int]:
    from _moto_batch import QUEUE

    target = offload.Batch(QUEUE, image="bench:1", python=sys.executable, poll_interval=POLL)
    start = time.perf_counter()
    async with engine.Engine(store="memory", targets={"aws": target}, blob_store=f"s3://{bucket}/blobs") as eng:
        run = await eng.run(batch_fan, n)
        assert run.result == n, run.error
        rounds = target._rounds
    return time.perf_counter() - start, rounds


def batch_main(n: int, slots: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from _moto_batch import start_rig

    with tempfile.TemporaryDirectory() as scratch:
        proc, rig = start_rig(scratch, slots=slots)
        try:
            bucket = _rig_environment(rig)
            base, base_rounds = boto3_loop(rig, bucket, n)
            base_calls = rig.calls()
            rig.reset()
            mine, rounds = asyncio.run(shoal_batch(bucket, n))
            calls = rig.calls()
        finally:
            proc.kill()
            proc.wait()
    per_round = calls.get("DescribeJobs", 0) / max(rounds, 1) / (n / 100)
    base_per_round = base_calls.get("DescribeJobs", 0) / max(base_rounds, 1) / (n / 100)
    print(f"offload.Batch vs a boto3 loop, N = {n:,} items, moto rig running {slots} jobs at a time, poll every {POLL:g} s")
    print(f"  boto3 loop:    SubmitJob {base_calls.get('SubmitJob', 0):6,}   DescribeJobs {base_calls.get('DescribeJobs', 0):6,} "
          f"({base_per_round:.2f} per 100 jobs per round, {base_rounds} rounds)   wall {base:7.1f} s")
    print(f"  offload.Batch: SubmitJob {calls.get('SubmitJob', 0):6,} (target <= 10)   DescribeJobs {calls.get('DescribeJobs', 0):6,} "
          f"({per_round:.2f} per 100 jobs per round, target <= 1; {rounds} rounds)   ListJobs {calls.get('ListJobs', 0):,}   "
          f"wall {mine:7.1f} s = {mine / base:.2f}x the loop")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", nargs="?", choices=["local", "batch", "ssh", "cluster"], default="local")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--items", type=int, default=10_000, help="batch: items in the map")
    parser.add_argument("--slots", type=int, default=8, help="batch: jobs the rig runs at once")
    args = parser.parse_args()
    if args.mode == "batch":
        batch_main(200 if args.quick else args.items, args.slots)
    elif args.mode == "cluster":
        from _offload_cluster import cluster_main

        asyncio.run(cluster_main(3 if args.quick else 10, _TESTS))
    elif args.mode == "ssh":
        asyncio.run(ssh_main(300, 3, 3, 32) if args.quick else ssh_main(2000, 5, 5, 256))
    elif args.quick:
        asyncio.run(main(300, 3, 3))
    else:
        asyncio.run(main(2000, 5, 5))
