"""Counting the event loop's turns: how a test sees that long work yields to other tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Turns:
    count = 0


@contextlib.asynccontextmanager
async def loop_turns() -> AsyncIterator[Turns]:
    """``turns.count``: how many times another task got to run while the block ran."""
    turns = Turns()

    async def other_task() -> None:
        while True:
            turns.count += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    turns.count = 0
    try:
        yield turns
    finally:
        task.cancel()
