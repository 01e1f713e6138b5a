"""A headless Chromium driven over the DevTools protocol on a pipe, for checking HTML reports.

``chromium --remote-debugging-pipe`` reads protocol commands from its fd 3
and writes replies and events to fd 4, each message a JSON document ended
by a NUL byte: no port, no websocket, nothing but the two pipes.  The
benchmark in ``benchmarks/report.py`` uses this module too.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Browser", "Page", "find_chromium"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Page:
    """What one page load gave: its console errors and exceptions, load time, and evaluated values."""

    errors: list[str] = field(default_factory=list)
    load_ms: float = 0.0
    values: dict[str, Any] = field(default_factory=dict)
    screenshot: bytes = b""


class Browser:
    """One headless Chromium process; ``open(path, checks)`` loads a page in a fresh tab."""

    def __init__(self, executable: str, *, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="shoal-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # Out of the way of 3 and 4 first: "3<&4 4>&3" would cross the two pipes.
        to_child_r, from_child_w = (_high(fd) for fd in (to_child_r, from_child_w))
        # Chromium wants the pipes as fds 3 and 4; bash puts them there (dash takes single-digit fds only).
        self._proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_child_r} 4>&{from_child_w}', "bash", executable,
             "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-dev-shm-usage",
             f"--user-data-dir={self._profile}", "about:blank"],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self._call("Browser.close")
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- protocol ---------------------------------------------------------

    def _send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (code {self._proc.poll()})")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def _call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        wanted = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._read(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self._events.append(message)

    def _wait_event(self, method: str, session: str, deadline: float) -> dict[str, Any]:
        while True:
            for i, event in enumerate(self._events):
                if event.get("method") == method and event.get("sessionId") == session:
                    return self._events.pop(i)
            self._events.append(self._read(deadline))

    # -- pages -------------------------------------------------------------

    def open(self, path: Path, checks: dict[str, str] | None = None, *, screenshot: bool = False) -> Page:
        """Load ``path``; collect console errors and exceptions; evaluate each JS expression in ``checks``."""
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            for domain in ("Page", "Runtime", "Log"):
                self._call(f"{domain}.enable", session=session)
            self._call(
                "Emulation.setDeviceMetricsOverride",
                {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            self._events.clear()
            self._call("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
            self._wait_event("Page.loadEventFired", session, time.monotonic() + self.timeout)
            page = Page()
            timing = self._evaluate(
                session, "(() => { const n = performance.getEntriesByType('navigation')[0];"
                " return n.loadEventEnd || n.loadEventStart || n.duration; })()"
            )
            page.load_ms = float(timing)
            for name, expression in (checks or {}).items():
                page.values[name] = self._evaluate(session, expression)
            if screenshot:
                shot = self._call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
                page.screenshot = base64.b64decode(shot["data"])
            # Events that arrived meanwhile, errors among them.
            self._call("Runtime.evaluate", {"expression": "0"}, session=session)
            page.errors = [e for e in (_error(ev) for ev in self._events if ev.get("sessionId") == session) if e]
            return page
        finally:
            self._events = [e for e in self._events if e.get("sessionId") != session]
            self._call("Target.closeTarget", {"targetId": target})

    def _evaluate(self, session: str, expression: str) -> Any:
        reply = self._call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, session=session
        )
        if "exceptionDetails" in reply:
            raise RuntimeError(f"evaluating {expression!r}: {reply['exceptionDetails']}")
        return reply["result"].get("value")


def _high(fd: int) -> int:
    """``fd`` moved to a number of 10 or more (the original closed)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


def _error(event: dict[str, Any]) -> str | None:
    """The text of an event that reports a JavaScript error or an error logged to the console."""
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        return str(details.get("exception", {}).get("description") or details.get("text"))
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        return " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
    if method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        return str(params["entry"].get("text"))
    return None
