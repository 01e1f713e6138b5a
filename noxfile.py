"""The nox sessions: ``nox -s tests lint typecheck bench examples``."""

from __future__ import annotations

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
def examples(session: nox.Session) -> None:
    """Run every example through the CLI, as a user would."""
    session.install("-e", ".")
    session.chdir(session.create_tmp())
    for name, args in [
        ("hello.py", []),
        ("fanout.py", ["--n", "10000"]),
        ("retries.py", []),
        ("pipeline.py", []),
    ]:
        session.run("shoal", "run", f"{session.invoked_from}/examples/{name}", *args)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (not tests): figures are ratios to baselines run in the same process."""
    session.install("-e", ".[test]")
    quick = ["--quick"] if "quick" in session.posargs else []
    for script in ["actions.py", "progress.py", "parallel_map.py", "blobs.py", "service.py"]:
        session.run("python", f"benchmarks/{script}", *quick)
