"""The site cache's decisions, sans-IO: who in the site fetches a blob, what a node advertises,
and which cached blobs go first when the cache is over its cap.

A blob asked for at a site that no node there has is fetched from upstream once for the site:

1. a site member that advertises the blob (`ociblobs` in its metadata) serves it (PEER);
2. else a site member that holds a lease on it (`ocifetch:<hex12>`: it is fetching it now) is
   asked to serve it when done: the ask joins its one fetch (JOIN). A lease older than the lease
   timeout (as this node saw it) is no longer waited for;
3. else the owner, the alive site member that rendezvous hashing of the digest picks, is asked
   to fetch it (ASK_OWNER): every node with the same view picks the same owner, no round trip;
4. else (this node is the owner, or the owners it asked failed): this node fetches it from
   upstream itself (UPSTREAM), under a lease.

A peer that failed (unreachable, or served bytes that are not the digest) is left out of the next
plan for that digest. Digests are the trust: a false advertisement costs a 404 and a fallback.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

ADVERT_KEY = "ociblobs"  # base64 of 8-byte digest prefixes, most recently used first
SUMMARY_KEY = "ocicache"  # "<blobs> <bytes>" the node's cache holds (meshctl images)
LEASE_PREFIX = "ocifetch:"  # ocifetch:<first 12 hex of the digest> = "1" while fetching upstream
PREFIX_BYTES = 8
MAX_ADVERTISED = 512  # 4 KiB of prefixes, 5.4 KiB of base64: far below the member meta limit
MAX_LEASES = 64  # keys of a member read as leases, at most
LEASE_HEX = 12
DEFAULT_LEASE_TIMEOUT = 30.0
DEFAULT_MAX_ASKS = 3  # peers asked (holders, lease holders, owners) before going upstream

_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")


def digest_hex(digest: str) -> str | None:
    """The hex of a sha256 digest, None for anything else."""
    m = _DIGEST_RE.match(digest)
    return m.group(1) if m else None


def _prefix(digest: str) -> bytes:
    hexd = digest_hex(digest)
    if hexd is None:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return bytes.fromhex(hexd[: 2 * PREFIX_BYTES])


# --- advertisements ---------------------------------------------------------------------------


def encode_advert(digests: Iterable[str]) -> str:
    """The `ociblobs` value for these digests (most recently used first; the first
    MAX_ADVERTISED kept)."""
    out: list[bytes] = []
    for d in digests:
        if len(out) >= MAX_ADVERTISED:
            break
        out.append(_prefix(d))
    return base64.b64encode(b"".join(out)).decode("ascii")


_MAX_ADVERT_CHARS = 4 * ((MAX_ADVERTISED * PREFIX_BYTES + 2) // 3)


def decode_advert(value: object) -> frozenset[bytes]:
    """The digest prefixes a member advertises; empty for anything malformed or oversized."""
    if not isinstance(value, str) or len(value) > _MAX_ADVERT_CHARS:
        return frozenset()
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return frozenset()
    if len(raw) % PREFIX_BYTES:
        return frozenset()
    return frozenset(raw[i : i + PREFIX_BYTES] for i in range(0, len(raw), PREFIX_BYTES))


def advertises(prefixes: frozenset[bytes], digest: str) -> bool:
    return _prefix(digest) in prefixes


def encode_summary(blobs: int, nbytes: int) -> str:
    return f"{blobs} {nbytes}"


_SUMMARY_RE = re.compile(r"^([0-9]{1,12}) ([0-9]{1,18})$")


def decode_summary(value: object) -> tuple[int, int] | None:
    """(blobs, bytes) from an `ocicache` value; None for anything malformed."""
    m = _SUMMARY_RE.match(value) if isinstance(value, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


# --- leases -----------------------------------------------------------------------------------


def lease_key(digest: str) -> str:
    hexd = digest_hex(digest)
    if hexd is None:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return LEASE_PREFIX + hexd[:LEASE_HEX]


_LEASE_RE = re.compile(rf"^{LEASE_PREFIX}[0-9a-f]{{{LEASE_HEX}}}$")


def decode_leases(meta: Mapping[str, str]) -> frozenset[str]:
    """The lease keys in a member's metadata (at most MAX_LEASES; malformed ones skipped)."""
    keys = sorted(k for k in meta if k.startswith(LEASE_PREFIX) and _LEASE_RE.match(k))
    return frozenset(keys[:MAX_LEASES])


# --- members and the owner --------------------------------------------------------------------


@dataclass(frozen=True)
class SiteMember:
    """Another node of this node's site as its membership entry describes it."""

    name: str
    addr: str
    node_id: str = ""
    alive: bool = True
    blobs: frozenset[bytes] = frozenset()
    leases: frozenset[str] = frozenset()

    @classmethod
    def from_meta(
        cls, name: str, addr: str, node_id: str, alive: bool, meta: Mapping[str, str]
    ) -> SiteMember:
        if not alive:
            return cls(name, addr, node_id, False)
        return cls(name, addr, node_id, True, decode_advert(meta.get(ADVERT_KEY)), decode_leases(meta))


def _score(digest: str, name: str) -> bytes:
    return hashlib.sha256(f"{digest}\0{name}".encode()).digest()


def rendezvous_order(digest: str, names: Iterable[str]) -> list[str]:
    """Names by their rendezvous score for `digest`, highest first (the same on every node)."""
    return sorted(set(names), key=lambda n: _score(digest, n), reverse=True)


def rendezvous_owner(digest: str, names: Iterable[str]) -> str | None:
    order = rendezvous_order(digest, names)
    return order[0] if order else None


class Step(Enum):
    PEER = "peer"  # fetch it from a holder (no upstream work asked of it)
    JOIN = "join"  # ask a lease holder: it is fetching it now
    ASK_OWNER = "ask_owner"  # ask the owner to fetch it (or serve it: it may hold it)
    UPSTREAM = "upstream"  # fetch it from upstream here
    GIVE_UP = "give_up"  # nowhere left: a 404 (containerd goes upstream itself)


@dataclass(frozen=True)
class Plan:
    step: Step
    peer: SiteMember | None = None


@dataclass
class Attempt:
    """What one fetch of a digest has tried: peers that failed, leases first seen when."""

    failed: set[str] = field(default_factory=set)
    asks: int = 0
    lease_seen: dict[str, float] = field(default_factory=dict)  # member -> when its lease was first seen


def plan(
    digest: str,
    me: str,
    site: Sequence[SiteMember],
    attempt: Attempt,
    now: float,
    *,
    have_upstream: bool,
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
    max_asks: int = DEFAULT_MAX_ASKS,
) -> Plan:
    """The next thing to try for `digest` (see the module's docstring). `site`: the other
    members of this node's site (dead ones may be in it: they are skipped)."""
    alive = [m for m in site if m.alive and m.name != me]
    usable = [m for m in alive if m.name not in attempt.failed]
    if attempt.asks < max_asks:
        holders = [m for m in usable if advertises(m.blobs, digest)]
        if holders:  # spread over holders the same way every node does
            order = rendezvous_order(digest, [m.name for m in holders])
            return Plan(Step.PEER, next(m for m in holders if m.name == order[0]))
        key = lease_key(digest)
        for m in sorted(usable, key=lambda m: m.name):
            if key in m.leases:
                seen = attempt.lease_seen.setdefault(m.name, now)
                if now - seen < lease_timeout:
                    return Plan(Step.JOIN, m)
        if have_upstream:
            owner = rendezvous_owner(digest, [me, *(m.name for m in alive)])
            if owner != me and owner not in attempt.failed:
                return Plan(Step.ASK_OWNER, next(m for m in alive if m.name == owner))
    return Plan(Step.UPSTREAM) if have_upstream else Plan(Step.GIVE_UP)


def pick_upstream(upstreams: Sequence[str], ns: str | None) -> str | None:
    """The upstream URL whose host[:port] is `ns` (containerd's ?ns= on mirror requests: the
    registry the image is from), else the first. docker.io is registry-1.docker.io."""
    if not upstreams:
        return None
    if ns:
        wanted = {ns.lower(), "registry-1.docker.io" if ns.lower() == "docker.io" else ns.lower()}
        for url in upstreams:
            host = url.split("://", 1)[-1].split("/", 1)[0].lower()
            if host in wanted:
                return url
    return upstreams[0]


# --- the cache's order and cap ----------------------------------------------------------------


class CacheIndex:
    """Cached blobs by digest with their sizes, least recently used first."""

    def __init__(self) -> None:
        self._lru: OrderedDict[str, int] = OrderedDict()
        self.total = 0

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, digest: object) -> bool:
        return digest in self._lru

    def size(self, digest: str) -> int | None:
        return self._lru.get(digest)

    def add(self, digest: str, size: int) -> None:
        self.remove(digest)
        self._lru[digest] = size
        self.total += size

    def touch(self, digest: str) -> None:
        if digest in self._lru:
            self._lru.move_to_end(digest)

    def remove(self, digest: str) -> None:
        size = self._lru.pop(digest, None)
        if size is not None:
            self.total -= size

    def recent(self, n: int) -> list[str]:
        """The `n` most recently used digests, newest first."""
        out: list[str] = []
        for d in reversed(self._lru):
            if len(out) >= n:
                break
            out.append(d)
        return out

    def victims(self, cap: int, keep: Iterable[str] = ()) -> list[str]:
        """Least recently used first, until the rest fits in `cap` bytes; `keep` (in use now)
        never goes."""
        kept = set(keep)
        over = self.total - cap
        out = []
        for d, size in self._lru.items():
            if over <= 0:
                break
            if d in kept:
                continue
            out.append(d)
            over -= size
        return out


__all__ = [
    "ADVERT_KEY",
    "LEASE_PREFIX",
    "SUMMARY_KEY",
    "Attempt",
    "CacheIndex",
    "Plan",
    "SiteMember",
    "Step",
    "advertises",
    "decode_advert",
    "decode_leases",
    "decode_summary",
    "digest_hex",
    "encode_advert",
    "encode_summary",
    "lease_key",
    "pick_upstream",
    "plan",
    "rendezvous_order",
    "rendezvous_owner",
]
