"""A one-action flow for the command-line checks of an unusable SHOAL_HOME."""

import engine


@engine.task
async def main() -> int:
    return 42
