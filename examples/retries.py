"""Retries and traces: a flaky quote service.

``fetch_quote`` stands for an unreliable API call: it fails the first
``fail_times`` times it is called for a symbol in a run (counted in files
under ``state``, one folder per run, so that every run sees the same
failures on every machine, and a resumed run goes on counting its own).
``quote`` retries it with exponential backoff (four attempts in all); the
``@engine.trace`` records each successful call in the journal, so a resumed
run does not call the API again for quotes it already has.

Followed in order, in one folder (RUN_ID is the run the second command
started, listed by ``shoal runs``):

    shoal run examples/retries.py                    # succeeds after retries
    shoal run examples/retries.py --fail-times 5     # gives up: exit code 1
    shoal resume RUN_ID                              # ... and finishes later
"""

import asyncio
from pathlib import Path

import engine


@engine.trace
def fetch_quote(symbol: str, state: str, fail_times: int) -> float:
    """The unreliable call: raises ConnectionError ``fail_times`` times per symbol and run."""
    run = engine.current_run()
    counter = Path(state) / (run.id if run is not None else "no-run") / f"{symbol}.calls"
    counter.parent.mkdir(parents=True, exist_ok=True)
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls <= fail_times:
        raise ConnectionError(f"quote service unavailable for {symbol} (call {calls})")
    return sum(map(ord, symbol)) / 10


@engine.task(retries=engine.Retry(3, backoff=0.01, on=(ConnectionError,)))
async def quote(symbol: str, state: str, fail_times: int) -> float:
    return fetch_quote(symbol, state, fail_times)


@engine.task
async def main(
    symbols: list[str] = ["ACME", "INITECH", "UMBRELLA"],  # noqa: B006 - read only
    fail_times: int = 2,
    state: str = ".flaky",
) -> dict[str, float]:
    """Fetch a quote for each symbol, retrying the flaky service."""
    prices = await asyncio.gather(*(quote(s, state, fail_times) for s in symbols))
    return dict(zip(symbols, prices, strict=True))
