"""Per-bucket digests of a member table: anti-entropy that costs the difference, not the size.

A full push-pull sends every record both ways; at 10,000 members that is ~700 KB per exchange
and most of a node's bandwidth. Instead each node keeps B = 2^bits sums, one per bucket, kept
current on every change of its table (O(1) each). A member's bucket is the top `bits` bits of a
stable 64-bit hash of its name; the bucket's value is the sum mod 2^64 of a mixed value of
(name, incarnation, state) over its members. Two peers compare digests, and only the records
of the buckets that differ travel (proto/PROTOCOL.md 4.5).

Top bits plus an additive combine mean a digest of 2^b buckets folds into one of 2^c (c < b)
by summing runs of 2^(b-c) adjacent buckets: peers with different bucket counts compare at
the smaller one. Sums, not XOR: the same entry twice does not cancel out.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Iterable, Sequence

MASK = (1 << 64) - 1
MAX_BUCKETS = 4096
MAX_BITS = MAX_BUCKETS.bit_length() - 1
MEMBERS_PER_BUCKET = 8  # B ~ N/8: one differing member costs ~8 records, a digest ~1 byte/member


def name_hash(name: str) -> int:
    """Stable across processes and machines (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def entry(h: int, incarnation: int, state: int) -> int:
    """A member's contribution: splitmix64's finalizer over (name hash, incarnation, state)."""
    z = (h ^ (incarnation * 0x9E3779B97F4A7C15) ^ ((state + 1) * 0xD1B54A32D192ED03)) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def bits_for(n: int) -> int:
    """log2 of the bucket count fitting n members: a power of two <= n/8, in [1, MAX_BUCKETS]."""
    return min(max(n // MEMBERS_PER_BUCKET, 1).bit_length() - 1, MAX_BITS)


def bits_of(count: int) -> int | None:
    """log2(count) when count is a power of two in [1, MAX_BUCKETS], else None (hostile input)."""
    if not 1 <= count <= MAX_BUCKETS or count & (count - 1):
        return None
    return count.bit_length() - 1


def bucket(h: int, bits: int) -> int:
    return h >> (64 - bits)


def fold(values: Sequence[int], bits: int) -> list[int]:
    """`values` (2^b buckets, b >= bits) summed down to 2^bits buckets. O(len(values))."""
    run = len(values) >> bits
    if run == 1:
        return list(values)
    return [sum(values[i : i + run]) & MASK for i in range(0, len(values), run)]


def differing(mine: Sequence[int], theirs: Sequence[int]) -> list[int]:
    """Indices of the buckets that differ, at the coarser of the two resolutions."""
    bits = min(len(mine), len(theirs)).bit_length() - 1
    a, b = fold(mine, bits), fold(theirs, bits)
    return [i for i in range(len(a)) if a[i] != b[i]]


def to_bytes(values: array[int]) -> bytes:
    """Big-endian u64s, the wire form (PushPullDigest.buckets)."""
    if sys.byteorder == "little":
        values = array("Q", values)
        values.byteswap()
    return values.tobytes()


def from_bytes(data: bytes) -> array[int] | None:
    """The bucket values of a wire digest; None unless 8 * a power of two <= MAX_BUCKETS bytes."""
    if len(data) % 8 or bits_of(len(data) // 8) is None:
        return None
    values = array("Q")
    values.frombytes(data)
    if sys.byteorder == "little":
        values.byteswap()
    return values


class TableDigest:
    """The bucket sums of one member table (array('Q'): 8 bytes a bucket, <= 32 KiB)."""

    __slots__ = ("bits", "values")

    def __init__(self, bits: int = 0) -> None:
        self.bits = bits
        self.values = array("Q", bytes(8 << bits))

    @property
    def count(self) -> int:
        return len(self.values)

    def add(self, h: int, value: int) -> None:
        i = h >> (64 - self.bits)
        self.values[i] = (self.values[i] + value) & MASK

    def remove(self, h: int, value: int) -> None:
        i = h >> (64 - self.bits)
        self.values[i] = (self.values[i] - value) & MASK

    def needs_resize(self, n: int) -> bool:
        """Grow once n calls for more buckets, shrink only at a quarter (no flapping at a
        boundary): rebuilds are O(n) and at least n/2 changes apart, O(1) amortized."""
        want = bits_for(n)
        return want > self.bits or want < self.bits - 1

    def rebuild(self, n: int, entries: Iterable[tuple[int, int]]) -> None:
        """Recompute from scratch for n members: (name hash, entry value) of each."""
        self.bits = bits_for(n)
        shift = 64 - self.bits
        acc = [0] * (1 << self.bits)  # plain ints, masked once at the end: a bulk load's hot loop
        for h, value in entries:
            acc[h >> shift] += value
        self.values = array("Q", [v & MASK for v in acc])
