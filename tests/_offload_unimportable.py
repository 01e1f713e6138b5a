"""A task module whose own imports fail where the offload tests' workers run."""

import _offload_missing  # noqa: F401  (fails on the workers: see that module)
import engine


@engine.task(offload="picky")
async def lonely() -> int:
    return 1
