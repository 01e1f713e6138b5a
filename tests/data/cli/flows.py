"""Flows for the CLI tests: parameters of many types."""

import asyncio
import logging

import msgspec

import engine


class Config(msgspec.Struct):
    lr: float
    layers: int = 2


@engine.task
async def square(x: int) -> int:
    return x * x


@engine.task
async def main(
    n: int = 3,
    scale: float = 1.0,
    names: list[str] = [],  # noqa: B006 - read only
    loud: bool = False,
    cfg: Config | None = None,
    label: str = "x",
) -> dict[str, object]:
    squares = await asyncio.gather(*(square(i) for i in range(n)))
    return {
        "total": sum(squares) * scale,
        "names": names,
        "loud": loud,
        "cfg": None if cfg is None else {"lr": cfg.lr, "layers": cfg.layers},
        "label": label,
    }


@engine.task
async def needs(count: int) -> int:
    """A task with a required parameter."""
    return count + 1


@engine.task
def shout(word: str) -> str:
    """A sync task (runs in a worker thread) that prints."""
    print(f"thread says {word}")  # noqa: T201 - output to capture
    return word.upper()


@engine.task
async def chatty(n: int = 2) -> int:
    """Prints to stdout and stderr and logs, from several actions."""
    import sys

    async with engine.group("talk"):
        for i in range(n):
            await speak(i)
    print("root done")  # noqa: T201 - output to capture
    print("to stderr", file=sys.stderr)  # noqa: T201 - output to capture
    logging.getLogger("flows").warning("careful %d", n)
    return n + len(await shout("hi"))  # type: ignore[misc]


@engine.task
async def speak(i: int) -> int:
    print(f"speaking {i}", end="")  # noqa: T201 - output to capture
    print(" ...and more")  # noqa: T201 - output to capture
    return i
