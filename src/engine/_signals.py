"""SIGTERM handled like Ctrl-C by the blocking entry points.

A supervisor (systemd, Kubernetes, a container runtime, ``kill``) stops a
process with SIGTERM.  By default Python then dies on the spot, and a
journaled run stays recorded as ``running`` with nobody left to finish
it.  While ``engine.run``/``engine.resume`` or the ``shoal`` command wait
for a run, SIGTERM cancels what they wait for instead, so the run is
cancelled and recorded as cancelled exactly as for Ctrl-C.  After that,
``engine.run`` lets SIGTERM do what it would have done (the process ends
with the status of SIGTERM, as a supervisor expects); the command exits as
after Ctrl-C.

SIGINT is not used for this: a process started in the background by a
shell script ignores SIGINT.  Only in the main thread, and only while
nobody else handles SIGTERM: an application that installed its own
handler keeps it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable

__all__ = ["SigtermWatch"]

T = TypeVar("T")


class SigtermWatch:
    """Cancels what :meth:`guard` awaits on SIGTERM, and remembers that it did."""

    def __init__(self) -> None:
        self.received = False

    async def guard(self, awaitable: Awaitable[T]) -> T:
        if threading.current_thread() is not threading.main_thread() or signal.getsignal(
            signal.SIGTERM
        ) not in (signal.SIG_DFL, None):
            return await awaitable
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(awaitable)

        def on_term() -> None:
            self.received = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        try:
            return await task
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    def die_if_received(self) -> None:
        """End the process as SIGTERM would have, once the run is recorded."""
        if self.received:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
