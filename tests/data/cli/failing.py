import engine


@engine.task
async def check(i: int) -> int:
    if i % 2:
        raise ValueError(f"odd item {i}\nsecond line of the error")
    return i


@engine.task
async def main(n: int = 4) -> int:
    return sum(await engine.map(check, range(n)))
