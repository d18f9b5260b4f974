"""Which peers' clocks differ from ours, seen from their envelope stamps (meshd/replay.py).

A stamp is the sender's own wall clock in microseconds. Nothing depends on it agreeing with
ours (replay protection compares a sender's stamps only with its own earlier ones), so a skewed
peer still works; this only makes the skew visible: a warning per peer, rate-limited, and a
view for the status API. Sans-IO: both clocks are passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["LOG_EVERY_S", "THRESHOLD_S", "SkewNotice", "SkewWatcher", "format_offset"]

THRESHOLD_S = 300.0  # more than this apart counts as skewed (NTP keeps healthy hosts well within)
LOG_EVERY_S = 600.0  # at most one warning per peer in this long
MAX_PEERS = 4096  # peers remembered; the least recently heard is forgotten first


@dataclass(frozen=True)
class SkewNotice:
    """A line to log: `sender`'s clock is `offset_s` ahead of ours (negative: behind)."""

    sender: bytes
    offset_s: float
    skewed: bool  # False: back within the threshold after a warning


class _Peer:
    __slots__ = ("logged_at", "offset_s", "skewed")

    def __init__(self) -> None:
        self.offset_s = 0.0  # latest observation
        self.skewed = False
        self.logged_at = float("-inf")


class SkewWatcher:
    """Per-sender clock offsets from envelope stamps; notices when one is due to be logged."""

    __slots__ = ("_peers", "became_skewed", "log_every_s", "max_peers", "threshold_s")

    def __init__(
        self,
        threshold_s: float = THRESHOLD_S,
        log_every_s: float = LOG_EVERY_S,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self.threshold_s = threshold_s
        self.log_every_s = log_every_s
        self.max_peers = max_peers
        self.became_skewed = 0  # peers that crossed the threshold (a counter)
        self._peers: OrderedDict[bytes, _Peer] = OrderedDict()

    def observe(self, sender: bytes, stamp_us: int, wall_us: int, now: float) -> SkewNotice | None:
        """An authentic envelope from `sender` stamped `stamp_us`, opened when our own wall clock
        read `wall_us`; `now` (monotonic seconds) paces the warnings. A notice when one is due.

        Anonymous senders (all zeros: tools, tests) are not anyone's clock: ignored."""
        if not any(sender):
            return None
        peer = self._peers.get(sender)
        if peer is None:
            peer = self._peers[sender] = _Peer()
            if len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(sender)
        peer.offset_s = (stamp_us - wall_us) / 1e6
        skewed = abs(peer.offset_s) > self.threshold_s
        if skewed != peer.skewed:
            peer.skewed = skewed
            if skewed:
                self.became_skewed += 1
            elif peer.logged_at == float("-inf"):
                return None  # never warned about: nothing to take back
            peer.logged_at = now
            return SkewNotice(sender, peer.offset_s, skewed)
        if skewed and now - peer.logged_at >= self.log_every_s:
            peer.logged_at = now
            return SkewNotice(sender, peer.offset_s, True)
        return None

    def skewed(self) -> dict[bytes, float]:
        """Senders whose latest stamp was beyond the threshold, with that offset in seconds."""
        return {s: p.offset_s for s, p in self._peers.items() if p.skewed}

    def view(self) -> dict[str, float | int]:
        """{"peers": how many are skewed now, "max_offset_s": the largest offset of those (signed,
        0 when none), "threshold_s"}."""
        offsets = self.skewed().values()
        largest = max(offsets, key=abs, default=0.0)
        return {"peers": len(offsets), "max_offset_s": round(largest, 3), "threshold_s": self.threshold_s}


def format_offset(offset_s: float) -> str:
    """'400d 2h ahead of', '3m 5s behind': the two largest units, for the log line."""
    direction = "ahead of" if offset_s >= 0 else "behind"
    left = round(abs(offset_s))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, left = divmod(left, size)
        if n or (unit == "s" and not parts):
            parts.append(f"{n}{unit}")
    return f"{' '.join(parts[:2])} {direction}"
