"""Loaded by the tests from its path under a module name no worker can import."""

from __future__ import annotations


class Pair:
    def __init__(self, a: int, b: int) -> None:
        self.a = a
        self.b = b


SCALE = 3


def scaled(x: int) -> int:
    return x * SCALE


def to_pair(x: int) -> Pair:
    return Pair(x, scaled(x))
