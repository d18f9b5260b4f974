"""Shared, immutable member records and the pool that interns them.

A member's identity (name, node id, address, incarnation, metadata) is the same in every
table that lists it; only its state there (alive, suspect, ...) and when that changed are
the table's own. So records are frozen and interned: a Node keeps one record object per
distinct member version, and nodes that share a pool (the simulator gives one pool to all
of them) share it too. A member table then costs a reference and two fields per member
instead of a copy of every name, address and metadata dict.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from meshd.core.digest import entry, name_hash

MAX_CACHED_METAS = 4096  # distinct metadata dicts kept for sharing; a cache, cleared when full


class FrozenMeta(dict[str, str]):
    """Metadata that cannot change after it is made (a dict, so the wire encodes it as one)."""

    __slots__ = ()

    def _frozen(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("member metadata is shared and immutable: copy it with dict(meta)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _frozen
    __ior__ = _frozen

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))


@dataclass(frozen=True, slots=True, weakref_slot=True, eq=False)
class MemberRecord:
    """One version of a member as the mesh announces it; compare fields, not objects."""

    name: str
    node_id: str
    addr: str
    incarnation: int
    meta: FrozenMeta
    pool: object = field(default=None, repr=False)  # the pool's token: adopt()'s fast path
    protocol: int = 1  # the highest protocol version the member announced (Alive.protocol)
    # Digest inputs (meshd.core.digest), computed once per record rather than once per table:
    # the stable hash of the name, and the member's digest value when alive (the usual state).
    name_hash: int = field(init=False, repr=False, default=0)
    alive_mix: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        h = name_hash(self.name)
        object.__setattr__(self, "name_hash", h)
        object.__setattr__(self, "alive_mix", entry(h, self.incarnation, 0))


def _meta_key(meta: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(meta.items()))


class RecordPool:
    """Interns records: equal field values give the same object while anyone holds it."""

    def __init__(self) -> None:
        self._records: weakref.WeakValueDictionary[tuple[Any, ...], MemberRecord] = (
            weakref.WeakValueDictionary()
        )
        self._metas: dict[tuple[tuple[str, str], ...], FrozenMeta] = {}
        self._token = object()  # marks the records made here (8 bytes per record, not per member)

    def meta(self, meta: Mapping[str, str]) -> FrozenMeta:
        key = _meta_key(meta)
        found = self._metas.get(key)
        if found is None:
            if len(self._metas) >= MAX_CACHED_METAS:
                self._metas.clear()
            found = self._metas[key] = FrozenMeta(meta)
        return found

    def record(
        self,
        name: str,
        node_id: str,
        addr: str,
        incarnation: int,
        meta: Mapping[str, str],
        protocol: int = 1,
    ) -> MemberRecord:
        key = (name, node_id, addr, incarnation, _meta_key(meta), protocol)
        rec = self._records.get(key)
        if rec is None:
            rec = MemberRecord(name, node_id, addr, incarnation, self.meta(meta), self._token, protocol)
            self._records[key] = rec
        return rec

    def adopt(self, rec: MemberRecord) -> MemberRecord:
        """The pool's record equal to `rec` (itself when it came from this pool)."""
        if rec.pool is self._token:
            return rec
        return self.record(rec.name, rec.node_id, rec.addr, rec.incarnation, rec.meta, rec.protocol)

    def with_incarnation(self, rec: MemberRecord, incarnation: int) -> MemberRecord:
        if rec.incarnation == incarnation:
            return rec
        return self.record(rec.name, rec.node_id, rec.addr, incarnation, rec.meta, rec.protocol)

    def __len__(self) -> int:
        return len(self._records)


def records(
    pool: RecordPool, members: Iterable[tuple[str, str, str, int, Mapping[str, str]]]
) -> list[MemberRecord]:
    """Records for (name, node_id, addr, incarnation, meta) tuples, interned in `pool`."""
    return [pool.record(*m) for m in members]
