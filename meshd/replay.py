"""Replay protection for sealed envelopes, without trusting that clocks agree (proto/PROTOCOL.md 2.4).

Every envelope carries its sender's id and a stamp from the sender's `SenderClock`: microseconds
that strictly increase for that sender, also across its restarts and whatever its wall clock
does. A receiver's `ReplayGuard` compares stamps only with earlier stamps *of the same sender*, so
two gateways whose clocks differ by hours still talk, and:

- a stamp at or below the sender's high-water mark minus the window is stale (refused);
- a stamp inside the window that was seen before is a replay (refused);
- after a restart the receiver refuses anything at or below the high-water marks it persisted.

Sans-IO: the wall clock is passed in, the guard needs no clock at all.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

__all__ = [
    "SENDER_ID_SIZE",
    "WINDOW_US",
    "ReplayGuard",
    "SenderClock",
    "sender_id",
]

SENDER_ID_SIZE = 8  # the first 8 bytes of a node id: unique enough for any mesh (2^32 birthday)
WINDOW_US = 120_000_000  # 2 min of the sender's clock: the longest a sealed request waits in flight
MAX_SENDERS = 16_384  # senders tracked; the least recently heard is forgotten first
MAX_SEEN = 65_536  # stamps remembered per sender inside the window (~550 envelopes/s to one node)
_PRUNE_EVERY = 1_024
_ANONYMOUS = bytes(SENDER_ID_SIZE)


@functools.lru_cache(maxsize=65536)  # asked for every envelope sealed; the ids are few
def sender_id(node_id: str) -> bytes:
    """The envelope's sender/receiver field for a node id (32 hex chars); b"" stays anonymous."""
    if not node_id:
        return _ANONYMOUS
    try:
        raw = bytes.fromhex(node_id)
    except ValueError:
        raw = b""
    if len(raw) < SENDER_ID_SIZE:  # not a real node id (tests, tools): a stable stand-in
        raw = hashlib.blake2b(node_id.encode(), digest_size=SENDER_ID_SIZE).digest()
    return raw[:SENDER_ID_SIZE]


def _wall_us() -> int:
    return time.time_ns() // 1000


class SenderClock:
    """Strictly increasing stamps in microseconds: max(wall clock, last stamp + 1).

    `floor` is where a restarted node resumes (from persisted state), so its stamps never go
    back even when its wall clock does (an RTC reset to 1970, an NTP step).
    """

    __slots__ = ("_last", "_wall")

    def __init__(self, wall_us: Callable[[], int] = _wall_us, floor: int = 0) -> None:
        self._wall = wall_us
        self._last = floor

    def stamp(self) -> int:
        t = self._wall()
        if t <= self._last:
            t = self._last + 1
        self._last = t
        return t

    @property
    def last(self) -> int:
        return self._last

    def wall(self) -> int:
        """The wall clock stamps start from, in µs (what a receiver compares peers' stamps with)."""
        return self._wall()


class _Sender:
    __slots__ = ("floor", "high", "inserts", "seen")

    def __init__(self, floor: int) -> None:
        self.floor = floor  # everything at or below is refused
        self.high = floor  # highest stamp admitted
        self.seen: set[int] = set()
        self.inserts = 0


class ReplayGuard:
    """Which (sender, stamp) pairs this node has already accepted; bounded in memory."""

    __slots__ = ("_senders", "evicted", "max_senders", "window")

    def __init__(self, window_us: int = WINDOW_US, max_senders: int = MAX_SENDERS) -> None:
        self.window = window_us
        self.max_senders = max_senders
        self._senders: OrderedDict[bytes, _Sender] = OrderedDict()
        self.evicted = 0

    def check(self, sender: bytes, stamp: int) -> str | None:
        """Admit (sender, stamp) and return None, or say why not: "anonymous", "stale", "replay"."""
        if sender == _ANONYMOUS:
            return "anonymous"
        st = self._senders.get(sender)
        if st is None:
            st = _Sender(0)
            self._senders[sender] = st
            if len(self._senders) > self.max_senders:
                self._senders.popitem(last=False)
                self.evicted += 1
        else:
            self._senders.move_to_end(sender)
        if stamp <= st.floor or stamp <= st.high - self.window:
            return "stale"
        if stamp in st.seen:
            return "replay"
        st.seen.add(stamp)
        if stamp > st.high:
            st.high = stamp
        st.inserts += 1
        if st.inserts >= _PRUNE_EVERY or len(st.seen) > MAX_SEEN:
            self._prune(st)
        return None

    def _prune(self, st: _Sender) -> None:
        st.inserts = 0
        horizon = st.high - self.window
        st.seen = {t for t in st.seen if t > horizon}
        if len(st.seen) > MAX_SEEN:
            # A flood inside one window: forget the older half and refuse below it.
            ordered = sorted(st.seen)
            st.floor = max(st.floor, ordered[len(ordered) // 2])
            st.seen = set(ordered[len(ordered) // 2 + 1 :])

    def __len__(self) -> int:
        return len(self._senders)

    def export(self) -> dict[str, int]:
        """High-water marks by sender (hex), for persisting across a restart."""
        return {s.hex(): st.high for s, st in self._senders.items()}

    def restore(self, marks: Mapping[str, int]) -> None:
        """Refuse everything at or below what was accepted before the restart."""
        for hexid, high in marks.items():
            try:
                sid = bytes.fromhex(hexid)
            except ValueError:
                continue
            if len(sid) != SENDER_ID_SIZE or type(high) is not int or high < 0:
                continue
            self._senders[sid] = _Sender(high)
        while len(self._senders) > self.max_senders:
            self._senders.popitem(last=False)
