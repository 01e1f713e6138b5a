"""Which process owns a run, and whether that process is still the same one.

A run recorded as running names its owner: host, pid and the pid's start
time.  A pid alone is not enough: after a crash (a restarted container, a
reboot) the same number is soon given to another process, and a run would
then look alive forever.  The start time is the kernel's (ticks since boot,
field 22 of ``/proc/PID/stat``), joined to the boot id, so a pid reused
after a reboot does not match either.  Where ``/proc`` is missing the start
time is None and the pid alone is checked.
"""

from __future__ import annotations

import functools
import os
import socket

__all__ = ["Owner", "owner_alive", "this_process"]

#: (host, pid, start) of a process; ``start`` is None where unknown.
Owner = tuple[str, int, str | None]


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` as an opaque string, or None if unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or
    # parentheses itself: count fields from the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        ticks = fields[19].decode()
    except IndexError:
        return None
    return f"{_boot_id()}:{ticks}"


def this_process() -> Owner:
    """The owner record of the calling process (cached per pid: it never changes)."""
    return _identity(os.getpid())


@functools.cache
def _identity(pid: int) -> Owner:
    return socket.gethostname(), pid, process_start(pid)


def owner_alive(host: str | None, pid: int | None, start: str | None) -> bool | None:
    """Whether the recorded owner still runs: True, False, or None (another host: unknown)."""
    if pid is None or host is None:
        return False
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    if start is None:
        return True
    now = process_start(pid)
    # No /proc here: the pid is all we can go by.
    return now is None or now == start
