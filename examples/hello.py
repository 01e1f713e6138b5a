"""The smallest flow: one task.

    shoal run examples/hello.py
    shoal run examples/hello.py --name shoal
"""

import engine


@engine.task
async def hello(name: str = "world") -> str:
    """Greet someone."""
    return f"hello, {name}!"


if __name__ == "__main__":
    print(engine.run(hello, name="script").result)
