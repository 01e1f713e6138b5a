import engine


@engine.task
async def first() -> int:
    return 1


@engine.task
async def second() -> int:
    return 2
