"""Every example in examples/ runs through the CLI and gives the documented result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner, Result

from engine._cli import build_app

EXAMPLES = Path(__file__).parent.parent / "examples"


def shoal(*args: str) -> Result:
    return CliRunner().invoke(build_app(), list(args), catch_exceptions=False)


def runs() -> list[dict[str, Any]]:
    return json.loads(shoal("runs", "--json").stdout)  # type: ignore[no-any-return]


def test_hello() -> None:
    result = shoal("run", str(EXAMPLES / "hello.py"))
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello, world!\n"
    assert shoal("run", str(EXAMPLES / "hello.py"), "--name", "shoal").stdout == "hello, shoal!\n"


def test_fanout() -> None:
    n = 500
    result = shoal("run", str(EXAMPLES / "fanout.py"), "--n", str(n), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == sum(i * i for i in range(n))
    detail = json.loads(shoal("show", runs()[0]["id"], "--json").stdout)
    counts = {t["task"]: t["succeeded"] for t in detail["tasks"]}
    assert counts == {"main": 1, "square": n, "expected_total": 1, "check": 1}


def test_retries_recover_and_resume(tmp_path: Path) -> None:
    example = str(EXAMPLES / "retries.py")
    result = shoal("run", example, "--fail-times", "2", "--state", str(tmp_path / "a"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"ACME": 27.8, "INITECH": 51.6, "UMBRELLA": 59.6}
    actions = json.loads(shoal("show", runs()[0]["id"], "--actions", "--json").stdout)["actions"]
    assert sorted(a["attempt"] for a in actions if a["task"] == "quote") == [3, 3, 3]

    # More failures than retries: the run fails; resumed, it finishes.
    failing = shoal("run", example, "--fail-times", "5", "--state", str(tmp_path / "b"))
    assert failing.exit_code == 1
    run_id = runs()[0]["id"]
    assert "ConnectionError" in failing.stderr and f"shoal resume {run_id}" in failing.stderr
    resumed = shoal("resume", run_id, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["ACME"] == 27.8
    assert runs()[0]["status"] == "succeeded"
    # A run that already succeeded is not run again.
    again = shoal("resume", run_id)
    assert again.exit_code == 0 and "already succeeded" in again.stderr


def test_pipeline_groups_and_cache() -> None:
    example = str(EXAMPLES / "pipeline.py")
    first = shoal("run", example, "--rows", "2000", "--shards", "4", "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["rows"] == 2000 and 9 < summary["mean"] < 11
    second = shoal("run", example, "--rows", "2000", "--shards", "4", "--json")
    assert json.loads(second.stdout) == summary
    assert "5 cached" in second.stderr  # load and the four shards
    tree = shoal("show", runs()[0]["id"]).stdout
    for label in ("group load", "group shards", "group report", "process  4 succeeded"):
        assert label in tree
