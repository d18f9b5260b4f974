"""Release announcements in member metadata: the `rel:` entries, and a member as they describe it.

Gossip carries small facts only. Each node sets, one key per release name,

    rel:<name> = "<version> <release id[:16]> <have>/<total> #<seq>[ current]"[;...]

one entry per release of that name it holds or is fetching (the newest MAX_ENTRIES_PER_NAME),
refreshed at most every `announce_interval` while downloading (Announcer). `seq` is the signed
manifest's (core/adoption.py orders releases by it), so a node can tell which release of a name
is the newest before it fetches any manifest; an entry without it (meshd before seq) reads as 0.
OfferIndex gathers every member's entries by name for the intake to pick from.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import re
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field

from meshd.core.adoption import Offer, release_order
from meshd.core.messages import MemberState
from meshd.core.node import MemberView
from meshd.release.manifest import Manifest

log = logging.getLogger("meshd.release")

META_PREFIX = "rel:"
BITMAP_PREFIX = "relbm:"  # relbm:<release id[:16]> = base64 have-bitmap, while fetching
RID_PREFIX = 16
MAX_ENTRIES_PER_NAME = 16
# A have-bitmap rides the gossip for releases of up to this many chunks (256 bytes, 344 base64
# characters): peers then learn what we hold with the announcement itself, instead of polling
# every partial holder over HTTP each second (at 16 hosts, nine requests in ten were those
# polls). Larger releases are still polled.
MAX_GOSSIP_BITMAP_CHUNKS = 2048

# Progress announcements the mesh carries per second, at most, over all fetching nodes: each
# one is gossiped to and handled by every node, so a fixed per-node interval made every node's
# cost grow with the square of the number fetching. With more fetching than this, each one
# announces less often (32 fetching: every 4 s). At 32 hosts on 2 cores, 8 a second instead
# of 16 took the median time from 25 s to 21 s (3 and 4 runs) at the same origin egress
# (1.10x): half the metadata updates for every node to decode and judge.
PROGRESS_RATE = 8.0

SetMetaKeys = Callable[[dict[str, str | None]], None]  # key -> value, None: remove the key


@dataclass(frozen=True)
class Announce:
    name: str
    version: str
    rid16: str
    have: int
    total: int
    current: bool = False
    seq: int = 0

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.have >= self.total

    def text(self) -> str:
        head = f"{self.version} {self.rid16} {self.have}/{self.total} #{self.seq}"
        return head + (" current" if self.current else "")


_RID16_RE = re.compile(r"^[0-9a-f]{16}$")
_ANN_RE = re.compile(r"^(\S{1,128}) ([0-9a-f]{16}) ([0-9]{1,9})/([0-9]{1,9})(?: #([0-9]{1,16}))?( current)?$")


def parse_announcements(meta: Mapping[str, str]) -> dict[str, Announce]:
    """rid16 -> Announce from a member's metadata; malformed entries are skipped."""
    out: dict[str, Announce] = {}
    for key, value in meta.items():
        if not key.startswith(META_PREFIX) or not isinstance(value, str):
            continue
        name = key[len(META_PREFIX) :]
        for item in value.split(";")[:MAX_ENTRIES_PER_NAME]:
            m = _ANN_RE.match(item.strip())
            if m is None:
                continue
            have, total = int(m.group(3)), int(m.group(4))
            if have > total:
                continue
            seq = int(m.group(5) or 0)
            out[m.group(2)] = Announce(name, m.group(1), m.group(2), have, total, bool(m.group(6)), seq)
    return out


def format_announcements(
    manifests: Iterable[Manifest],
    have: Callable[[str], int],
    current_version: Callable[[str], str | None],
    complete: Container[str],
) -> dict[str, str]:
    """The `rel:` keys of this node: `have(release id)` chunks held, `current_version(name)`
    installed as current, `complete` the release ids held whole."""
    by_name: dict[str, list[Manifest]] = {}
    for m in manifests:
        by_name.setdefault(m.name, []).append(m)
    out: dict[str, str] = {}
    for name, ms in by_name.items():
        current = current_version(name)
        ms.sort(key=release_order)
        entries = [
            Announce(
                name,
                m.version,
                m.release_id[:RID_PREFIX],
                have(m.release_id),
                len(m.chunks),
                m.version == current and m.release_id in complete,
                m.seq,
            ).text()
            for m in ms[-MAX_ENTRIES_PER_NAME:]
        ]
        out[META_PREFIX + name] = ";".join(entries)
    return out


def format_bitmaps(bitmaps: Mapping[str, bytes]) -> dict[str, str]:
    """The `relbm:` keys for {release id: have-bitmap} (releases too large are left out)."""
    return {
        BITMAP_PREFIX + rid[:RID_PREFIX]: base64.b64encode(bm).decode("ascii")
        for rid, bm in bitmaps.items()
        if len(bm) <= (MAX_GOSSIP_BITMAP_CHUNKS + 7) // 8
    }


def parse_bitmaps(meta: Mapping[str, str]) -> dict[str, bytes]:
    """rid16 -> have-bitmap from a member's metadata; malformed or oversized ones are skipped
    (the swarm checks each bitmap's length and padding against the manifest again)."""
    out: dict[str, bytes] = {}
    limit = 4 * ((MAX_GOSSIP_BITMAP_CHUNKS + 7) // 8 + 2) // 3
    for key, value in meta.items():
        if not key.startswith(BITMAP_PREFIX) or not isinstance(value, str) or len(value) > limit:
            continue
        rid16 = key[len(BITMAP_PREFIX) :]
        if not _RID16_RE.match(rid16):
            continue
        try:
            out[rid16] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
    return out


class Announcer:
    """Keeps this node's `rel:` entries in its metadata: at once when forced (a release completed
    or changed state), otherwise at most once per `interval` (progress while downloading)."""

    def __init__(
        self,
        set_meta_keys: SetMetaKeys | None,
        interval: float | Callable[[], float],
        wanted: Callable[[], dict[str, str]],
        now: Callable[[], float],
    ) -> None:
        self.set_meta_keys = set_meta_keys
        self.interval = interval
        self._wanted = wanted
        self._now = now
        self._announced: dict[str, str] = {}
        self._at = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self.running = False  # from the service's start() to its stop()

    def announce(self, force: bool = False) -> None:
        if self.set_meta_keys is None or not self.running:
            return
        wanted = self._wanted()
        if wanted == self._announced:
            return
        now = self._now()
        interval = self.interval() if callable(self.interval) else self.interval
        wait = self._at + interval - now
        if not force and wait > 0:
            if self._handle is None:
                self._handle = asyncio.get_running_loop().call_later(wait, self._later)
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        updates: dict[str, str | None] = {k: v for k, v in wanted.items() if self._announced.get(k) != v}
        updates.update({k: None for k in self._announced if k not in wanted})
        self._announced = wanted
        self._at = now
        try:
            self.set_meta_keys(updates)
        except Exception:
            log.exception("cannot update node metadata")

    def _later(self) -> None:
        self._handle = None
        self.announce(force=True)

    def close(self) -> None:
        self.running = False
        if self._handle is not None:
            self._handle.cancel()


def progress_interval(base: float, fetching: int) -> float:
    """How often a fetching node announces its progress when `fetching` nodes (itself
    included) do: `base`, or less often, so that all of them make PROGRESS_RATE per second."""
    return max(base, fetching / PROGRESS_RATE)


class OfferIndex:
    """Every release the members announce, by name: the intake picks the newest from it.

    Kept up to date member by member, so one member's update costs its own entries only."""

    def __init__(self) -> None:
        self._by_member: dict[str, dict[str, Announce]] = {}
        self._by_name: dict[str, dict[str, dict[str, Announce]]] = {}  # name -> rid16 -> member -> entry
        self._top_seq: dict[str, int] = {}  # name -> highest seq ever announced (a member may leave)

    def update(self, member: str, entries: Mapping[str, Announce]) -> set[str]:
        """Replace what `member` announces; returns the release names whose offers changed.

        Progress alone (more chunks held, some held before) changes no offer: the intake
        tells only "nothing yet" from "some" (core/adoption.py). Every fetching member
        announces progress each second, and judging its names again on each cost every node
        a pass over all holders per announcement."""
        old = self._by_member.pop(member, {})
        touched: set[str] = set()
        for rid16, entry in old.items():
            new = entries.get(rid16)
            if new == entry:
                continue
            if not _progress_only(entry, new):
                touched.add(entry.name)
            holders = self._by_name[entry.name][rid16]
            del holders[member]
            if not holders:
                del self._by_name[entry.name][rid16]
                if not self._by_name[entry.name]:
                    del self._by_name[entry.name]
        for rid16, entry in entries.items():
            before = old.get(rid16)
            if before != entry:
                if not _progress_only(before, entry):
                    touched.add(entry.name)
                self._by_name.setdefault(entry.name, {}).setdefault(rid16, {})[member] = entry
                self._top_seq[entry.name] = max(self._top_seq.get(entry.name, 0), entry.seq)
        if entries:
            self._by_member[member] = dict(entries)
        return touched

    def names(self) -> list[str]:
        return list(self._by_name)

    def offers(self, name: str) -> list[Offer]:
        """One offer per release of `name`: its version and seq as announced (the manifest
        decides in the end), and the most chunks any member holds."""
        out = []
        for rid16, holders in self._by_name.get(name, {}).items():
            first = next(iter(holders.values()))
            have = max(e.have for e in holders.values())
            out.append(Offer(name, first.version, max(e.seq for e in holders.values()), rid16, have))
        return out

    def holders(self, name: str, rid16: str) -> list[str]:
        """Members announcing chunks of `rid16`, most chunks first."""
        holders = self._by_name.get(name, {}).get(rid16, {})
        return [m for m, e in sorted(holders.items(), key=lambda kv: (-kv[1].have, kv[0])) if e.have > 0]

    def max_seq(self, name: str) -> int:
        """The highest seq ever announced for `name`, by members here or gone since: a release
        published here takes one above it even when every holder of the newest is down."""
        return self._top_seq.get(name, 0)


def _progress_only(old: Announce | None, new: Announce | None) -> bool:
    """The entry changed in the chunks held only, and held some before and after."""
    if old is None or new is None or old.have == 0 or new.have == 0:
        return False
    return dataclasses.replace(old, have=new.have) == new


def member_meta_keys(meta: Mapping[str, str]) -> list[str]:
    """The metadata keys this service owns in a node's meta (for the daemon's merge)."""
    return [k for k in meta if k.startswith(META_PREFIX)]


@dataclass
class Member:
    """Another node as its membership entry and metadata describe it to the release service."""

    name: str
    addr: str
    site: str
    # Alive or suspect: still a member. Lifeguard's suspicion is most often a busy node (32
    # hosts fetching on 2 cores suspected a few at a time); dropping a suspect from the swarm
    # and the site's share group dealt every share again and sent the scarce source the same
    # chunks twice (origin egress 1.76x). Dead or left members are down.
    up: bool
    entries: dict[str, Announce]  # rid16 -> what it announces (empty unless up)
    tags: dict[str, str] = field(default_factory=dict)
    node_id: str = ""  # names it as the receiver of what we seal for it
    bitmaps: dict[str, bytes] = field(default_factory=dict)  # rid16 -> have-bitmap it gossips

    @classmethod
    def from_view(cls, m: MemberView) -> Member:
        up = m.state in (MemberState.ALIVE, MemberState.SUSPECT)
        meta = m.meta or {}
        tags = {k[4:]: v for k, v in meta.items() if k.startswith("tag:")}
        return cls(
            m.name,
            m.addr,
            meta.get("site", "default"),
            up,
            parse_announcements(meta) if up else {},
            tags,
            m.node_id,
            parse_bitmaps(meta) if up else {},
        )
