"""Shared fixtures: every test runs in its own working directory and SHOAL_HOME."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest

import _sshd
import engine
from _fakes import FakeSleep

# The plugin that users get (engine.testing) is tested with pytester.
pytest_plugins = ["pytester"]

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from _sshd import SSHHost, SSHRig


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


# -- real OpenSSH servers (see _sshd) ---------------------------------------------------


@pytest.fixture(scope="session")
def sshd_rig() -> Iterator[SSHRig]:
    """Keys, a known_hosts file, and every sshd the session starts (stopped at its end)."""
    yield from _sshd.open_rig()


@pytest.fixture(scope="session")
def ssh_host(sshd_rig: SSHRig) -> SSHHost:
    """sshd on loopback (it shares this machine's files)."""
    return sshd_rig.start()


@pytest.fixture(scope="session")
def honest_host(sshd_rig: SSHRig) -> SSHHost:
    """sshd on loopback that sees none of the tests' files (private /tmp, hostname "honest")."""
    return sshd_rig.start(honest=True, hostname="honest")


@pytest.fixture
def ns_hosts(sshd_rig: SSHRig) -> Iterator[list[SSHHost]]:
    """Four honest hosts h1..h4 in network namespaces, fresh for each test (it may cut their links)."""
    yield from _sshd.namespace_hosts(sshd_rig)


@pytest.fixture
def ns_host(sshd_rig: SSHRig) -> Iterator[SSHHost]:
    """One honest host h1 in a network namespace, fresh for each test."""
    for hosts in _sshd.namespace_hosts(sshd_rig, count=1):
        yield hosts[0]
