"""Blob store throughput: the local store and S3 (a moto server) against plain boto3.

    python benchmarks/blobs.py            # 256 MiB file, 10,000 small files
    python benchmarks/blobs.py --quick    # 64 MiB, 1,000 small files
    python benchmarks/blobs.py --no-small # the large-file cases only

Starts ``moto_server`` on a free port of 127.0.0.1 in a child process (so
the server does not share this process's GIL), and measures in one run:

  * one large file, upload and download: ``S3BlobStore.put_file``/``get_file``
    against boto3's ``upload_file``/``download_file`` (its default transfer
    settings: 8 MiB parts, 10 threads), and the local store;
  * the same file read into memory (``get_bytes`` against ``get_object``'s
    ``read()``) and streamed (``async with store.open(d)`` + ``async for``
    against ``iter_chunks`` of 1 MiB): every read of a blob is checked
    against its SHA-256, so these show what checking costs;
  * many small files, upload and download: ``Dir.from_path``/``Dir.download``
    (concurrent) against a sequential boto3 ``put_object``/``get_object``
    loop, and the local store.

Each figure is the best of ``--rounds`` rounds, boto3 and shoal alternating,
so the ratios hold on a noisy machine.  Both clients talk to the same server.
moto's server (werkzeug, threaded) closes the connection after every request
and runs every request under one GIL: a few hundred small requests a second
at most, so the small-file figures measure the server as much as the client
(on a 2-core machine they share the CPU with it, too).  Uploads start from an empty bucket
(the blob store would otherwise skip content it already holds).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from engine._blobs import LocalBlobStore
from engine._files import Dir
from offload._s3 import S3BlobStore

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: ``moto_server`` without its per-request log line: formatting and writing it
#: (to a discarded stderr) took about a tenth of the server's time per small
#: request, for boto3 and shoal alike.
_QUIET_MOTO = """
import logging, sys
from moto.server import main
logging.getLogger("werkzeug").setLevel(logging.ERROR)
main(sys.argv[1:])
"""


class Moto:
    """``moto_server`` in a child process, stopped by its pid."""

    def __init__(self) -> None:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _QUIET_MOTO, "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def boto3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def empty_bucket(client: Any, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def atimed(coro: Any) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


def make_small_files(folder: Path, count: int, size: int) -> None:
    for i in range(count):
        sub = folder / f"d{i % 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.bin").write_bytes(i.to_bytes(4, "big") + os.urandom(size - 4))


async def bench(
    args: argparse.Namespace, moto: Moto, work: Path
) -> list[tuple[str, str, float, float]]:
    client = boto3_client(moto.endpoint)
    bucket = "bench"
    client.create_bucket(Bucket=bucket)
    rows: list[tuple[str, str, float, float]] = []  # (case, who, seconds, units)
    big = work / "big.bin"
    with big.open("wb") as fh:
        for _ in range(args.size_mib):
            fh.write(os.urandom(MiB))
    size = args.size_mib * MiB
    small = work / "small"
    if args.small:
        make_small_files(small, args.files, args.small_size)
    files = sorted(p for p in small.rglob("*") if p.is_file()) if args.small else []

    s3 = S3BlobStore(f"s3://{bucket}/blobs", endpoint_url=moto.endpoint)
    local = LocalBlobStore(work / "local-blobs")
    try:
        # Connect before timing, as the boto3 client above is created and
        # has made a request (create_bucket) before its first timed call.
        await s3.exists(hashlib.sha256(b"").hexdigest())
        best: dict[tuple[str, str], float] = {}

        def keep(case: str, who: str, seconds: float) -> None:
            best[case, who] = min(seconds, best.get((case, who), float("inf")))

        out = work / "plain.out"
        for _ in range(args.rounds):
            # -- large file ---------------------------------------------------
            empty_bucket(client, bucket)
            keep(
                "large upload",
                "boto3 upload_file",
                timed(lambda: client.upload_file(str(big), bucket, "plain/big")),
            )
            keep(
                "large download",
                "boto3 download_file",
                timed(lambda: client.download_file(bucket, "plain/big", str(out))),
            )
            out.unlink()
            empty_bucket(client, bucket)
            digest = ""

            async def put() -> None:
                nonlocal digest
                digest = await s3.put_file(big)

            keep("large upload", "shoal S3", await atimed(put()))
            keep("large download", "shoal S3", await atimed(s3.get_file(digest, work / "s3.out")))
            (work / "s3.out").unlink()
            shutil.rmtree(local.root, ignore_errors=True)
            keep("large upload", "shoal local", await atimed(local.put_file(big)))
            keep(
                "large download",
                "shoal local",
                await atimed(local.get_file(digest, work / "local.out")),
            )
            (work / "local.out").unlink()

            # -- large file, read in memory and streamed ----------------------
            client.put_object(Bucket=bucket, Key="plain/big", Body=big.read_bytes())

            def read_plain() -> None:
                client.get_object(Bucket=bucket, Key="plain/big")["Body"].read()

            def stream_plain() -> None:
                body = client.get_object(Bucket=bucket, Key="plain/big")["Body"]
                for _ in body.iter_chunks(MiB):
                    pass

            async def stream(store: Any, digest: str) -> None:
                async with store.open(digest) as reader:
                    async for _ in reader:
                        pass

            keep("large read", "boto3 get_object read", timed(read_plain))
            keep("large read", "shoal S3", await atimed(s3.get_bytes(digest)))
            keep("large read", "shoal local", await atimed(local.get_bytes(digest)))
            keep("large stream", "boto3 iter_chunks", timed(stream_plain))
            keep("large stream", "shoal S3", await atimed(stream(s3, digest)))
            keep("large stream", "shoal local", await atimed(stream(local, digest)))

            # -- small files --------------------------------------------------
            if not args.small:
                continue
            empty_bucket(client, bucket)

            def put_loop() -> None:
                for p in files:
                    client.put_object(Bucket=bucket, Key=f"plain/{p.name}", Body=p.read_bytes())

            def get_loop() -> None:
                dest = work / "plain-small"
                dest.mkdir(exist_ok=True)
                for p in files:
                    body = client.get_object(Bucket=bucket, Key=f"plain/{p.name}")["Body"].read()
                    (dest / p.name).write_bytes(body)

            keep("small upload", "boto3 put_object loop", timed(put_loop))
            keep("small download", "boto3 get_object loop", timed(get_loop))
            shutil.rmtree(work / "plain-small")
            empty_bucket(client, bucket)
            tree: Dir | None = None

            async def put_dir(store: Any) -> None:
                nonlocal tree
                tree = await Dir.from_path(small, store=store, concurrency=args.concurrency)

            keep("small upload", "shoal S3 Dir", await atimed(put_dir(s3)))
            assert tree is not None
            keep(
                "small download",
                "shoal S3 Dir",
                await atimed(
                    tree.download(work / "s3-small", store=s3, concurrency=args.concurrency)
                ),
            )
            shutil.rmtree(work / "s3-small")
            shutil.rmtree(local.root, ignore_errors=True)
            keep("small upload", "shoal local Dir", await atimed(put_dir(local)))
            keep(
                "small download",
                "shoal local Dir",
                await atimed(
                    tree.download(work / "local-small", store=local, concurrency=args.concurrency)
                ),
            )
            shutil.rmtree(work / "local-small")

        units = {"large": size / MiB, "small": float(args.files)}
        for (case, who), seconds in best.items():
            rows.append((case, who, seconds, units[case.split()[0]]))
    finally:
        await s3.aclose()
        client.close()
    return rows


def report(rows: list[tuple[str, str, float, float]], args: argparse.Namespace) -> None:
    baseline = {case: sec for case, who, sec, _ in rows if who.startswith("boto3")}
    print(
        f"\nblob stores: {args.size_mib} MiB file, "
        + (f"{args.files} files of {args.small_size} B, " if args.small else "")
        + f"best of {args.rounds}, moto_server on 127.0.0.1, Dir concurrency {args.concurrency}"
    )
    print(f"{'case':<16} {'who':<24} {'seconds':>9} {'throughput':>16} {'vs boto3':>10}")
    for case, who, sec, units in rows:
        unit = "MiB/s" if case.startswith("large") else "files/s"
        ratio = baseline[case] / sec
        print(f"{case:<16} {who:<24} {sec:9.3f} {units / sec:10.1f} {unit:<5} {ratio:9.2f}x")
    print(
        "\nvs boto3 > 1 means faster than boto3; targets: S3 large >= 0.83x (within 1.2x), S3 small upload >= 5x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--size-mib", type=int, default=None, help="size of the large file")
    parser.add_argument("--concurrency", type=int, default=64, help="files in flight for Dir")
    parser.add_argument("--small-size", type=int, default=1024, help="bytes per small file")
    parser.add_argument(
        "--no-small", dest="small", action="store_false", help="only the large-file cases"
    )
    args = parser.parse_args()
    args.size_mib = args.size_mib or (64 if args.quick else 256)
    args.files = 1000 if args.quick else 10_000
    args.rounds = args.rounds or (1 if args.quick else 2)
    # The moto server's keys, for the store (which reads the standard environment).
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    moto = Moto()
    try:
        with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
            rows = asyncio.run(bench(args, moto, Path(tmp)))
    finally:
        moto.stop()
    report(rows, args)


if __name__ == "__main__":
    main()
