"""Tasks that the SSH tests send to hosts (imported there from the code bundle, by name)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

import engine


@engine.task(offload="lab")
async def where(x: int) -> tuple[int, int, str]:
    return x * 2, os.getpid(), socket.gethostname()


@engine.task(offload="lab")
async def tiny(i: int) -> tuple[int, int]:
    return i * i, os.getpid()


@engine.task
async def many(n: int) -> list[tuple[int, int]]:
    results: list[tuple[int, int]] = await asyncio.gather(*(tiny(i) for i in range(n)))
    return results


@engine.task(offload="lab")
async def slow(i: int, seconds: float) -> tuple[int, str]:
    await asyncio.sleep(seconds)
    return i + 1, socket.gethostname()


@engine.task
async def spread(n: int, seconds: float) -> list[tuple[int, str]]:
    results: list[tuple[int, str]] = await asyncio.gather(*(slow(i, seconds) for i in range(n)))
    return results


@engine.task(offload="lab")
async def hangs(pidfile: str) -> None:
    # A child in the worker's process group: a cancel must end it too.
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(600)")
    await asyncio.to_thread(Path(pidfile).write_text, f"{os.getpid()} {child.pid}\n")
    await asyncio.sleep(600)


@engine.task
async def call_hangs(pidfile: str) -> None:
    await hangs(pidfile)


@engine.task(offload="lab", resources=engine.Resources(gpu=1))
async def on_gpu() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


@engine.task
async def call_on_gpu() -> str:
    return await on_gpu()


@engine.task(offload="lab")
async def dies_once(marker: str) -> int:
    # The first attempt writes its pid and waits to be killed; the next one finds the marker.
    path = Path(marker)
    if await asyncio.to_thread(path.exists):
        return 2
    await asyncio.to_thread(path.write_text, f"{os.getpid()}\n")
    await asyncio.sleep(600)
    return 1


@engine.task
async def call_dies_once(marker: str) -> int:
    return await dies_once(marker)


class Unlucky(Exception):
    """A task's own exception, importable on the host and here."""


@engine.task(offload="lab")
async def unlucky(code: int) -> int:
    raise Unlucky(f"no luck {code}")


@engine.task
async def call_unlucky(code: int) -> int:
    return await unlucky(code)


@engine.task(offload="lab")
async def chatty(n: int) -> int:
    print(f"printed {n}")  # noqa: T201 - output to capture
    logging.getLogger("chatty").warning("logged %d", n)
    return n


@engine.task
async def call_chatty(n: int) -> int:
    return await chatty(n)


@engine.task(offload="lab")
async def digest_of(f: engine.File) -> tuple[int, str, str]:
    """The size and SHA-256 of what the host reads for ``f``, and the host's name."""
    import hashlib

    data = await f.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest(), socket.gethostname()


@engine.task
async def send_file(path: str) -> tuple[int, str, str]:
    return await digest_of(await engine.File.from_path(path))


@engine.task(offload="lab")
async def tree_of(tree: engine.Dir) -> dict[str, str]:
    """What the host finds in ``tree``: each file's text, by path."""
    folder = await tree.download()
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@engine.task(offload="lab")
async def make_file(text: str) -> engine.File:
    return await engine.File.from_bytes(text.encode(), name="made.txt")


def _write_tree(folder: str, texts: dict[str, str]) -> None:
    for rel, text in texts.items():
        path = Path(folder, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@engine.task(offload="lab")
async def make_dir(texts: dict[str, str]) -> engine.Dir:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        await asyncio.to_thread(_write_tree, tmp, texts)
        return await engine.Dir.from_path(tmp)


class Box:
    """Not msgspec-encodable: a value holding a File travels pickled."""

    def __init__(self, file: engine.File) -> None:
        self.file = file


@engine.task(offload="lab")
async def make_boxed(text: str) -> Box:
    return Box(await engine.File.from_bytes(text.encode()))


@engine.task(offload="lab")
async def make_spoiled(text: str) -> engine.File:
    """A File whose copy on the host is then changed (same size): it must not come back as is."""
    from engine._context import current_engine

    made = await engine.File.from_bytes(text.encode())
    store = current_engine().blob_store
    assert isinstance(store, engine.LocalBlobStore)
    (store.root / made.digest[:2] / made.digest).write_bytes(text.upper().encode())
    return made
