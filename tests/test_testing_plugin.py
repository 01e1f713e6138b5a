"""The pytest plugin shipped for users' own flows (``engine.testing``), run as a user's project would.

Each test writes a small project of tests with ``pytester`` and runs pytest
on it in a child process: the plugin arrives through its ``pytest11`` entry
point, as it does for a user, not through this suite's conftest.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import engine
from engine.testing import FakeSleep, run_task

if TYPE_CHECKING:
    import pytest

FLOW = '''
import asyncio
import engine

ATTEMPTS = []

@engine.task(retries=engine.Retry(3, backoff=30.0))
async def flaky(i: int) -> int:
    ATTEMPTS.append(i)
    if ATTEMPTS.count(i) < 3:
        raise ValueError(f"not yet: {i}")
    return i * 10

@engine.task
async def main(n: int = 3) -> int:
    return sum(await asyncio.gather(*(flaky(i) for i in range(n))))
'''

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""


def _project(pytester: pytest.Pytester, tests: str) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(flow=FLOW, test_flow=textwrap.dedent(tests))


def test_fixtures_run_flows_with_retries_and_backoff_without_sleeping(pytester: pytest.Pytester) -> None:
    _project(
        pytester,
        """
        import time
        import engine
        from flow import main

        async def test_memory(shoal_run, shoal_sleep, shoal_engine):
            started = time.monotonic()
            run = await shoal_run(main, n=3)
            assert run.status == "succeeded" and run.result == 30
            assert run.stats["retries"] == 6
            # Six backoffs of about 30 s, 60 s asked for, none slept.
            assert len(shoal_sleep.delays) == 6 and shoal_sleep.total > 100
            assert time.monotonic() - started < 30
            assert shoal_engine.store == "memory"

        async def test_journaled(shoal_journaled_engine, shoal_run, tmp_path):
            run = await shoal_run(main, n=2, engine=shoal_journaled_engine)
            assert run.status == "succeeded"
            recorded = await shoal_journaled_engine.get_run(run.id)
            assert recorded.status == "succeeded" and recorded.action_count == 3
            assert (tmp_path / "shoal.db").exists()
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_fixture_names_do_not_clash_with_a_projects_own(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def eng():
            return "the project's own"

        @pytest.fixture
        def fake_sleep():
            return "also the project's"
        """
    )
    _project(
        pytester,
        """
        from flow import main

        async def test_both(eng, fake_sleep, shoal_run):
            assert eng == "the project's own" and fake_sleep == "also the project's"
            assert (await shoal_run(main, n=1)).result == 0
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_failing_flow_fails_the_users_test_with_the_tasks_error(pytester: pytest.Pytester) -> None:
    _project(
        pytester,
        """
        import engine

        @engine.task
        async def broken() -> int:
            raise KeyError("the flow's own error")

        async def test_broken(shoal_run):
            run = await shoal_run(broken)
            assert run.status == "failed"
            run.result
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*RunFailed*", "*KeyError*the flow's own error*"])


@engine.task(retries=engine.Retry(2, backoff=10.0))
async def twice(i: int) -> int:
    action = engine.current_action()
    assert action is not None
    if action.attempt < 3:
        raise ValueError("again")
    return i


def test_run_task_for_sync_tests() -> None:
    sleep = FakeSleep()
    run = run_task(twice, 4, sleep=sleep)
    assert run.status == "succeeded" and run.result == 4
    assert len(sleep.delays) == 2 and sleep.total >= 10
