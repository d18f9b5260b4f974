"""Warnings that cannot flood the log: at most one line per key per interval, with the count.

Sans-IO: `now` (seconds, any monotonic scale) is passed in; the caller writes the line.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["WarnLimiter"]


class WarnLimiter:
    """Counts events by key; says when a key's warning is due and how many events it covers."""

    __slots__ = ("_keys", "every", "max_keys")

    def __init__(self, every: float, max_keys: int = 1024) -> None:
        self.every = every
        self.max_keys = max_keys
        # key -> [time of its last line, events since]; least recently hit first
        self._keys: OrderedDict[Hashable, list[float]] = OrderedDict()

    def hit(self, key: Hashable, now: float) -> int | None:
        """Count one event of `key`; the number of events to report if a line is due, else None."""
        entry = self._keys.get(key)
        if entry is None:
            entry = [float("-inf"), 0.0]
            self._keys[key] = entry
            if len(self._keys) > self.max_keys:  # bounded: the quietest key is forgotten
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        entry[1] += 1
        if now - entry[0] < self.every:
            return None
        count = int(entry[1])
        entry[0], entry[1] = now, 0.0
        return count

    def __len__(self) -> int:
        return len(self._keys)
