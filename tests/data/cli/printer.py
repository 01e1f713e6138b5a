"""Tasks that print a lot, and a result of many lines (for pipes closed early)."""

import asyncio

import engine


@engine.task
async def chatter(i: int, lines: int) -> int:
    for j in range(lines):
        print(f"action {i} line {j}")  # noqa: T201 - output to capture
        await asyncio.sleep(0)
    return i


@engine.task
async def main(n: int = 50, lines: int = 20, result_lines: int = 2000) -> str:
    done = await engine.map(chatter, range(n), [lines] * n, concurrency=5)
    return "\n".join(f"result {i}" for i in range(result_lines)) if done else ""
