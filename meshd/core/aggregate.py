"""Aggregated queries: each site's answers are gathered inside the site, one summary comes back.

Sans-IO, like meshd.core.query (which drives these pieces): no clock, no sockets, no random.

A Query with `aggregate="site"` is answered per site (Astrolabe-style hierarchical
aggregation, one level):

* Each site has one *aggregator*: the rendezvous choice (highest `score(id, ltime, name)`)
  among the ALIVE members of that site in the chooser's own view, and a *backup* (the second
  highest). Views mostly agree, so the origin, the aggregator and the members mostly pick the
  same nodes; when they do not, two nodes aggregate one site and the origin merges them
  exactly (answers are named).
* The origin sends the query straight to each site's aggregator and backup besides the usual
  gossip; they send it straight to their site's members (one hop).
* A matching node answers its site's aggregator and backup (a Relay whose `dest` is the
  origin, so a node that does not aggregate passes it on to the origin unchanged; one that
  has not seen the query yet holds it briefly first). The aggregator collects its
  site's answers until every member it expects answered (or is down) or its gather window
  (`GATHER_FRACTION` of the query timeout) ends, and sends ONE SiteSummary to the origin:
  the reducer's output over the answers, the names it covers, and the missing names
  (expected but silent, and the site's SUSPECT/DEAD matches it knows of).
  It sends a copy to the backup, which then stands down; a backup that saw no summary from
  the aggregator by `BACKUP_FRACTION` of the timeout sends its own (the aggregator died before
  the mesh noticed: the site costs time, not its answers).
* Summarising is application knowledge: the engine takes a pure `Reducer(query name,
  [(name, payload)]) -> bytes` from the shell. For an exact merge the reducer's output must
  say something per name that the answered names complete (health: the non-passing nodes;
  every other answered name passed).

What a peer sends is bounded, each breach a counted drop (`OriginSites.accept`): a summary for
an unknown query or site, from a node that is not a member of that site, a second one from the
same source, or one bigger than a single answer may be. Names a summary claims that the origin
knows in another site are stripped, and a name counts once however many summaries carry it.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from meshd.core.messages import MemberState, Query, SiteSummary

AGGREGATE_SITE: Final = "site"
AGGREGATES: Final = frozenset({AGGREGATE_SITE})
GATHER_FRACTION: Final = 0.4  # of the query timeout: the rest carries the summary and slack
BACKUP_FRACTION: Final = 0.55  # the backup aggregator speaks up after this, if the primary did not
MAX_SUMMARY_NAMES: Final = 4096  # names one summary may carry (answered + missing)

Reducer = Callable[[str, Sequence[tuple[str, bytes]]], bytes]
"""(query name, [(node name, answer payload)]) -> the site's summary payload."""


def raw_reducer(query: str, answers: Sequence[tuple[str, bytes]]) -> bytes:
    """No reduction: every answer, named (msgpack [[name, payload], ...]); the default."""
    return msgspec.msgpack.encode([[name, payload] for name, payload in answers])


def score(query_id: int, ltime: int, name: str) -> int:
    """Rendezvous weight of `name` for one query: every node computes the same."""
    digest = hashlib.blake2b(f"{query_id}:{ltime}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def pick_aggregators(query_id: int, ltime: int, names: Iterable[str], k: int = 2) -> list[str]:
    """The `k` best-scored of `names` (the alive members of one site), best first: the
    aggregator, then its backup."""
    ranked = sorted(((score(query_id, ltime, n), n) for n in names), reverse=True)
    return [n for _, n in ranked[:k]]


def pick_aggregator(query_id: int, ltime: int, names: Iterable[str]) -> str | None:
    """The aggregator among `names` (the alive members of one site), None when there are none."""
    best = pick_aggregators(query_id, ltime, names, 1)
    return best[0] if best else None


@dataclass(frozen=True)
class SiteMember:
    """A member of this node's own site as this node sees it (the node builds these)."""

    name: str
    addr: str
    state: MemberState
    tags: Mapping[str, str]


# --- the aggregator's side ---------------------------------------------------------------------


class GatherVerdict(enum.Enum):
    FOREIGN = "foreign"  # not a member of this site here: pass it on to the origin instead
    LATE = "late"  # the summary already went: pass it on to the origin instead
    DUPLICATE = "duplicate"
    ACCEPTED = "accepted"


@dataclass
class Gather:
    """One site's answers to one aggregated query, collected by its aggregator."""

    query: Query
    site: str
    members: frozenset[str]  # every member of the site in our view: who may answer here
    expected: frozenset[str]  # alive and suspect matching members: whom we wait for
    down: set[str]  # dead matching members (or gone dead since): missing unless they answer anyway
    deadline: float  # the end of the gather window
    answers: dict[str, bytes] = field(default_factory=dict)
    sent: bool = False  # or, for a backup, the primary's summary seen: nothing to send
    primary: str = ""  # set on a backup: the aggregator whose summary makes ours unneeded

    def add(self, name: str, payload: bytes) -> GatherVerdict:
        if name not in self.members:
            return GatherVerdict.FOREIGN
        if self.sent:
            return GatherVerdict.LATE
        if name in self.answers:
            return GatherVerdict.DUPLICATE
        self.answers[name] = payload
        return GatherVerdict.ACCEPTED

    def member_down(self, name: str) -> None:
        if name in self.expected and name not in self.answers:
            self.down.add(name)

    def complete(self) -> bool:
        return all(n in self.answers or n in self.down for n in self.expected)

    def summary(self, source: str, reducer: Reducer, max_payload: int) -> tuple[SiteSummary, bool]:
        """The SiteSummary to send, and whether the reducer's output had to be left out (too
        big: then every answer is reported missing rather than silently passing)."""
        self.sent = True
        answered = sorted(self.answers)
        missing = sorted((self.expected | self.down) - self.answers.keys())
        payload = reducer(self.query.name, [(n, self.answers[n]) for n in answered])
        if len(payload) > max_payload or len(answered) + len(missing) > MAX_SUMMARY_NAMES:
            missing = sorted(set(missing) | set(answered))[:MAX_SUMMARY_NAMES]
            return SiteSummary(self.query.ltime, self.query.id, self.site, source, b"", [], missing), True
        return SiteSummary(
            self.query.ltime, self.query.id, self.site, source, payload, answered, missing
        ), False


# --- the origin's side -------------------------------------------------------------------------


class SummaryVerdict(enum.Enum):
    BAD_LTIME = "bad_ltime"
    UNKNOWN = "unknown"  # no aggregated query of ours with that id and ltime
    LATE = "late"
    TOO_BIG = "too_big"  # payload above a single answer's limit, or too many names
    UNKNOWN_SITE = "unknown_site"  # no member of ours in that site matches the query
    FOREIGN = "foreign"  # the source is not a member of that site in our view
    DUPLICATE = "duplicate"  # this source already sent its summary
    ACCEPTED = "accepted"


@dataclass(frozen=True)
class SitePart:
    """One summary that counts: who sent it, the reducer's payload, the names it covers here."""

    source: str
    payload: bytes
    answered: tuple[str, ...]  # only names no earlier part covered (a name counts once)
    elapsed_ms: float = 0.0  # when it arrived, since the query started


@dataclass(frozen=True)
class SiteResult:
    site: str
    parts: tuple[SitePart, ...]
    missing: tuple[str, ...]  # expected or reported missing, and not answered in any part, sorted

    def answered(self) -> list[str]:
        return [n for p in self.parts for n in p.answered]


class OriginSites:
    """What the origin of an aggregated query knows of the sites and the summaries they sent."""

    def __init__(self, site_of: Mapping[str, str], expected: Iterable[str], down: Iterable[str] = ()) -> None:
        """`site_of`: site of every member we know (not left); `expected`: the alive matches;
        `down`: the suspect and dead matches, missing unless some summary has their answer."""
        self.site_of = dict(site_of)
        self.expected_by_site: dict[str, set[str]] = {}
        for name in expected:
            self.expected_by_site.setdefault(self.site_of.get(name, ""), set()).add(name)
        self.down_by_site: dict[str, set[str]] = {}
        for name in down:
            self.down_by_site.setdefault(self.site_of.get(name, ""), set()).add(name)
        self.parts: dict[str, list[SitePart]] = {}
        self.answered: dict[str, str] = {}  # name -> site, over every part
        self.reported_missing: dict[str, set[str]] = {}
        self.sources: set[str] = set()
        self.stripped = 0  # names dropped from accepted summaries (another site's, or unknown)

    def sites(self) -> set[str]:
        return set(self.expected_by_site)

    def accept(self, msg: SiteSummary, max_payload: int, elapsed_ms: float = 0.0) -> SummaryVerdict:
        """Judge and keep one summary (the caller checked ltime, id and the deadline)."""
        if len(msg.payload) > max_payload or len(msg.answered) + len(msg.missing) > MAX_SUMMARY_NAMES:
            return SummaryVerdict.TOO_BIG
        if msg.site not in self.expected_by_site:
            return SummaryVerdict.UNKNOWN_SITE
        if self.site_of.get(msg.source) != msg.site:
            return SummaryVerdict.FOREIGN
        if msg.source in self.sources:
            return SummaryVerdict.DUPLICATE
        self.sources.add(msg.source)
        ours = {n for n in msg.answered if self.site_of.get(n) == msg.site}
        # A missing name we do not know is taken as this site's: a node that joined after a
        # member died never learns of it (push-pull does not carry the dead to a newcomer), and
        # the site is what still knows it is missing. A site can add to what is missing, never
        # claim an answer from a node we do not know in that site.
        ours |= {n for n in msg.missing if self.site_of.get(n, msg.site) == msg.site}
        self.stripped += len(set(msg.answered) | set(msg.missing)) - len(ours)
        fresh = tuple(dict.fromkeys(n for n in msg.answered if n in ours and n not in self.answered))
        for name in fresh:
            self.answered[name] = msg.site
        self.parts.setdefault(msg.site, []).append(SitePart(msg.source, msg.payload, fresh, elapsed_ms))
        self.reported_missing.setdefault(msg.site, set()).update(n for n in msg.missing if n in ours)
        return SummaryVerdict.ACCEPTED

    def covers(self, name: str) -> bool:
        """Answered in a summary, or reported missing by its site's aggregator: nothing to wait for."""
        return name in self.answered or name in self.reported_missing.get(self.site_of.get(name, ""), ())

    def results(
        self, direct: Mapping[str, tuple[bytes, float]], query: str, reducer: Reducer, local: str
    ) -> tuple[SiteResult, ...]:
        """Every site's result; answers that came straight to us (`direct`: name -> (payload,
        elapsed_ms); views differed, or a node passed its answer on) are reduced here into one
        more part per site."""
        by_site: dict[str, list[tuple[str, bytes]]] = {}
        arrived: dict[str, float] = {}
        for name, (payload, elapsed_ms) in direct.items():
            site = self.site_of.get(name)
            if site is not None and name not in self.answered:
                by_site.setdefault(site, []).append((name, payload))
                arrived[site] = max(arrived.get(site, 0.0), elapsed_ms)
        out = []
        for site in sorted({*self.expected_by_site, *self.down_by_site, *self.parts, *by_site}):
            parts = list(self.parts.get(site, ()))
            extra = sorted(by_site.get(site, ()))
            if extra:
                parts.append(
                    SitePart(local, reducer(query, extra), tuple(n for n, _ in extra), arrived[site])
                )
            answered = {n for p in parts for n in p.answered}
            wanted = (
                self.expected_by_site.get(site, set())
                | self.reported_missing.get(site, set())
                | self.down_by_site.get(site, set())
            )
            out.append(SiteResult(site, tuple(parts), tuple(sorted(wanted - answered))))
        return tuple(out)
