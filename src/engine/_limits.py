"""Admission control: counting slots that actions take while they run."""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Slots"]


class Slots:
    """A weighted, first-come-first-served counting semaphore.

    Unlike :class:`asyncio.Semaphore` it takes a weight (``Resources(cpu=4)``
    takes four CPU slots) and serves waiters strictly in order, so a large
    request is not starved by a stream of small ones.

    Invariant: ``0 <= free <= capacity``; every waiter in ``_waiters`` asks
    for more than was free when it queued, and the head of the queue is woken
    as soon as enough is free.  A request larger than ``capacity`` is refused
    by the caller before it gets here (it could never be served).
    """

    __slots__ = ("_waiters", "capacity", "free", "name")

    def __init__(self, capacity: float, name: str) -> None:
        self.capacity = capacity
        self.free = capacity
        self.name = name
        self._waiters: deque[tuple[float, asyncio.Future[None]]] = deque()

    def try_acquire(self, amount: float = 1) -> bool:
        if not self._waiters and self.free >= amount:
            self.free -= amount
            return True
        return False

    async def acquire(self, amount: float = 1) -> None:
        if not self._waiters and self.free >= amount:
            self.free -= amount
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                # Granted and cancelled in the same tick: hand the slots back.
                self.release(amount)
            else:
                # _wake() may already have dropped this (cancelled) entry.
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, amount: float = 1) -> None:
        self.free += amount
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            amount, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.free < amount:
                return
            self._waiters.popleft()
            self.free -= amount
            fut.set_result(None)

    @property
    def in_use(self) -> float:
        return self.capacity - self.free

    def __repr__(self) -> str:
        return f"Slots({self.name!r}, {self.in_use}/{self.capacity} in use)"
