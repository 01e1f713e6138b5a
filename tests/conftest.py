"""Shared fixtures: every test runs in its own working directory and SHOAL_HOME."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest

import engine
from _fakes import FakeSleep

# The plugin that users get (engine.testing) is tested with pytester.
pytest_plugins = ["pytester"]

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Keep every test's journal, blobs and config lookups inside its own folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHOAL_HOME", str(tmp_path / ".shoal"))
    monkeypatch.delenv("SHOAL_CONFIG", raising=False)
    monkeypatch.delenv("SHOAL_BLOB_STORE", raising=False)
    yield tmp_path


@pytest.fixture
def fake_sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
async def eng(fake_sleep: FakeSleep) -> AsyncIterator[engine.Engine]:
    """An engine that keeps nothing and never sleeps between retries."""
    async with engine.Engine(store="memory", sleep=fake_sleep, rng=random.Random(7)) as e:
        yield e
