"""The transmit-limited broadcast queue (memberlist queue.go).

Every piece of news is piggybacked on outgoing packets a limited number of times:
retransmit_mult * ceil(log10(n + 1)), enough for an epidemic to reach everyone with high
probability. Newer news about the same subject replaces the older one, so only the latest
state of a node is ever gossiped. Fewest-sent news goes first, larger first among equals
(the small ones fill the gaps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    return retransmit_mult * math.ceil(math.log10(n + 1))


@dataclass
class Broadcast:
    key: str
    data: bytes  # one encoded message
    transmits: int = 0
    seq: int = 0  # insertion order, newest wins ties


class BroadcastQueue:
    def __init__(self, retransmit_mult: int) -> None:
        self.retransmit_mult = retransmit_mult
        self._items: dict[str, Broadcast] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, key: str, data: bytes) -> None:
        """Add news; it replaces any queued news with the same key."""
        self._seq += 1
        self._items[key] = Broadcast(key, data, 0, self._seq)

    def pending(self, key: str) -> bool:
        return key in self._items

    def get(self, n: int, overhead: int, limit: int) -> list[bytes]:
        """Pick news that fits `limit` bytes, counting `overhead` per message; bumps transmits."""
        if not self._items:
            return []
        max_tx = retransmit_limit(self.retransmit_mult, n)
        out: list[bytes] = []
        used = 0
        order = sorted(self._items.values(), key=lambda b: (b.transmits, -len(b.data), -b.seq))
        for b in order:
            size = len(b.data) + overhead
            if used + size > limit:
                continue
            used += size
            out.append(b.data)
            b.transmits += 1
            if b.transmits >= max_tx:
                del self._items[b.key]
        return out

    def take_oversized(self, n: int, limit: int) -> list[bytes]:
        """News too large for any packet: it travels over TCP instead; bumps transmits."""
        max_tx = retransmit_limit(self.retransmit_mult, n)
        out = []
        for b in list(self._items.values()):
            if len(b.data) > limit:
                out.append(b.data)
                b.transmits += 1
                if b.transmits >= max_tx:
                    del self._items[b.key]
        return out
