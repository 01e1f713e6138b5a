"""The nox sessions: ``nox -s tests lint typecheck bench examples docs``."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (the same command CI runs)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """The API reference from the docstrings, with the README as the guide, into site/ (warnings fail it)."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs)


#: The order the examples are read in (tests/test_examples.py follows it too).
EXAMPLES = ["hello.py", "fanout.py", "retries.py", "pipeline.py"]


def _documented_commands(path: Path) -> list[tuple[list[str], int]]:
    """The ``shoal ...`` lines of an example's docstring, with the exit code each promises."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    commands = []
    for line in doc.splitlines():
        command, _, comment = line.strip().partition("#")
        if command.startswith("shoal "):
            promised = re.search(r"exit code (\d+)", comment)
            commands.append((shlex.split(command)[1:], int(promised.group(1)) if promised else 0))
    return commands


@nox.session
def examples(session: nox.Session) -> None:
    """Follow every example's docstring, in order, in one fresh folder, as a user would."""
    session.install("-e", ".")
    root = Path(session.invoked_from)
    session.chdir(session.create_tmp())
    for name in EXAMPLES:
        for args, promised in _documented_commands(root / "examples" / name):
            args = [str(root / a) if a.startswith("examples/") else a for a in args]
            if "RUN_ID" in args:
                listed = session.run("shoal", "runs", "--json", "--limit", "1", silent=True)
                run_id = json.loads(str(listed))[0]["id"]
                args = [run_id if a == "RUN_ID" else a for a in args]
            session.run("shoal", *args, success_codes=[promised])


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (not tests): figures are ratios to baselines run in the same process."""
    session.install("-e", ".[test]")
    quick = ["--quick"] if "quick" in session.posargs else []
    for script in ["actions.py", "journal.py", "progress.py", "parallel_map.py", "blobs.py", "service.py", "offload.py", "report.py"]:
        session.run("python", f"benchmarks/{script}", *quick)
