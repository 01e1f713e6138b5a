"""The task the offload benchmark sends to workers (importable by name there)."""

from __future__ import annotations

import engine


def echo_plain(x: int) -> int:
    return x


@engine.task(offload="box")
async def echo(x: int) -> int:
    return x


@engine.task(offload="aws")
async def echo_batch(x: int) -> int:
    return x


@engine.task(offload="lab")
async def echo_ssh(x: int) -> int:
    return x


@engine.task(offload="lab")
async def peek_ssh(f: engine.File) -> int:
    """The size of ``f`` as the host sees it, and its first bytes read there (the whole file is not hashed)."""
    async with f.open() as fh:
        head = await fh.read_range(0, 16)
    assert head
    return fh.size
