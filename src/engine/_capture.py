"""Per-action capture of ``print`` and ``logging`` output, saved to the journal as logs.

While a journaled run is active, ``sys.stdout`` and ``sys.stderr`` are
replaced by proxies that pass every write through to the real stream and,
when the write is made by an action of a run being captured (the current
:data:`~engine._context.action_var`), also copy it, line by line, into that
run's buffer.  A :class:`logging.Handler` on the root logger does the same
for log records (stream ``"log"``).  Buffered lines go to the journal in
batches every :data:`FLUSH_EVERY` seconds (at the looks of the journal's
:class:`~engine._watch.RunWatch`, so at least every ``CANCEL_POLL``) and when
the run ends; ``shoal logs`` reads them back.

Several runs in one process share one installation: the proxies and the
handler are installed by the first run to start capturing and removed when
the last one stops.  The shared state (which runs capture, what to restore)
lives on the proxy installed as ``sys.stdout`` itself, not in a module
global, so it is found again through ``sys.stdout``.

Only output written while an action's code runs is captured: module import
time, the engine's own output and writes of other threads that do not carry
the action's context are passed through untouched.  Runs with
``store="memory"`` capture nothing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO, cast

from ._context import action_var
from ._entries import LogRow, LogRows
from ._errors import JournalError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._journal import Journal
    from ._run import Run

__all__ = ["CaptureHub", "CaptureStream", "OutputCapture"]

#: Seconds between two batches of log lines written to the journal.
FLUSH_EVERY = 0.5
#: A line longer than this (no newline yet, e.g. ``\r`` progress bars) is saved in pieces.
MAX_PARTIAL = 8192



class OutputCapture:
    """Capture what the actions of one run print or log, and save it in the journal.

    ``start()`` before the root action runs (needs the running loop);
    ``await stop()`` after it finished: it saves the last lines and, when no
    other run in the process is capturing, restores ``sys.stdout``,
    ``sys.stderr`` and the root logger.  Both are no-ops for a run without a
    journal.  Losing log lines never fails a run: a batch the journal
    refuses is dropped.
    """

    def __init__(self, run: Run, *, flush_every: float = FLUSH_EVERY) -> None:
        self.run_id = run.id
        self.journal: Journal | None = None if run.journal is None else run.journal.journal
        self.flush_every = flush_every
        # Invariant: ``_rows`` holds complete lines not yet handed to the
        # journal; ``_partial`` the text after the last newline of each
        # (action, stream, gang rank).  Both are touched by action threads (sync tasks)
        # as well as the loop, hence the lock.
        self._lock = threading.Lock()
        self._rows: list[LogRow] = []
        self._partial: dict[tuple[str, str, int | None], str] = {}
        self._hub: CaptureHub | None = None
        self._flushed = 0.0  # when lines were last handed to the journal (monotonic)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self.journal is None or self._hub is not None:
            return
        self._hub = CaptureHub.acquire()
        self._hub.captures[self.run_id] = self
        self._flushed = time.monotonic()
        assert self.journal is not None
        self.journal.watch.add(self)

    async def stop(self) -> None:
        hub, self._hub = self._hub, None
        if hub is None:
            return
        hub.release(self.run_id)
        if self.journal is not None:
            self.journal.watch.discard(self)
        with self._lock:
            now = time.time()
            for (key, stream, rank), text in self._partial.items():
                self._rows.append((self.run_id, key, now, stream, text, rank))
            self._partial.clear()
        await self.flush()

    # -- recording -------------------------------------------------------------

    def add(self, action: str, stream: str, text: str, rank: int | None = None) -> None:
        """Record ``text`` written by ``action`` (its gang ``rank``) on ``stream``; whole lines become rows."""
        now = time.time()
        with self._lock:
            slot = (action, stream, rank)
            pending = self._partial.pop(slot, "") + text
            *lines, rest = pending.split("\n")
            rows = self._rows
            for line in lines:
                rows.append((self.run_id, action, now, stream, line, rank))
            if len(rest) > MAX_PARTIAL:
                rows.append((self.run_id, action, now, stream, rest, rank))
            elif rest:
                self._partial[slot] = rest

    def add_line(self, action: str, stream: str, line: str, at: float, rank: int | None = None) -> None:
        with self._lock:
            self._rows.append((self.run_id, action, at, stream, line, rank))

    def _take(self) -> list[LogRow]:
        """The complete lines buffered so far, no longer buffered."""
        with self._lock:
            rows, self._rows = self._rows, []
        return rows

    async def flush(self) -> None:
        """Hand the complete lines buffered so far to the journal."""
        rows = self._take()
        if rows and self.journal is not None:
            # Logs are a convenience: a full disk or a busy journal must not
            # fail the run, which records the error in its own right.
            with contextlib.suppress(JournalError):
                await self.journal.add_logs(rows)

    def look(self) -> bool:
        """Called by the journal's RunWatch: hand the buffered lines over when due."""
        now = time.monotonic()
        if now - self._flushed >= self.flush_every:
            self._flushed = now
            rows = self._take()
            if rows and self.journal is not None:
                # Not waited for: a batch the journal refuses is dropped (see flush).
                self.journal.append(LogRows(rows))
        return False


class CaptureStream:
    """A text stream proxy: passes writes through, and copies actions' writes to their run.

    Everything else (``encoding``, ``isatty()``, ``fileno()``, ...) is the
    real stream's.  The proxy installed as ``sys.stdout`` carries the
    :class:`CaptureHub` in ``hub``; the one for ``sys.stderr`` shares it.
    """

    def __init__(self, real: TextIO, stream: str, hub: CaptureHub) -> None:
        self.real = real
        self.stream = stream
        self.hub = hub

    def write(self, text: str) -> int:
        captures = self.hub.captures
        if captures:
            action = action_var.get()
            if action is not None:
                capture = captures.get(action.run.id)
                if capture is not None:
                    capture.add(action.label, self.stream, text)
        try:
            return self.real.write(text)
        except BrokenPipeError:
            # The reader went away (``shoal run flow.py | head``): the text
            # is captured all the same, and a print must not fail the action
            # that made it (nor every other action that prints after it).
            return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class CaptureHandler(logging.Handler):
    """A root-logger handler that saves records logged by captured actions.

    While it is installed, the root logger has a handler, so Python's
    "last resort" (warnings to stderr when nothing is configured) would no
    longer fire; the handler stands in for it in that case, so installing
    capture does not change what a user sees.  It writes what the last
    resort would to the stream under the stderr proxy, not through it: the
    record is saved once, as ``log``, not a second time as a line of
    ``stderr``.
    """

    def __init__(self, hub: CaptureHub) -> None:
        super().__init__()
        self.hub = hub
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if _only_handler(self, record.name):
                last = logging.lastResort
                if last is not None and record.levelno >= last.level:
                    with contextlib.suppress(BrokenPipeError):
                        self.hub.stderr.real.write(last.format(record) + "\n")
            captures = self.hub.captures
            if not captures:
                return
            action = action_var.get()
            if action is None:
                return
            capture = captures.get(action.run.id)
            if capture is None:
                return
            capture.add_line(action.label, "log", self.format(record), record.created)
        except Exception:
            self.handleError(record)


class CaptureHub:
    """The state shared by every run capturing in this process.

    Installed (``sys.stdout``/``sys.stderr`` proxies and the root handler)
    while ``captures`` is not empty.
    """

    def __init__(self) -> None:
        # Invariant: ``captures`` maps the id of each run currently capturing
        # to its OutputCapture; the proxies and handler are installed iff it
        # is not empty.
        self.captures: dict[str, OutputCapture] = {}
        self.prev_stdout = sys.stdout
        self.prev_stderr = sys.stderr
        self.stdout = CaptureStream(sys.stdout, "stdout", self)
        self.stderr = CaptureStream(sys.stderr, "stderr", self)
        self.handler = CaptureHandler(self)

    @classmethod
    def acquire(cls) -> CaptureHub:
        """The hub installed now, or a new one, installed."""
        current = sys.stdout
        if isinstance(current, CaptureStream) and current.hub.captures:
            return current.hub
        hub = cls()
        sys.stdout = cast("TextIO", hub.stdout)
        sys.stderr = cast("TextIO", hub.stderr)
        logging.getLogger().addHandler(hub.handler)
        return hub

    def release(self, run_id: str) -> None:
        """Stop capturing ``run_id``; uninstall when it was the last run."""
        self.captures.pop(run_id, None)
        if self.captures:
            return
        logging.getLogger().removeHandler(self.handler)
        # Restore only what is still ours: if something was installed over
        # the proxies meanwhile, they stay in its chain as plain pass-throughs.
        if sys.stdout is cast("TextIO", self.stdout):
            sys.stdout = self.prev_stdout
        if sys.stderr is cast("TextIO", self.stderr):
            sys.stderr = self.prev_stderr


def _only_handler(handler: logging.Handler, name: str) -> bool:
    """Whether ``handler`` is the only one a record of logger ``name`` reaches."""
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None:
        for h in logger.handlers:
            if h is not handler:
                return False
        if not logger.propagate:
            return False
        logger = logger.parent
    return True
