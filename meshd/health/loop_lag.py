"""The event loop's lag, measured by a task that sleeps a tick and notes how late it wakes up."""

from __future__ import annotations

import asyncio
import contextlib


class LoopLagMonitor:
    """Measures the event loop's lag: a task sleeps `tick` and notes how late it wakes up."""

    def __init__(self, tick: float = 0.25) -> None:
        self.tick = tick
        self.last = 0.0
        self._worst = 0.0  # since the last take_worst()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def take_worst(self) -> float:
        """The worst lag since the previous call (a stall between two check runs counts)."""
        worst, self._worst = max(self._worst, self.last), 0.0
        return worst

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.tick)
            self.last = max(0.0, loop.time() - started - self.tick)
            self._worst = max(self._worst, self.last)
