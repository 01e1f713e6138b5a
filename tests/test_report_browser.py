"""Run reports opened in a real headless Chromium: no JavaScript error, timeline drawn, tables there.

Skipped only where Chromium is missing and ``CI`` is not ``true`` (``.ci/run``
installs Debian's ``chromium``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

import engine
from _browser import Browser, find_chromium
from engine._report import _collect
from test_report import fan, shaky, small

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

CHROMIUM = find_chromium()
if CHROMIUM is None and os.environ.get("CI") != "true":
    pytestmark = pytest.mark.skip(reason="Chromium is not installed (apt-get install chromium)")

#: What each page is asked once loaded.
CHECKS = {
    # Pixels the timeline's canvas drew on (not the background): it is not blank.
    "inked": """(() => {
        const c = document.getElementById('timeline');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) { if (d[i + 3] > 0 && !(d[i] > 235 && d[i + 1] > 235 && d[i + 2] > 235)) n++; }
        return n;
    })()""",
    "blue": """(() => {
        const c = document.getElementById('timeline');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) { if (d[i] === 0x25 && d[i + 1] === 0x63 && d[i + 2] === 0xeb) n++; }
        return n;
    })()""",
    "red": """(() => {
        const c = document.getElementById('timeline');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) { if (d[i] === 0xdc && d[i + 1] === 0x26 && d[i + 2] === 0x26) n++; }
        return n;
    })()""",
    "task_rows": "document.querySelectorAll('#tasks tbody tr').length",
    "failure_rows": "document.querySelectorAll('#failures tbody tr').length",
    "canvas_height": "document.getElementById('timeline').clientHeight",
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None, "CI=true needs Chromium: .ci/run installs it"
    with Browser(CHROMIUM) as b:
        yield b


async def _report(tmp_path: Path, task: engine.Task[Any, Any], **kwargs: Any) -> Path:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(task, **kwargs)
        return await eng.report(run.id, tmp_path / "report.html")


def test_the_checker_sees_javascript_errors(browser: Browser, tmp_path: Path) -> None:
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>console.error('logged'); missing();</script></body></html>")
    errors = browser.open(page).errors
    assert any("logged" in e for e in errors) and any("missing is not defined" in e for e in errors)


async def test_small_run_report_renders(browser: Browser, tmp_path: Path) -> None:
    page = browser.open(await _report(tmp_path, small, n=6), CHECKS)
    assert page.errors == []
    assert page.values["blue"] > 0 and page.values["inked"] > 0
    assert page.values["task_rows"] == 2 and page.values["canvas_height"] > 40


async def test_report_with_failures_and_retries_renders_and_shows_logs_on_click(
    browser: Browser, tmp_path: Path
) -> None:
    path = await _report(tmp_path, shaky, n=8)
    clicked = {
        "logs": "(() => { document.querySelector('#failures tr.pick').click();"
        " return document.getElementById('log-view').textContent; })()",
        "detail": "document.getElementById('detail').textContent",
    }
    page = browser.open(path, {**CHECKS, **clicked})
    assert page.errors == []
    assert page.values["red"] > 0  # the failed action is drawn, on top of the rest
    assert page.values["failure_rows"] == 1
    assert page.values["logs"].count("five </script><b>never</b> works") == 3
    assert "Where each attempt ran" in page.values["detail"] and "in-process" in page.values["detail"]


async def test_binned_report_renders(browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_collect, "ITEMS_MAX", 20)
    path = await _report(tmp_path, fan, n=300)
    click = {
        "bin": """(() => {
            const c = document.getElementById('timeline'), r = c.getBoundingClientRect();
            c.dispatchEvent(new MouseEvent('click', {clientX: r.left + 210, clientY: r.top + 50, bubbles: true}));
            return document.getElementById('detail').textContent;
        })()""",
    }
    page = browser.open(path, {**CHECKS, **click})
    assert page.errors == []
    assert page.values["blue"] > 0 and page.values["task_rows"] == 2
    assert "Running at once" in page.values["bin"]


@pytest.mark.slow
async def test_report_of_100k_actions_renders(browser: Browser, tmp_path: Path) -> None:
    path = await _report(tmp_path, fan, n=100_000)
    assert path.stat().st_size < 2 * 1024 * 1024
    page = browser.open(path, CHECKS)
    assert page.errors == []
    assert page.values["blue"] > 0 and page.values["task_rows"] == 2
