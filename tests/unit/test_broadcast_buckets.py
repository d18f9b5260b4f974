"""The bucketed broadcast queue picks exactly what sorting all news per packet picked."""

import random

from meshd.core.broadcast import BroadcastQueue, retransmit_limit


class SortedQueue:
    """The former queue: every packet sorts all news (fewest transmits, larger, newer first)."""

    def __init__(self, mult: int) -> None:
        self.mult = mult
        self.items: dict[str, list] = {}
        self.seq = 0

    def queue(self, key: str, data: bytes) -> None:
        self.seq += 1
        self.items[key] = [key, data, 0, self.seq]

    def get(self, n: int, overhead: int, limit: int) -> list[bytes]:
        max_tx = retransmit_limit(self.mult, n)
        out, used = [], 0
        for b in sorted(self.items.values(), key=lambda b: (b[2], -len(b[1]), -b[3])):
            if used + len(b[1]) + overhead > limit:
                continue
            used += len(b[1]) + overhead
            out.append(b[1])
            b[2] += 1
            if b[2] >= max_tx:
                del self.items[b[0]]
        return out

    def take_oversized(self, n: int, limit: int) -> list[bytes]:
        max_tx = retransmit_limit(self.mult, n)
        out = []
        for b in list(self.items.values()):
            if len(b[1]) > limit:
                out.append(b[1])
                b[2] += 1
                if b[2] >= max_tx:
                    del self.items[b[0]]
        return out


def test_ordering_fewest_sent_then_larger_then_newest() -> None:
    q = BroadcastQueue(1)
    q.queue("a", b"a" * 10)
    q.queue("b", b"b" * 30)
    q.queue("c", b"c" * 10)
    # Larger first; among equal sizes the newer one.
    assert q.get(1000, 0, 1000) == [b"b" * 30, b"c" * 10, b"a" * 10]
    q.queue("d", b"d" * 5)
    # Never-sent news goes before news sent once, however small it is.
    assert q.get(1000, 0, 5) == [b"d" * 5]


def test_small_news_fills_the_gap_a_large_one_leaves() -> None:
    q = BroadcastQueue(1)
    q.queue("big", b"x" * 40)
    q.queue("small", b"y" * 8)
    assert q.get(1000, 2, 20) == [b"y" * 8]
    assert len(q) == 2  # the big one waits (limit is 3 transmits at n=1000: 1 * 3)


def test_replaced_news_is_never_sent() -> None:
    q = BroadcastQueue(4)
    q.queue("m:a", b"old")
    q.queue("m:a", b"new!")
    assert q.get(10, 0, 100) == [b"new!"]
    assert q.pending("m:a")


def test_identical_to_sorting_on_random_workloads() -> None:
    for seed in range(200):
        r = random.Random(seed)
        new, ref = BroadcastQueue(2), SortedQueue(2)
        for _ in range(300):
            op = r.random()
            if op < 0.5:
                key, data = f"k{r.randrange(20)}", bytes(r.choice([10, 20, 30, 45, 200]))
                new.queue(key, data)
                ref.queue(key, data)
            elif op < 0.9:
                n, overhead, limit = r.randrange(1, 500), r.randrange(3), r.randrange(150)
                assert new.get(n, overhead, limit) == ref.get(n, overhead, limit), seed
            else:
                n, limit = r.randrange(1, 500), r.randrange(20, 150)
                assert new.take_oversized(n, limit) == ref.take_oversized(n, limit), seed
            assert len(new) == len(ref.items)


def test_stale_entries_are_compacted() -> None:
    q = BroadcastQueue(4)
    for i in range(10_000):
        q.queue("m:same", str(i).encode())
    assert q._entries <= 2 * len(q) + 65
