"""The run report (``Engine.report``, ``engine.report``, ``shoal report``): what the page holds.

The page is read back as a user's browser would get it: the tables from
its HTML, the timeline's data from its JSON element.  ``test_report_browser``
opens the same pages in a real Chromium.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import time
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any

import pytest
from typer.testing import CliRunner

import engine
from engine._cli import build_app
from engine._report import _collect

if TYPE_CHECKING:
    from pathlib import Path


@engine.task
async def leaf(i: int) -> int:
    return i * 2


@engine.task(retries=engine.Retry(2, backoff=0.0))
async def wobbly(i: int) -> int:
    action = engine.current_action()
    assert action is not None
    logging.getLogger("flow").warning("wobbly %d attempt %d", i, action.attempt)
    if i % 4 == 0 and action.attempt < 2:
        raise ValueError(f"first try of {i} fails")
    if i == 5:
        logging.getLogger("flow").warning("five </script><b>never</b> works")
        raise KeyError("five")
    return i


@engine.task
async def small(n: int = 6) -> list[int]:
    async with engine.group("leaves"):
        return list(await asyncio.gather(*(leaf(i) for i in range(n))))


@engine.task
async def shaky(n: int = 8) -> int:
    async with engine.group("shaky"):
        got = await asyncio.gather(*(wobbly(i) for i in range(n)), return_exceptions=True)
    return sum(x for x in got if isinstance(x, int))


@engine.task
async def fan(n: int = 200) -> int:
    return sum(await engine.map(leaf, range(n)))


class Page(HTMLParser):
    """The parts of a report page the tests look at."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.sources: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._script_json = False
        self.data: dict[str, Any] = {}
        self._json_text: list[str] = []
        self.feed(text)
        self.data = json.loads("".join(self._json_text))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        for attr in ("src", "href"):
            if named.get(attr):
                self.sources.append(str(named[attr]))
        if tag == "table" and named.get("id"):
            self._table = named["id"]
            self.tables[self._table or ""] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "script" and named.get("id") == "report-data":
            self._script_json = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "script":
            self._script_json = False

    def handle_data(self, data: str) -> None:
        if self._script_json:
            self._json_text.append(data)
        elif self._cell is not None:
            self._cell.append(data)

    def task_row(self, task: str) -> dict[str, str]:
        head, *rows = self.tables["tasks"]
        for row in rows:
            if row[0] == task:
                return dict(zip(head, row, strict=True))
        raise AssertionError(f"no row for task {task!r} in {rows}")

    def summary(self) -> dict[str, str]:
        return {row[0]: row[1] for row in self.tables["summary"]}


async def report_of(tmp_path: Path, task: engine.Task[Any, Any], **kwargs: Any) -> tuple[engine.Run, Path, Page]:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(task, **kwargs)
        path = await eng.report(run.id, tmp_path / "report.html")
    return run, path, Page(path.read_text(encoding="utf-8"))


async def test_small_run_report_shows_summary_values_stats_and_every_action(tmp_path: Path) -> None:
    run, path, page = await report_of(tmp_path, small, n=6)
    assert path == tmp_path / "report.html"
    summary = page.summary()
    assert summary["Run"] == run.id and summary["Status"] == "succeeded" and summary["Root task"] == "small"
    assert summary["Actions"] == "7"
    text = path.read_text()
    assert "[\n  0,\n  2,\n  4," in text  # the result, as JSON
    assert page.task_row("leaf")["Actions"] == "6" and page.task_row("leaf")["Retries"] == "0"
    assert page.task_row("small")["Actions"] == "1"
    # Nothing is fetched: no external script, style or link.
    assert page.sources == []
    data = page.data
    assert not data["binned"]
    lanes = [(lane["group"], lane["task"]) for lane in data["lanes"]]
    assert sorted(lanes, key=str) == sorted([("leaves", "leaf"), (None, "small")], key=str)
    assert len(data["items"]) == 7 and len(data["keys"]) == 7
    for lane, start, end, state, attempt, cached, _key, attempts in data["items"]:
        assert 0 <= start <= end <= data["span"] + 1e-6 and state == 0 and attempt == 1 and cached == 0
        assert [a[2] for a in attempts] == ["local"]  # where it ran: the run's own process
        assert data["lanes"][lane]["task"] in ("leaf", "small")


async def test_failures_retries_tracebacks_and_logs_are_in_the_report(tmp_path: Path) -> None:
    run, path, page = await report_of(tmp_path, shaky, n=8)
    assert run.status == "succeeded"
    stats = page.task_row("wobbly")
    # 0 and 4 fail once and then succeed; 5 fails on all three attempts.
    assert (stats["Actions"], stats["Succeeded"], stats["Failed"], stats["Retries"]) == ("8", "7", "1", "4")
    _head, *failed = page.tables["failures"]
    assert len(failed) == 1 and failed[0][1] == "wobbly" and failed[0][2] == "3"
    assert "KeyError" in failed[0][3] and "raise KeyError" in failed[0][3]  # with its traceback
    items = page.data["items"]
    by_state = {(page.data["lanes"][i[0]]["task"], i[3], i[4]) for i in items}
    assert ("wobbly", 1, 3) in by_state  # the failure, after 3 attempts
    assert ("wobbly", 0, 2) in by_state  # a success on its second attempt
    failed_key = failed[0][0]
    lines = [text for _at, _stream, text in page.data["logs"][failed_key]]
    # What each attempt logged, in order, under the action it came from.
    assert lines == [
        line
        for attempt in (1, 2, 3)
        for line in (f"WARNING flow: wobbly 5 attempt {attempt}", "WARNING flow: five </script><b>never</b> works")
    ]
    assert any("</script><b>never</b>" in line for line in lines)
    # A logged "</script>" cannot end the data element early: it is escaped in the page.
    assert "five </script>" not in path.read_text()


async def test_large_run_is_binned_and_read_page_by_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_collect, "ITEMS_MAX", 50)
    monkeypatch.setattr(_collect, "PAGE", 7)  # many journal pages for 201 actions
    _run, _path, page = await report_of(tmp_path, fan, n=200)
    data = page.data
    assert data["binned"] and data["items"] == []
    (lane,) = [lane for lane in data["lanes"] if lane["task"] == "leaf"]
    assert sum(lane["started"]) == 200 and len(lane["busy"]) == _collect.BINS
    assert sum(lane["failed"]) == 0 and any(b > 0 for b in lane["busy"])
    assert list(lane["places"].values()) == [200] and next(iter(lane["places"])).startswith("local (in-process)")
    assert page.task_row("leaf")["Actions"] == "200"


async def test_binned_report_stays_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_collect, "ITEMS_MAX", 100)
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    _run, small_path, _ = await report_of(tmp_path / "small", fan, n=101)
    _run, large_path, _ = await report_of(tmp_path / "large", fan, n=3_000)
    # 30 times the actions, about the same page: the bins do not grow with the run.
    assert large_path.stat().st_size < 1.2 * small_path.stat().st_size


async def test_report_percentiles_are_nearest_rank() -> None:
    stats = _collect.TaskStats("t")
    stats.durations.extend(float(x) for x in range(1, 101))
    assert stats.spread() == (50.0, 95.0, 100.0)
    assert _collect.TaskStats("empty").spread() is None


def test_engine_report_blocking_default_path_and_cli(tmp_path: Path) -> None:
    run = engine.run(small, n=3)
    written = engine.report(run.id)
    assert written.name == f"shoal-report-{run.id}.html" and written.parent == tmp_path
    assert Page(written.read_text()).summary()["Status"] == "succeeded"

    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(build_app(), ["report", run.id, "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    target = tmp_path / "out" / f"shoal-report-{run.id}.html"
    assert result.stdout.strip() == str(target) and target.exists()
    assert re.search(r"wrote the report of run \S+ to .* \(\d+ KiB\)", result.stderr)


def test_cli_report_of_an_unknown_run_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(build_app(), ["report", "nope"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "no run 'nope'" in result.stderr and "shoal runs" in result.stderr
    assert not (tmp_path / ".shoal" / "shoal.db").exists()  # nothing created to say so
    engine.run(small, n=1)
    result = CliRunner().invoke(build_app(), ["report", "nope"], catch_exceptions=False)
    assert result.exit_code == 2 and "no run 'nope' in journal" in result.stderr
    assert list(tmp_path.glob("*.html")) == []
    result = CliRunner().invoke(build_app(), ["report", "nope", "--store", "memory"], catch_exceptions=False)
    assert result.exit_code == 2 and "keeps no journal" in result.stderr


def test_report_to_an_unwritable_place_says_where(tmp_path: Path) -> None:
    run = engine.run(small, n=1)
    (tmp_path / "file").write_text("")
    with pytest.raises(engine.EngineError, match=r"cannot write the report of run .* to .*file/r\.html"):
        engine.report(run.id, tmp_path / "file" / "r.html")


def _record_offloaded_attempts(db_path: Path, run_id: str, key: str) -> None:
    """Give action ``key`` the attempt records an offloaded action has: one lost to its host, one that ran."""
    db = sqlite3.connect(db_path)
    with db:
        (task, started, finished) = db.execute(
            "SELECT task, started, finished FROM actions WHERE run_id=? AND key=?", (run_id, key)
        ).fetchone()
        db.executemany(
            "INSERT INTO attempts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (run_id, key, task, 1, 1, "lost", "gpu", "ssh", "h1-handle", "h1:4242", started - 0.5, started, None, None),
                (run_id, key, task, 1, 1, "succeeded", "gpu", "ssh", "h2-handle", "h2:77", started, finished, None, None),
            ],
        )
    db.close()


async def test_where_offloaded_attempts_ran_comes_from_their_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(small, n=3)
        summary = await eng.get_run(run.id, actions=True)
        key = next(rec.key for rec in summary.action_records if rec.task == "leaf")
        _record_offloaded_attempts(tmp_path / "j.db", run.id, key)
        items = Page((await eng.report(run.id, tmp_path / "items.html")).read_text()).data
        monkeypatch.setattr(_collect, "ITEMS_MAX", 1)
        bins = Page((await eng.report(run.id, tmp_path / "bins.html")).read_text()).data
    (item,) = [i for i in items["items"] if items["keys"][i[6]] == key]
    assert [a[:5] for a in item[7]] == [[1, "lost", "gpu", "ssh", "h1:4242"], [1, "succeeded", "gpu", "ssh", "h2:77"]]
    lost_start, lost_end = item[7][0][5:7]
    assert lost_end - lost_start == pytest.approx(0.5)
    others = [i for i in items["items"] if items["keys"][i[6]] != key]
    assert all([a[2] for a in i[7]] == ["local"] for i in others)
    (lane,) = [lane for lane in bins["lanes"] if lane["task"] == "leaf"]
    places = lane["places"]
    assert places["gpu (ssh) h1:4242"] == 1 and places["gpu (ssh) h2:77"] == 1
    assert sum(n for place, n in places.items() if place.startswith("local (in-process)")) == 2


@engine.task
async def doomed(n: int) -> int:
    await asyncio.gather(*(leaf(i) for i in range(n)))
    raise RuntimeError(f"root gave up after {n} leaves")


async def test_failed_run_report_shows_the_error_and_no_result(tmp_path: Path) -> None:
    run, path, page = await report_of(tmp_path, doomed, n=2)
    assert run.status == "failed"
    assert page.summary()["Status"] == "failed"
    text = path.read_text()
    assert "RuntimeError</b>: root gave up after 2 leaves" in text
    assert "(none: the run did not succeed)" in text
    _head, *failed = page.tables["failures"]
    assert [row[1] for row in failed] == ["doomed"] and "raise RuntimeError" in failed[0][3]
    assert page.task_row("leaf")["Succeeded"] == "2"


async def test_lanes_past_the_limit_share_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_collect, "LANES_MAX", 2)

    @engine.task
    async def many() -> int:
        async with engine.group("a"):
            await leaf(1)
        async with engine.group("b"):
            await leaf(2)
        async with engine.group("c"):
            await leaf(3)
        return 0

    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(many)
        data = Page((await eng.report(run.id, tmp_path / "r.html")).read_text()).data
    names = [(lane["group"], lane["task"]) for lane in data["lanes"]]
    assert len(names) == 3 and names[-1] == (None, "(other tasks)")
    assert sum(1 for item in data["items"] if item[0] == 2) == 2  # two of the four pairs


GATE: dict[str, asyncio.Event] = {}


@engine.task
async def held(i: int) -> int:
    await GATE["open"].wait()
    return i


@engine.task
async def holding(n: int) -> int:
    async with engine.group("slow"):
        return sum(await asyncio.gather(*(held(i) for i in range(n))))


async def test_report_of_a_live_run_shows_its_running_actions(tmp_path: Path) -> None:
    GATE["open"] = asyncio.Event()
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.submit(holding, 4)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the run's snapshot of its running actions is in
            try:
                if (await eng.get_run(run.id)).action_count == 5:
                    break
            except engine.RunNotFound:  # its first record is not committed yet
                pass
            await asyncio.sleep(0.05)
        path = await eng.report(run.id, tmp_path / "live.html")
        GATE["open"].set()
        await run.wait()
    page = Page(path.read_text())
    assert page.summary()["Status"] == "running" and page.summary()["Finished"] == "(not finished)"
    running = [item for item in page.data["items"] if item[3] == _collect.STATE_CODES["running"]]
    assert sorted(page.data["lanes"][item[0]]["task"] for item in running) == ["held"] * 4 + ["holding"]
    assert page.task_row("held")["Actions"] == "4"


async def test_report_of_a_run_with_offloaded_actions_says_where_they_ran(tmp_path: Path) -> None:
    import offload
    from _offload_kit import worker_env

    box = offload.Local(workers=1, env=worker_env())
    async with engine.Engine(store=tmp_path / "j.db", targets={"box": box}, offload={"leaf": "box"}) as eng:
        run = await eng.run(small, n=3)
        page = Page((await eng.report(run.id, tmp_path / "r.html")).read_text())
    assert run.result == [0, 2, 4]
    data = page.data
    places: dict[str, set[tuple[str, str, str]]] = {data["lanes"][i[0]]["task"]: set() for i in data["items"]}
    for item in data["items"]:
        places[data["lanes"][item[0]]["task"]].update((a[2], a[3], a[4].rsplit(":", 1)[1]) for a in item[7])
    (driver,) = places["small"]
    assert driver[:2] == ("local", "in-process") and driver[2] == str(os.getpid())
    (worker,) = places["leaf"]  # one worker process ran all three
    assert worker[:2] == ("box", "local") and worker[2] != str(os.getpid())
