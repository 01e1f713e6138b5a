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
    actions = json.loads(shoal("show", runs()[0]["id"], "--actions", "--json").stdout)["action_records"]
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


#: The order the examples are read in (and run by ``nox -s examples``).
ORDER = ["hello.py", "fanout.py", "retries.py", "pipeline.py"]

BOOT = "import sys; sys.argv[0] = 'shoal'; from engine._cli import main; main()"


def documented_commands(path: Path) -> list[tuple[list[str], int]]:
    """The ``shoal ...`` lines of an example's docstring, with the exit code each promises."""
    import ast
    import re
    import shlex

    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    commands = []
    for line in doc.splitlines():
        command, _, comment = line.strip().partition("#")
        if not command.startswith("shoal "):
            continue
        promised = re.search(r"exit code (\d+)", comment)
        commands.append((shlex.split(command)[1:], int(promised.group(1)) if promised else 0))
    return commands


def test_every_docstring_holds_when_followed_in_order_in_one_folder() -> None:
    """Each command each docstring shows, run as written, one after the other, here."""
    import subprocess
    import sys

    # No example is left out, and each shows how to run it.
    assert sorted(ORDER) == sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert all(documented_commands(EXAMPLES / name) for name in ORDER)
    for name in ORDER:
        for args, promised in documented_commands(EXAMPLES / name):
            args = [str(EXAMPLES.parent / a) if a.startswith("examples/") else a for a in args]
            if "RUN_ID" in args:
                args = [runs()[0]["id"] if a == "RUN_ID" else a for a in args]
            proc = subprocess.run(
                [sys.executable, "-c", BOOT, *args], capture_output=True, text=True, timeout=120, check=False
            )
            assert proc.returncode == promised, (name, args, proc.stderr[-2000:])
    # The run that gave up was finished in place by its resume.
    assert {r["status"] for r in runs()} == {"succeeded"}
