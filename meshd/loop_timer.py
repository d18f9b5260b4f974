"""One re-armable timer on the running event loop for a sans-IO core's next deadline.

Every shell that drives a core (the membership runtime, a release fetch's swarm, the joiner's
dialer) asks it for its next deadline after each input and keeps one timer on it. A loop may
fire a timer before the deadline by its own clock: uvloop rounds a delay to whole milliseconds
and reads a millisecond clock, so a deadline a fraction of one away fired at once, the core
found nothing due, the shell armed the same deadline again, and so on for up to a millisecond
(85% of the membership core's timer runs at 32 hosts). Here a timer that fires early waits one
clock step more: the callback runs once, at or after its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

CLOCK_STEP = 0.001  # the coarsest event-loop clock step met (uvloop: 1 ms)


class DeadlineTimer:
    """Calls `fire()` once the loop's clock reaches the armed deadline (loop.time() units)."""

    def __init__(self, fire: Callable[[], None]) -> None:
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    @property
    def pending(self) -> bool:
        return self._handle is not None

    def arm(self, deadline: float) -> None:
        """Fire at `deadline` instead of whatever was armed (the same deadline: nothing to do)."""
        if self._handle is not None:
            if deadline == self._at:
                return
            self._handle.cancel()
        self._at = deadline
        self._handle = asyncio.get_running_loop().call_at(deadline, self._fired)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fired(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._at:  # early by the loop's own clock
            self._handle = loop.call_at(self._at + CLOCK_STEP, self._fired)
            return
        self._handle = None
        self._fire()
