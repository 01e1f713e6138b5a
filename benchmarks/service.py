"""shoal embedded in a service: many concurrent small runs on one long-lived engine.

    python benchmarks/service.py            # full sizes
    python benchmarks/service.py --quick    # smaller, for a smoke run

The workload is a request handler: 50 concurrent callers (a service's
concurrent requests) each take the next request number and await one run
of ``handle``, a root task that gathers 10 child actions, until a fixed
number of requests has been served.  Each child does what a handler's step
does: it waits once for I/O (``asyncio.sleep(0)``, a turn of the loop) and
does some work on the CPU (``--work-us``, default 20 µs, a blake2b loop
calibrated at start).  A plain request then costs about 0.3 ms, what a small
endpoint of a Python HTTP service costs, so the ratios say what shoal adds
to such a service (``--work-us 0`` shows shoal's bare cost per run).

The baseline is the same work without shoal: the same callers awaiting a
plain coroutine that gathers the same 10 children.  Rounds alternate
between the baseline and shoal in the same process; the ratio is the median
over the rounds of shoal's throughput to that of the baseline round just
before it (the range is printed too), and the other figures are of the
median round of each side, so that they hold on a noisy machine.  Requests
per CPU second of this process (all its threads) are compared too: a figure
that other processes on the machine barely move.

Reported, for the memory store and for a journal file (in a temporary
directory), each on one engine kept open across its rounds:

  * throughput: requests per second, and its ratio to the baseline's
    (targets: memory store >= 0.85x, journal >= 0.6x);
  * latency of one request as its caller sees it, p50 and p99, beside the
    baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import engine

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

CALLERS = 50
CHILDREN = 10


@dataclass(frozen=True)
class Work:
    """The CPU step of one child: ``rounds`` blake2b digests of a small block."""

    rounds: int

    def __call__(self, seed: int) -> int:
        data = seed.to_bytes(8, "little") * 64
        for _ in range(self.rounds):
            data = hashlib.blake2b(data, digest_size=64).digest() * 8
        return data[0]


def calibrate(micros: float) -> Work:
    """A :class:`Work` that takes about ``micros`` µs on this machine."""
    if micros <= 0:
        return Work(0)
    probe = Work(2000)
    best = min(_timed(lambda: probe(1)) for _ in range(5))
    return Work(max(1, round(2000 * micros * 1e-6 / best)))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_tasks(work: Work) -> tuple[engine.Task[..., int], Callable[[int], Awaitable[int]]]:
    """The handler as a shoal root task, and the same handler as a plain coroutine."""

    async def step(request: int, i: int) -> int:
        await asyncio.sleep(0)
        return work(request * CHILDREN + i)

    child = engine.task(name="child")(step)

    async def handle(request: int) -> int:
        return sum(await asyncio.gather(*(child(request, i) for i in range(CHILDREN))))

    async def plain(request: int) -> int:
        return sum(await asyncio.gather(*(step(request, i) for i in range(CHILDREN))))

    return engine.task(name="handle")(handle), plain


@dataclass(frozen=True)
class Round:
    seconds: float
    #: CPU time of this process (all its threads) during the round.
    cpu_seconds: float
    latencies: list[float]

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def cpu_throughput(self) -> float:
        return len(self.latencies) / self.cpu_seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def serve(call: Callable[[int], Awaitable[object]], requests: int) -> Round:
    """``CALLERS`` callers serve ``requests`` requests between them; each request is timed."""
    todo = iter(range(requests))
    latencies: list[float] = []

    async def caller() -> None:
        for request in todo:
            start = time.perf_counter()
            await call(request)
            latencies.append(time.perf_counter() - start)

    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return Round(time.perf_counter() - start, time.process_time() - cpu, latencies)


async def compare(store: str, work: Work, requests: int, rounds: int) -> tuple[list[Round], list[Round]]:
    """(baseline rounds, shoal rounds), interleaved in pairs, on one long-lived engine."""
    handle, plain = make_tasks(work)
    expected = {r: await plain(r) for r in range(min(requests, 100))}

    async with engine.Engine(store=store) as eng:

        async def through_shoal(request: int) -> int:
            run = await eng.run(handle, request)
            if run.status != "succeeded":
                raise SystemExit(f"request {request} failed: {run.error!r}")
            result: int = run.result
            if request in expected and result != expected[request]:
                raise SystemExit(f"request {request}: {result} != {expected[request]}")
            return result

        await serve(through_shoal, min(requests, 500))  # warm up: journal open, code paths hot
        await serve(plain, min(requests, 500))
        base: list[Round] = []
        ours: list[Round] = []
        for _ in range(rounds):
            base.append(await serve(plain, requests))
            ours.append(await serve(through_shoal, requests))
    return base, ours


def median_round(rounds: list[Round]) -> Round:
    return sorted(rounds, key=lambda r: r.throughput)[len(rounds) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--work-us", type=float, default=20.0, help="CPU work of each child, in µs (default 20)")
    args = parser.parse_args()
    requests = 2_000 if args.quick else 10_000
    rounds = 2 if args.quick else 5
    work = calibrate(args.work_us)

    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, store, target in [
            ("memory store", "memory", 0.85),
            ("SQLite journal", str(Path(tmp) / "service.db"), 0.6),
        ]:
            bases, ours_all = asyncio.run(compare(store, work, requests, rounds))
            # Each shoal round against the baseline round just before it:
            # a burst of load from elsewhere then moves both.
            ratios = sorted(o.throughput / b.throughput for b, o in zip(bases, ours_all, strict=True))
            ratio = statistics.median(ratios)
            cpu_ratio = statistics.median(o.cpu_throughput / b.cpu_throughput for b, o in zip(bases, ours_all, strict=True))
            base, ours = median_round(bases), median_round(ours_all)
            rows.append((
                f"plain asyncio.gather (vs {label})",
                f"{base.throughput:,.0f} req/s",
                f"p50 {base.percentile(0.5) * 1e3:.2f} ms, p99 {base.percentile(0.99) * 1e3:.2f} ms",
                "1.00x",
            ))
            rows.append((
                f"shoal, {label}",
                f"{ours.throughput:,.0f} req/s",
                f"p50 {ours.percentile(0.5) * 1e3:.2f} ms, p99 {ours.percentile(0.99) * 1e3:.2f} ms",
                f"{ratio:.2f}x throughput ({ratios[0]:.2f}-{ratios[-1]:.2f}; target >= {target}x), "
                f"{cpu_ratio:.2f}x per CPU second",
            ))

    print(
        f"shoal service benchmark — python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}: "
        f"{CALLERS} callers, {requests:,} requests of {CHILDREN} children "
        f"(~{args.work_us:g} µs of work each), {rounds} rounds"
    )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for name, rate, latency, note in rows:
        print(f"  {name:<{widths[0]}}  {rate:>{widths[1]}}  {latency:<{widths[2]}}  {note}")


if __name__ == "__main__":
    main()
