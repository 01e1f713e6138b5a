"""What the offload tests share: payloads built by hand, hooks that record, process checks."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import psutil

from engine.extend import FunctionRef, Payload, decode_value, encode_value

#: The folder of the tests, put on the workers' PYTHONPATH so they find ``_offload_funcs``.
TESTS = Path(__file__).resolve().parent


def worker_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(TESTS) + (os.pathsep + path if path else "")}


def payload(
    fn: str,
    *args: Any,
    key: str = "action-1",
    attempt: int = 1,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    traces: dict[str, tuple[str, bytes]] | None = None,
    module: str = "_offload_funcs",
    **named: Any,
) -> Payload:
    kind, data = encode_value((list(args), named), what="arguments")
    return Payload(
        run_id="run-1",
        key=key,
        attempt=attempt,
        task=fn,
        fn=FunctionRef(module, fn),
        args_kind=kind,
        args=data,
        timeout=timeout,
        env=env or {},
        traces=traces or {},
    )


class Hooks:
    """Records what a backend reports while an attempt runs."""

    def __init__(self) -> None:
        self.logs: list[tuple[str, str]] = []
        #: Output of a gang's ranks: (rank, stream, text).
        self.rank_logs: list[tuple[int, str, str]] = []
        self.traces: list[tuple[str, str, str, bytes]] = []

    def log(self, stream: str, text: str, rank: int | None = None) -> None:
        if rank is None:
            self.logs.append((stream, text))
        else:
            self.rank_logs.append((rank, stream, text))

    def trace(self, key: str, name: str, kind: str, data: bytes) -> None:
        self.traces.append((key, name, kind, data))

    def text(self, stream: str) -> str:
        return "".join(text for s, text in self.logs if s == stream)


def value(outcome: Any, type: Any = Any) -> Any:
    assert outcome.ok, outcome.error
    return decode_value(outcome.value_kind, outcome.value, type)


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for a reaper counts as ended)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def until(check: Any, what: str, seconds: float = 20.0) -> None:
    """Wait until ``check()`` is true, polling; fail naming ``what`` after ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
