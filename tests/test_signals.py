"""SIGTERM stops a run like Ctrl-C: cancelled, recorded so, and the process ends."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

FLOW = Path(__file__).parent / "data" / "signals" / "flow.py"


def _status(db: Path) -> str | None:
    """The status of the only run in the journal, if there is one yet."""
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(db, timeout=1.0)
        try:
            row = con.execute("SELECT id, status FROM runs").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return None if row is None else str(row[1])


def _wait_for_run(db: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the flow ended before it was stopped"
        if _status(db) == "running":
            time.sleep(0.3)  # its actions have started by now
            return
        time.sleep(0.05)
    raise AssertionError("the run never started")


@pytest.mark.parametrize("how", ["engine.run", "shoal run"])
def test_sigterm_cancels_the_run_and_records_it(tmp_path: Path, how: str) -> None:
    env = dict(os.environ, SHOAL_HOME=str(tmp_path / "home"))
    if how == "engine.run":
        cmd = [sys.executable, str(FLOW)]
    else:
        shoal = shutil.which("shoal", path=str(Path(sys.executable).parent))
        assert shoal is not None
        cmd = [shoal, "run", str(FLOW)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_run(tmp_path / "home" / "shoal.db", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The run is recorded cancelled, not left "running" with nobody to finish it.
    assert _status(tmp_path / "home" / "shoal.db") == "cancelled", err.decode()
    if how == "engine.run":
        # Then the process ends as SIGTERM ends it, as a supervisor expects.
        assert proc.returncode == -signal.SIGTERM, err.decode()
    else:
        assert proc.returncode == 130, err.decode()
        assert b"interrupted" in err and b"shoal resume" in err
