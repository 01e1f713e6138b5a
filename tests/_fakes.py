"""Small stand-ins for injected dependencies (time), shared by the tests."""

from __future__ import annotations


class FakeSleep:
    """Records retry delays instead of sleeping them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
