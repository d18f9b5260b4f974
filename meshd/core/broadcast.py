"""The transmit-limited broadcast queue (memberlist queue.go).

Every piece of news is piggybacked on outgoing packets a limited number of times:
retransmit_mult * ceil(log10(n + 1)), enough for an epidemic to reach everyone with high
probability. Newer news about the same subject replaces the older one, so only the latest
state of a node is ever gossiped. Fewest-sent news goes first, larger first among equals
(the small ones fill the gaps), newest first among those.

No sort per packet: news sits in classes by (transmits, size), each a heap newest-first.
A packet walks the classes in the order above and takes whole runs of one class, so the
choice is exactly what sorting everything would give, at the cost of the classes visited
(transmit counts x distinct sizes: tens) rather than of all news queued. Replaced news
stays in its heap until it surfaces (lazy deletion; `_items` says what is current).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    return retransmit_mult * math.ceil(math.log10(n + 1))


@dataclass(eq=False)
class Broadcast:
    key: str
    data: bytes  # one encoded message
    transmits: int = 0
    seq: int = 0  # insertion order, newest wins ties


_Heap = list[tuple[int, Broadcast]]  # (-seq, item): newest on top


class BroadcastQueue:
    def __init__(self, retransmit_mult: int) -> None:
        self.retransmit_mult = retransmit_mult
        self._items: dict[str, Broadcast] = {}  # key -> current news: the only truth
        self._classes: dict[int, dict[int, _Heap]] = {}  # transmits -> size -> heap
        self._entries = 0  # heap entries, stale ones included (compacted when mostly stale)
        self._seq = 0

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, key: str, data: bytes) -> None:
        """Add news; it replaces any queued news with the same key."""
        self._seq += 1
        b = Broadcast(key, data, 0, self._seq)
        self._items[key] = b
        self._push(b)
        if self._entries > 2 * len(self._items) + 64:
            self._compact()

    def pending(self, key: str) -> bool:
        return key in self._items

    def _push(self, b: Broadcast) -> None:
        sizes = self._classes.setdefault(b.transmits, {})
        heapq.heappush(sizes.setdefault(len(b.data), []), (-b.seq, b))
        self._entries += 1

    def _live(self, b: Broadcast, transmits: int) -> bool:
        return self._items.get(b.key) is b and b.transmits == transmits

    def _compact(self) -> None:
        self._classes = {}
        self._entries = 0
        for b in self._items.values():
            self._push(b)

    def _sent(self, b: Broadcast, max_tx: int) -> None:
        b.transmits += 1
        if b.transmits >= max_tx:
            del self._items[b.key]
        else:
            self._push(b)

    def get(self, n: int, overhead: int, limit: int) -> list[bytes]:
        """Pick news that fits `limit` bytes, counting `overhead` per message; bumps transmits."""
        if not self._items:
            return []
        max_tx = retransmit_limit(self.retransmit_mult, n)
        out: list[bytes] = []
        taken: list[Broadcast] = []
        used = 0
        for tx in sorted(self._classes):
            sizes = self._classes[tx]
            for size in sorted(sizes, reverse=True):
                if used + size + overhead > limit:
                    continue
                heap = sizes[size]
                while heap and used + size + overhead <= limit:
                    _, b = heapq.heappop(heap)
                    self._entries -= 1
                    if not self._live(b, tx):
                        continue
                    used += size + overhead
                    out.append(b.data)
                    taken.append(b)
                if not heap:
                    del sizes[size]
            if not sizes:
                del self._classes[tx]
        # Moved up a class only now, so one packet never carries the same news twice.
        for b in taken:
            self._sent(b, max_tx)
        return out

    def take_oversized(self, n: int, limit: int) -> list[bytes]:
        """News too large for any packet: it travels over TCP instead; bumps transmits."""
        max_tx = retransmit_limit(self.retransmit_mult, n)
        big: list[Broadcast] = []
        for tx in sorted(self._classes):
            sizes = self._classes[tx]
            for size in [s for s in sizes if s > limit]:
                for _, b in sizes.pop(size):
                    self._entries -= 1
                    if self._live(b, tx):
                        big.append(b)
            if not sizes:
                del self._classes[tx]
        if big:  # rare (big news only): the items' order, as memberlist's scan gives
            chosen = {id(b) for b in big}
            big = [b for b in self._items.values() if id(b) in chosen]
        for b in big:
            self._sent(b, max_tx)
        return [b.data for b in big]
