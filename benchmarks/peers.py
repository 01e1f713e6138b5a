"""Cost per trivial action of a fan-out: shoal side by side with Flyte 2 and Metaflow.

    python benchmarks/peers.py            # full sizes (as reported in the README)
    python benchmarks/peers.py --quick    # smaller, for a smoke run

Run it with an interpreter where ``shoal`` is installed and, to compare, ``flyte``
(2.x) and ``metaflow`` too, e.g. in a virtual environment of its own:
``pip install -e . flyte metaflow``. shoal does not depend on the peers; a peer
that is not importable is reported as "not installed".

The workload is the same for everyone: a root that calls N trivial child tasks
(each returns its input) and sums their results.

  * floor: bare ``asyncio.gather`` of N trivial coroutines, no engine at all;
  * shoal, memory store: ``Engine(store="memory")``, the root gathers N actions;
  * shoal, SQLite journal: the same with the default journal, a file in a
    temporary directory;
  * Flyte 2, local: ``flyte.init()`` then ``flyte.with_runcontext(mode="local")
    .run(root, n)``, where ``root`` and the child are ``@env.task`` async tasks of
    one ``flyte.TaskEnvironment`` and the root gathers N child calls (each call
    is an action of Flyte's local controller);
  * Flyte 2, local with ``flyte.init(local_persistence=True)``: the same, with
    Flyte recording its runs in its local SQLite database (the closest thing
    Flyte has to shoal's journal);
  * Metaflow: a ``FlowSpec`` whose ``start`` step does a ``foreach`` over N
    items, a trivial ``leaf`` step, a ``join`` that sums; run as
    ``python flow.py --quiet --no-pylint run --max-workers 16`` with the local
    metadata provider and datastore under a temporary directory (every foreach
    task is a process of its own, which is how Metaflow runs locally).

The peers run in child processes with HOME (and METAFLOW_HOME) pointed at a
temporary directory, so nothing is read from or written to the user's
configuration, and nothing needs a network. Flyte's local controller writes one
metadata directory per action under its own default location; the script
removes each run's directory after the run.

Columns: N, the best total wall time over the rounds, the cost per action
(total / N, so a system's fixed cost per run is spread over its N actions), the
ratio of that to the floor's cost per action, and the wall time of a run with a
single child (the fixed cost of a run). For the in-process systems the times are
of the run call in a warm process; for Metaflow they are of the whole ``python
flow.py run`` command, since that is how a Metaflow run starts.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import engine

RESULT_PREFIX = "PEERS-RESULT "


@dataclass
class Row:
    system: str
    version: str
    n: int = 0
    total: float | None = None  # best wall time of a run with N children, seconds
    single: float | None = None  # best wall time of a run with one child, seconds
    note: str = ""


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


# --- floor and shoal, in this process -------------------------------------------------


@engine.task
async def leaf(x: int) -> int:
    return x


@engine.task
async def root(n: int) -> int:
    return sum(await asyncio.gather(*(leaf(i) for i in range(n))))


async def bare_leaf(x: int) -> int:
    return x


async def bare_root(n: int) -> int:
    return sum(await asyncio.gather(*(bare_leaf(i) for i in range(n))))


async def time_floor(n: int) -> float:
    start = time.perf_counter()
    total = await bare_root(n)
    elapsed = time.perf_counter() - start
    assert total == n * (n - 1) // 2
    return elapsed


async def time_shoal(eng: engine.Engine, n: int) -> float:
    start = time.perf_counter()
    run = await eng.run(root, n)
    elapsed = time.perf_counter() - start
    assert run.result == n * (n - 1) // 2, run.error
    return elapsed


async def floor_and_shoal(
    n: int, rounds: int, store: str
) -> tuple[list[float], list[float], float]:
    """Floor and shoal rounds interleaved, and shoal's best one-child run."""
    floors: list[float] = []
    ours: list[float] = []
    singles: list[float] = []
    async with engine.Engine(store=store) as eng:
        await time_shoal(eng, min(n, 1000))  # warm up
        for _ in range(rounds):
            floors.append(await time_floor(n))
            ours.append(await time_shoal(eng, n))
        for _ in range(20):
            singles.append(await time_shoal(eng, 1))
    return floors, ours, min(singles)


async def floor_single() -> float:
    return min([await time_floor(1) for _ in range(20)])


# --- Flyte 2, in a child process ------------------------------------------------------

FLYTE_CHILD = """
import asyncio
import json
import shutil
import sys
import time

import flyte

env = flyte.TaskEnvironment(name="peers_bench")


@env.task
async def leaf(x: int) -> int:
    return x


@env.task
async def root(n: int) -> int:
    return sum(await asyncio.gather(*(leaf(i) for i in range(n))))


def timed(n: int, raw_data_path: str) -> float:
    ctx = flyte.with_runcontext(mode="local", raw_data_path=raw_data_path)
    start = time.perf_counter()
    run = ctx.run(root, n)
    elapsed = time.perf_counter() - start
    total = run.outputs()[0]
    assert total == n * (n - 1) // 2, total
    shutil.rmtree(run.url, ignore_errors=True)  # the run's metadata directory
    shutil.rmtree(raw_data_path, ignore_errors=True)
    return elapsed


n, rounds, persistence, raw_data_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
flyte.init(local_persistence=persistence)
timed(min(n, 100), raw_data_path)  # warm up
totals = [timed(n, raw_data_path) for _ in range(rounds)]
singles = [timed(1, raw_data_path) for _ in range(10)]
print("PEERS-RESULT " + json.dumps({"totals": totals, "single": min(singles)}))
"""

# --- Metaflow, one command per run ----------------------------------------------------

METAFLOW_FLOW = """
from metaflow import FlowSpec, Parameter, step


class PeersBenchFlow(FlowSpec):
    n = Parameter("n", default=1, type=int)

    @step
    def start(self):
        self.items = list(range(self.n))
        self.next(self.leaf, foreach="items")

    @step
    def leaf(self):
        self.value = self.input
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        print("total", self.total)


if __name__ == "__main__":
    PeersBenchFlow()
"""


def child_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        USERNAME="bench",
        USER="bench",
        METAFLOW_HOME=str(home),
        METAFLOW_DEFAULT_DATASTORE="local",
        METAFLOW_DATASTORE_SYSROOT_LOCAL=str(home / "datastore"),
        METAFLOW_DEFAULT_METADATA="local",
        PYTHONUNBUFFERED="1",
    )
    return env


def last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) or "no output"


def run_flyte(n: int, rounds: int, persistence: bool, timeout: float) -> Row:
    label = "Flyte 2, local" + (" + local_persistence (SQLite)" if persistence else "")
    row = Row(label, version_of("flyte"), n)
    if importlib.util.find_spec("flyte") is None:
        row.note = "not installed"
        return row
    with tempfile.TemporaryDirectory(prefix="peers-flyte-") as tmp:
        home = Path(tmp)
        script = home / "flyte_bench.py"
        script.write_text(FLYTE_CHILD)
        cmd = [
            sys.executable,
            str(script),
            str(n),
            str(rounds),
            "1" if persistence else "0",
            str(home / "raw"),
        ]
        try:
            out = subprocess.run(
                cmd, cwd=home, env=child_env(home), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            row.note = f"did not finish within {timeout:.0f} s"
            return row
    results = [line for line in out.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if out.returncode != 0 or not results:
        row.note = f"failed (exit {out.returncode}): {last_lines(out.stderr or out.stdout)}"
        return row
    data = json.loads(results[-1].removeprefix(RESULT_PREFIX))
    row.total = min(data["totals"])
    row.single = data["single"]
    return row


def metaflow_once(flow: Path, n: int, env: dict[str, str], timeout: float) -> float:
    cmd = [
        sys.executable, str(flow), "--quiet", "--no-pylint",
        "run", "--max-workers", "16", "--max-num-splits", str(max(n, 1)), "--n", str(n),
    ]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(
        cmd, cwd=flow.parent, env=env, capture_output=True, text=True, timeout=timeout
    )
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"exit {out.returncode}: {last_lines(out.stderr or out.stdout)}")
    if f"total {n * (n - 1) // 2}" not in out.stdout + out.stderr:
        raise RuntimeError(f"wrong or missing total: {last_lines(out.stdout + out.stderr)}")
    return elapsed


def run_metaflow(n: int, rounds: int, timeout: float) -> Row:
    row = Row("Metaflow, local (foreach)", version_of("metaflow"), n)
    if importlib.util.find_spec("metaflow") is None:
        row.note = "not installed"
        return row
    with tempfile.TemporaryDirectory(prefix="peers-metaflow-") as tmp:
        home = Path(tmp)
        flow = home / "peers_bench_flow.py"
        flow.write_text(METAFLOW_FLOW)
        env = child_env(home)
        try:
            row.single = metaflow_once(flow, 1, env, timeout)  # also warms the OS caches
            row.single = min(row.single, metaflow_once(flow, 1, env, timeout))
            row.total = min(metaflow_once(flow, n, env, timeout) for _ in range(rounds))
        except subprocess.TimeoutExpired:
            row.note = f"did not finish within {timeout:.0f} s"
        except RuntimeError as exc:
            row.note = f"failed: {exc}"
    return row


# --- report ---------------------------------------------------------------------------


def per_action(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:,.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:,.2f} ms"
    return f"{seconds:,.2f} s"


def print_table(rows: list[Row], floor_per_action: float) -> None:
    header = ("system", "version", "N", "total", "per action", "vs floor", "1-child run")
    table: list[tuple[str, ...]] = [header]
    for row in rows:
        if row.total is None:
            table.append((row.system, row.version, f"{row.n:,}", row.note or "-", "", "", ""))
            continue
        each = row.total / row.n
        single = per_action(row.single) if row.single is not None else "-"
        table.append(
            (
                row.system,
                row.version,
                f"{row.n:,}",
                f"{row.total:.3f} s",
                per_action(each),
                f"{each / floor_per_action:,.1f}x",
                single,
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    right = {2, 3, 4, 5, 6}
    for index, line in enumerate(table):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        print("  " + "  ".join(cells).rstrip())
        if index == 0:
            print("  " + "  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed to each peer's child process"
    )
    args = parser.parse_args()
    n = 2_000 if args.quick else 10_000
    rounds = 3 if args.quick else 5
    flyte_n = 200 if args.quick else 1_000
    flyte_sqlite_n = 50 if args.quick else 200
    flyte_rounds = 2 if args.quick else 3
    metaflow_n = 10 if args.quick else 50
    metaflow_rounds = 1 if args.quick else 2

    load_before = os.getloadavg()[0]
    floors: list[float] = []
    rows: list[Row] = []
    shoal = version_of("shoal")

    f, s, single = asyncio.run(floor_and_shoal(n, rounds, "memory"))
    floors += f
    rows.append(Row("shoal, store=memory", shoal, n, min(s), single))
    with tempfile.TemporaryDirectory(prefix="peers-shoal-") as tmp:
        f, s, single = asyncio.run(floor_and_shoal(n, rounds, str(Path(tmp) / "journal.db")))
    floors += f
    rows.append(Row("shoal, SQLite journal", shoal, n, min(s), single))
    floor = Row(
        "floor: asyncio.gather",
        platform.python_version(),
        n,
        min(floors),
        asyncio.run(floor_single()),
    )
    rows.insert(0, floor)

    rows.append(run_flyte(flyte_n, flyte_rounds, persistence=False, timeout=args.timeout))
    rows.append(run_flyte(flyte_sqlite_n, flyte_rounds, persistence=True, timeout=args.timeout))
    rows.append(run_metaflow(metaflow_n, metaflow_rounds, timeout=args.timeout))

    assert floor.total is not None
    load_after = os.getloadavg()[0]
    print(
        f"fan-out of N trivial actions — {time.strftime('%Y-%m-%d')}, python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load_before:.1f} before / {load_after:.1f} after; best of the rounds"
    )
    print_table(rows, floor.total / floor.n)
    print(
        textwrap.dedent(
            """
            per action = total / N; vs floor = per action / the floor's per action;
            1-child run = wall time of a whole run with N=1 (Metaflow: the whole command).
            """
        ).rstrip()
    )


if __name__ == "__main__":
    main()
