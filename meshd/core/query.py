"""Gossip queries as Serf does them, but completing as soon as every expected node has answered.

Sans-IO: no clock, no sockets, no global random. Every input takes `now`; random choices use the
`random.Random` given to the engine. The node feeds messages in and carries the outputs out;
a finished query comes out as a QueryDone effect in the node's outbox (meshd.core.effects).

Rules (h11 style: the decisions are data, `ON_QUERY` below, and the tests walk the table)

    receiving a Query (in this order)                       verdict     rebroadcast  respond
    -----------------------------------------------------   ---------   -----------  -------
    ltime outside [0, max_ltime) or more than                BAD_LTIME   no           no
      max_ltime_jump ahead of our clock (never witnessed)
    too big, timeout outside (0, max], relay factor          INVALID     no           no
      outside [0, max], too many names/tags, or a bad/too
      long "re:" pattern
    ltime older than clock - ring size (after witnessing)    TOO_OLD     no           no
    (ltime, id) already in the ring                          DUPLICATE   no           no
    filters do not match this node                           NO_MATCH    yes          no
    filters match                                            MATCH       yes          yes

    * Non-matching nodes still rebroadcast (Serf): the filter says who answers, not who relays.
    * The query clock is a Lamport clock: originate uses the current time and then increments;
      a received query is witnessed (clock = max(clock, ltime + 1)) before the age check.
    * A key holder's lies about the clock are bounded: ltimes stay below `max_ltime` (2^53, far
      inside msgpack's u64, so our own next query always encodes) and may run at most
      `max_ltime_jump` ahead of our clock (an honest mesh never jumps that far between two
      messages; the ring could not dedupe such a query anyway). Beyond either, the message is
      dropped and counted, never witnessed. At the ceiling, originate refuses (StateError).
    * Push-pull carries the clock too (Serf does): `witness_push_pull` takes it, up to the
      ceiling the first time (a new node catches up with the mesh at once), clamped to
      `max_ltime_jump` after that (a liar moves us forward by a bounded step only).
    * The clock and the ring survive a restart: `export_state` / `restore` (the shell persists
      them, meshd/state.py), so a replayed query stays a duplicate and a restarted node asks
      at the mesh's time at once.
    * The ring has `ring_size` slots indexed by ltime % ring_size (Serf's queryBuffer, 512);
      a slot holds the ids seen at one ltime, at most `max_ids_per_slot` of them.

    receiving a QueryResponse for one of our queries        verdict     effect
    -----------------------------------------------------   ---------   -----------------------
    ltime outside [0, max_ltime) or too far ahead (as above) BAD_LTIME   dropped (counted)
    no pending query with that id and ltime                  UNKNOWN     dropped (counted)
    deadline passed (the query is finished first)            LATE        dropped
    payload bigger than max_response_size                    TOO_BIG     dropped
    this sender already answered (direct or relayed)         DUPLICATE   dropped
    otherwise                                                ACCEPTED    kept; the query completes
                                                                         once every expected node
                                                                         has answered or is down

    * Expected nodes are the alive members matching the filter, given by the caller when the
      query starts (`None`: unknown, wait for the timeout like Serf). An empty set completes at
      once. At the deadline the query completes with what it has and names the missing nodes.
    * Answers go straight to the origin address, and also wrapped in a Relay through
      `relay_factor` random members (never the answerer or the origin); a relay forwards the
      inner response unchanged. An answer whose encoding is bigger than `udp_response_size` is
      marked `via_stream`: the shell carries it over TCP instead of UDP.

Filters: `nodes` (names; empty = any), `site` and each `tags` value: an exact string, or
"re:<pattern>", a regular expression that must match the whole value (unlike Serf's unanchored
tag regexps: "re:s[1-3]" does not match "s10"). A literal value starting with "re:" is written as
a pattern ("re:re:x" matches "re:x").

Patterns run on RE2 (google-re2), which matches in time linear in the value: a pattern such as
"(a+)+$" that makes a backtracking engine run for minutes costs nothing here (a forged query
must not freeze every matching node). RE2 syntax is Python's minus what needs backtracking:
backreferences (\\1), lookahead/lookbehind ((?=, (?!, (?<=, (?<!) and \\Z are refused with a
clear error; \\d, \\w and \\s are ASCII-only. Patterns are bounded in length and in compiled
size (`max_mem`), compiled patterns are cached (bounded), and a filter names at most
`max_filter_nodes` nodes and `max_filter_tags` tags.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import msgspec
import re2

from meshd.core.aggregate import (
    AGGREGATES,
    BACKUP_FRACTION,
    GATHER_FRACTION,
    Gather,
    GatherVerdict,
    OriginSites,
    Reducer,
    SiteMember,
    SiteResult,
    SummaryVerdict,
    pick_aggregators,
    raw_reducer,
)
from meshd.core.counters import Counters
from meshd.core.effects import MembershipEffect, Outbox, QueryDone
from meshd.core.messages import MemberState, Query, QueryFilter, QueryResponse, Relay, SiteSummary
from meshd.errors import ConfigError, StateError

if TYPE_CHECKING:
    from random import Random  # only the type: the node passes its seeded generator in

REGEX_PREFIX: Final = "re:"
TAG_META_PREFIX: Final = "tag:"
QUERY_TIMEOUT_MULT: Final = 16  # Serf's QueryTimeoutMult
LTIME_CEILING: Final = 1 << 53  # far inside u64 (msgpack) and exact in a JSON double
PATTERN_MAX_MEM: Final = 1 << 20  # RE2 budget per compiled pattern (program + DFA cache)
PATTERN_CACHE_SIZE: Final = 64  # compiled patterns kept: at most 64 x PATTERN_MAX_MEM
_ASKED_STATES: Final = (MemberState.ALIVE, MemberState.SUSPECT)  # an aggregator asks and waits for these
_RE2_HINT: Final = "RE2 syntax, linear time: no backreferences, lookaround or \\Z"


class Verdict(enum.Enum):
    BAD_LTIME = "bad_ltime"
    INVALID = "invalid"
    TOO_OLD = "too_old"
    DUPLICATE = "duplicate"
    NO_MATCH = "no_match"
    MATCH = "match"


# verdict -> (rebroadcast, respond)
ON_QUERY: Final[Mapping[Verdict, tuple[bool, bool]]] = MappingProxyType(
    {
        Verdict.BAD_LTIME: (False, False),
        Verdict.INVALID: (False, False),
        Verdict.TOO_OLD: (False, False),
        Verdict.DUPLICATE: (False, False),
        Verdict.NO_MATCH: (True, False),
        Verdict.MATCH: (True, True),
    }
)


class ResponseVerdict(enum.Enum):
    BAD_LTIME = "bad_ltime"
    UNKNOWN = "unknown"
    LATE = "late"
    TOO_BIG = "too_big"
    DUPLICATE = "duplicate"
    ACCEPTED = "accepted"


@dataclass(frozen=True)
class QueryLimits:
    max_query_size: int = 1024  # encoded Query: it rides in gossip packets beside other rumours
    max_response_size: int = 256 * 1024  # answer payload; bigger ones are refused
    udp_response_size: int = 1200  # encoded answer above this goes over TCP (via_stream)
    max_timeout: float = 300.0
    max_relay_factor: int = 5
    max_pattern_len: int = 256
    max_filter_nodes: int = 256
    max_filter_tags: int = 32
    max_ltime: int = LTIME_CEILING  # ltimes are in [0, max_ltime)
    max_ltime_jump: int = 1_000_000  # how far a received ltime may run ahead of our clock
    max_pending: int = 64  # queries this node has in flight
    ring_size: int = 512  # Serf's QueryBuffer
    max_ids_per_slot: int = 64
    max_routes: int = 256  # aggregated queries this node routes answers for at once
    max_site_fan_out: int = 64  # members an aggregator sends the query to directly
    max_early_relays: int = 1024  # answers held for a query not seen yet (see on_relay)
    early_hold: float = 0.25  # seconds such an answer waits for its query before going on


@dataclass(frozen=True)
class QueryState:
    """What survives a restart: the clock and the recent (ltime, ids) the ring remembers."""

    ltime: int = 0
    seen: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (ltime, ids seen at that ltime), oldest first


@dataclass(frozen=True)
class QueryAction:
    """What the node does with a received (or its own) Query."""

    query: Query
    verdict: Verdict
    rebroadcast: bool  # queue the query for gossip
    respond: bool  # run the handler for query.name, then call QueryEngine.respond(action, ...)
    deadline: float  # local clock; an answer after this is not sent


@dataclass(frozen=True)
class QueryOutbound:
    """A message to send: to `addr` by UDP, or by a TCP exchange when `via_stream`."""

    addr: str
    message: QueryResponse | Relay | SiteSummary
    via_stream: bool


@dataclass(frozen=True)
class QueryAnswer:
    name: str
    payload: bytes
    elapsed_ms: float


@dataclass(frozen=True)
class QueryResult:
    id: int
    name: str
    responses: tuple[QueryAnswer, ...]  # in arrival order
    missing: tuple[str, ...]  # expected nodes that did not answer, sorted
    elapsed_ms: float
    timed_out: bool  # False: completed because every expected node answered
    sites: tuple[SiteResult, ...] = ()  # aggregated queries: each site's summaries (aggregate.py)


class LamportClock:
    def __init__(self, start: int = 0) -> None:
        self._time = start

    def time(self) -> int:
        return self._time

    def increment(self) -> int:
        self._time += 1
        return self._time

    def witness(self, ltime: int) -> None:
        if ltime >= self._time:
            self._time = ltime + 1


def default_timeout(gossip_interval: float, cluster_size: int) -> float:
    """Serf's query timeout: gossip interval x 16 x ceil(log10(N + 1))."""
    return gossip_interval * QUERY_TIMEOUT_MULT * max(1, math.ceil(math.log10(cluster_size + 1)))


class PatternError(ValueError):
    """A "re:" pattern RE2 refuses; the message says why."""


def _re2_options() -> Any:
    options = re2.Options()
    options.max_mem = PATTERN_MAX_MEM  # a huge pattern fails to compile instead of eating memory
    options.log_errors = False  # a peer's bad pattern must not write to our stderr
    return options


_OPTIONS: Final = _re2_options()


@functools.lru_cache(maxsize=PATTERN_CACHE_SIZE)
def _compile(pattern: str) -> Any:
    """The compiled RE2 pattern; PatternError when RE2 cannot compile it (never cached)."""
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", errors="replace")
        raise PatternError(f"{detail} ({_RE2_HINT})") from None


def _value_matches(want: str, have: str) -> bool:
    if want.startswith(REGEX_PREFIX):
        try:
            return _compile(want[len(REGEX_PREFIX) :]).fullmatch(have) is not None
        except PatternError:
            return False
    return want == have


def matches(filters: QueryFilter, name: str, site: str, tags: Mapping[str, str]) -> bool:
    """Whether a node with this name, site and tags answers a query with these filters."""
    if filters.nodes and name not in filters.nodes:
        return False
    if filters.site and not _value_matches(filters.site, site):
        return False
    for key, want in filters.tags.items():
        have = tags.get(key)
        if have is None or not _value_matches(want, have):
            return False
    return True


def expected_members(filters: QueryFilter, members: Iterable[tuple[str, str, Mapping[str, str]]]) -> set[str]:
    """Names among (name, site, tags) of alive members that match: the `expected` of originate."""
    return {name for name, site, tags in members if matches(filters, name, site, tags)}


def split_meta(meta: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """(site, tags) from member metadata as NodeConfig.meta() writes it: "site", "tag:<key>"."""
    tags = {k[len(TAG_META_PREFIX) :]: v for k, v in meta.items() if k.startswith(TAG_META_PREFIX)}
    return meta.get("site", ""), tags


def filter_problem(filters: QueryFilter, limits: QueryLimits) -> str | None:
    """Why these filters are unusable ("filters.site: ..."), or None when they are fine."""
    if len(filters.nodes) > limits.max_filter_nodes:
        return f"filters.nodes: at most {limits.max_filter_nodes} node names"
    if len(filters.tags) > limits.max_filter_tags:
        return f"filters.tags: at most {limits.max_filter_tags} tags"
    values = [("filters.site", filters.site)]
    values += [(f"filters.tags.{key}", value) for key, value in filters.tags.items()]
    for where, value in values:
        if not value.startswith(REGEX_PREFIX):
            continue
        pattern = value[len(REGEX_PREFIX) :]
        if len(pattern) > limits.max_pattern_len:
            return f"{where}: pattern longer than {limits.max_pattern_len} characters"
        try:
            _compile(pattern)
        except PatternError as exc:
            return f"{where}: bad regular expression: {exc}"
    return None


def _encoded_size(msg: Query | QueryResponse | Relay | SiteSummary) -> int:
    # Size of the message body alone (the envelope's overhead is in udp_response_size's margin).
    return len(msgspec.msgpack.encode(msg))


@dataclass
class _Pending:
    query: Query
    started: float
    deadline: float
    expected: set[str] | None
    answers: dict[str, QueryAnswer] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    sites: OriginSites | None = None  # aggregated queries only

    def complete(self) -> bool:
        if self.expected is None:
            return False
        sites = self.sites
        return all(
            n in self.answers or n in self.down or (sites is not None and sites.covers(n))
            for n in self.expected
        )


@dataclass
class _Route:
    """An aggregated query this node answers or aggregates: where its answers go."""

    query: Query
    expires: float  # the query's deadline here: forgotten after it
    aggregator: tuple[str, str] | None  # (name, addr) of our site's aggregator; None: answer the origin
    backup: tuple[str, str] | None = None  # its backup (the second choice), when the site has one
    gather: Gather | None = None  # set when we are one of them


class QueryEngine:
    """Originates queries, decides what to do with received ones, gathers the answers."""

    def __init__(
        self,
        local_name: str,
        local_addr: str,
        rng: Random,
        limits: QueryLimits | None = None,
        outbox: Outbox[MembershipEffect] | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        """`outbox`: where finished queries go (QueryDone); the node passes its own, so they
        come out in order with everything else it queues. `reducer`: how an aggregator sums
        up its site's answers (the shell's, pure; default: no reduction)."""
        self.local_name = local_name
        self.local_addr = local_addr
        self.limits = limits or QueryLimits()
        self.clock = LamportClock()
        self.counters = Counters()
        self._synced = False  # the clock came from a push-pull or a restored state at least once
        self._rng = rng
        self._pending: dict[int, _Pending] = {}
        self._ring: list[tuple[int, list[int]] | None] = [None] * self.limits.ring_size
        self.outbox: Outbox[MembershipEffect] = outbox if outbox is not None else Outbox()
        self.reducer: Reducer = reducer or raw_reducer
        self._routes: dict[tuple[int, int], _Route] = {}  # (ltime, id) -> route
        self._early: dict[tuple[int, int], tuple[float, list[Relay]]] = {}  # key -> (until, relays)
        self._early_count = 0

    # --- asking ---------------------------------------------------------------------------

    def originate(
        self,
        name: str,
        payload: bytes,
        filters: QueryFilter,
        timeout: float,
        relay_factor: int,
        expected: set[str] | None,
        now: float,
        aggregate: str = "",
        site_of: Mapping[str, str] | None = None,
        down: Iterable[str] = (),
    ) -> int:
        """Start a query and return its id; gossip `query_message(id)` and also hand that same
        message to `on_query` so this node answers itself when it matches.

        `aggregate="site"`: answers come back as one summary per site (meshd.core.aggregate);
        `site_of` then gives the site of every member we know (not left), `expected` must be
        known, `down` names the suspect and dead matches (missing unless a summary has their
        answer), and the answers' relay factor is not used (answers go to the aggregator).

        ConfigError for unusable arguments (the message names the field); StateError when
        `max_pending` queries are already in flight.
        """
        limits = self.limits
        if not name:
            raise ConfigError("name: a query needs a name")
        if not (0 < timeout <= limits.max_timeout):
            raise ConfigError(f"timeout: must be in (0, {limits.max_timeout:g}] seconds")
        if not (0 <= relay_factor <= limits.max_relay_factor):
            raise ConfigError(f"relay_factor: must be in [0, {limits.max_relay_factor}]")
        problem = filter_problem(filters, limits)
        if problem:
            raise ConfigError(problem)
        if aggregate and aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate: one of {sorted(AGGREGATES)}, or empty")
        if aggregate and (site_of is None or expected is None):
            raise ConfigError("aggregate: needs the members' sites and the expected nodes")
        if len(self._pending) >= limits.max_pending:
            raise StateError(f"{limits.max_pending} queries already in flight")
        if self.clock.time() >= limits.max_ltime - 1:
            # Only reachable by a long run of maximal jumps; refusing beats a query nobody takes.
            raise StateError("the query clock reached its ceiling")
        query_id = self._rng.getrandbits(32)
        while query_id in self._pending:
            query_id = self._rng.getrandbits(32)
        query = Query(
            ltime=self.clock.time(),
            id=query_id,
            name=name,
            payload=payload,
            origin=self.local_name,
            origin_addr=self.local_addr,
            filters=filters,
            relay_factor=relay_factor,
            timeout=timeout,
            aggregate=aggregate,
        )
        size = _encoded_size(query)
        if size > limits.max_query_size:
            raise ConfigError(
                f"payload: the query encodes to {size} bytes, more than {limits.max_query_size}"
            )
        self.clock.increment()
        pending = _Pending(query, now, now + timeout, set(expected) if expected is not None else None)
        if aggregate and site_of is not None and expected is not None:
            pending.sites = OriginSites(site_of, expected, down)
        self._pending[query_id] = pending
        if pending.complete():
            self._finish(pending, now, timed_out=False)
        return query_id

    def query_message(self, query_id: int) -> Query | None:
        """The Query to gossip; None once it has completed (nothing left to ask)."""
        pending = self._pending.get(query_id)
        return pending.query if pending is not None else None

    def cancel(self, query_id: int) -> None:
        """Forget a query without a result (the asker went away)."""
        self._pending.pop(query_id, None)

    def on_response(self, msg: QueryResponse, now: float) -> ResponseVerdict:
        verdict = self._accept(msg, now) if self._ltime_ok(msg.ltime) else ResponseVerdict.BAD_LTIME
        self._count(f"response.{verdict.value}")
        return verdict

    def _ltime_ok(self, ltime: int) -> bool:
        """Inside the bounds a received Query or QueryResponse must keep (module docstring)."""
        return 0 <= ltime < self.limits.max_ltime and ltime - self.clock.time() <= self.limits.max_ltime_jump

    def _accept(self, msg: QueryResponse, now: float) -> ResponseVerdict:
        pending = self._pending.get(msg.id)
        if pending is None or pending.query.ltime != msg.ltime:
            return ResponseVerdict.UNKNOWN
        if now >= pending.deadline:
            self._finish(pending, now, timed_out=True)
            return ResponseVerdict.LATE
        if len(msg.payload) > self.limits.max_response_size:
            return ResponseVerdict.TOO_BIG
        if msg.source in pending.answers:
            return ResponseVerdict.DUPLICATE
        pending.answers[msg.source] = QueryAnswer(msg.source, msg.payload, (now - pending.started) * 1000.0)
        if pending.complete():
            self._finish(pending, now, timed_out=False)
        return ResponseVerdict.ACCEPTED

    def on_site_summary(self, msg: SiteSummary, now: float) -> SummaryVerdict:
        """A site's summary for one of our aggregated queries (bounds in meshd.core.aggregate),
        or our primary aggregator's copy when we are its backup (ours is then not needed)."""
        route = self._routes.get((msg.ltime, msg.id))
        gather = route.gather if route is not None else None
        if gather is not None and gather.primary and msg.source == gather.primary and msg.site == gather.site:
            gather.sent = True
            self._count("gather.backup_stood_down")
            if msg.id not in self._pending:
                return SummaryVerdict.ACCEPTED  # (as the origin too, we keep it below)
        verdict = self._accept_summary(msg, now) if self._ltime_ok(msg.ltime) else SummaryVerdict.BAD_LTIME
        self._count(f"summary.{verdict.value}")
        return verdict

    def _accept_summary(self, msg: SiteSummary, now: float) -> SummaryVerdict:
        pending = self._pending.get(msg.id)
        if pending is None or pending.query.ltime != msg.ltime or pending.sites is None:
            return SummaryVerdict.UNKNOWN
        if now >= pending.deadline:
            self._finish(pending, now, timed_out=True)
            return SummaryVerdict.LATE
        verdict = pending.sites.accept(msg, self.limits.max_response_size, (now - pending.started) * 1000.0)
        if verdict is SummaryVerdict.ACCEPTED and pending.complete():
            self._finish(pending, now, timed_out=False)
        return verdict

    def member_down(self, name: str, now: float) -> None:
        """A member failed or left: stop waiting for it (it is still named as missing)."""
        for pending in list(self._pending.values()):
            if pending.expected and name in pending.expected and name not in pending.answers:
                pending.down.add(name)
                if pending.complete():
                    self._finish(pending, now, timed_out=False)
        for route in self._routes.values():
            gather = route.gather
            if gather is not None and not gather.sent:
                gather.member_down(name)
                if gather.complete() and not gather.primary:
                    gather.deadline = min(gather.deadline, now)  # the next timer sends it

    def get_timer(self) -> float:
        """The next deadline (absolute), math.inf when no query is in flight or being gathered."""
        if not (self._pending or self._routes or self._early):
            return math.inf  # the usual case, and it is asked after every packet
        gathers = (
            r.gather.deadline for r in self._routes.values() if r.gather is not None and not r.gather.sent
        )
        return min(
            min((p.deadline for p in self._pending.values()), default=math.inf),
            min(gathers, default=math.inf),
            min((until for until, _ in self._early.values()), default=math.inf),
        )

    def handle_timer(self, now: float) -> list[QueryOutbound]:
        """Finish the queries past their deadline; returns the site summaries now due to send."""
        if not (self._pending or self._routes or self._early):
            return []
        for pending in list(self._pending.values()):
            if now >= pending.deadline:
                self._finish(pending, now, timed_out=True)
        out = self._release_expired(now)
        for key, route in list(self._routes.items()):
            gather = route.gather
            if gather is not None and not gather.sent and now >= gather.deadline:
                if gather.primary:
                    self._count("gather.backup_sent")  # the primary stayed silent: dead or cut off
                out += self._send_summary(route, gather, now)
            if now >= route.expires:
                del self._routes[key]
        return out

    def in_flight(self) -> int:
        return len(self._pending)

    def _finish(self, pending: _Pending, now: float, *, timed_out: bool) -> None:
        del self._pending[pending.query.id]
        expected = pending.expected or set()
        missing = expected - pending.answers.keys()
        sites: tuple[SiteResult, ...] = ()
        if pending.sites is not None:
            direct = {n: (a.payload, a.elapsed_ms) for n, a in pending.answers.items()}
            sites = pending.sites.results(direct, pending.query.name, self.reducer, self.local_name)
            missing = {n for s in sites for n in s.missing}
            if pending.sites.stripped:
                self._count("summary.stripped_names", pending.sites.stripped)
        self.outbox.put(
            QueryDone(
                QueryResult(
                    id=pending.query.id,
                    name=pending.query.name,
                    responses=tuple(pending.answers.values()),
                    missing=tuple(sorted(missing)),
                    elapsed_ms=(now - pending.started) * 1000.0,
                    timed_out=timed_out,
                    sites=sites,
                )
            )
        )

    # --- the clock across restarts and push-pull -------------------------------------------

    def witness_push_pull(self, ltime: int) -> None:
        """A peer's query clock from a push-pull exchange (Serf sends its clocks the same way)."""
        limits = self.limits
        if not (0 <= ltime < limits.max_ltime):
            self._count("push_pull.bad_ltime")
            return
        if self._synced and ltime - self.clock.time() > limits.max_ltime_jump:
            # Clamped, not dropped: a node left far behind (a long partition) still catches up,
            # by bounded steps; a liar gains no more than one step per exchange.
            self._count("push_pull.clamped")
            ltime = self.clock.time() + limits.max_ltime_jump
        self._synced = True
        self.clock.witness(min(ltime, limits.max_ltime - 1))

    def export_state(self) -> QueryState:
        """The clock and the ring, for the shell to persist (meshd/state.py)."""
        slots = sorted((slot for slot in self._ring if slot is not None), key=lambda slot: slot[0])
        return QueryState(self.clock.time(), tuple((lt, tuple(ids)) for lt, ids in slots))

    def restore(self, state: QueryState) -> None:
        """Continue from a persisted state: the clock never goes back, known queries stay known.

        Values out of bounds (a damaged file) are skipped; the ring keeps its bounds.
        """
        limits = self.limits
        if 0 <= state.ltime < limits.max_ltime and state.ltime > self.clock.time():
            self.clock = LamportClock(state.ltime)
        self._synced = True
        ring_size = len(self._ring)
        horizon = self.clock.time() - ring_size
        for ltime, ids in state.seen:
            if not (0 <= ltime < limits.max_ltime) or ltime < horizon:
                continue
            self.clock.witness(ltime)  # a remembered query's ltime is below the clock
            kept = list(dict.fromkeys(ids))[-limits.max_ids_per_slot :]
            self._ring[ltime % ring_size] = (ltime, kept)

    # --- answering --------------------------------------------------------------------------

    def on_query(self, msg: Query, local_site: str, local_tags: Mapping[str, str], now: float) -> QueryAction:
        verdict = self._judge(msg, local_site, local_tags)
        self._count(f"query.{verdict.value}")
        rebroadcast, respond = ON_QUERY[verdict]
        deadline = now + min(msg.timeout, self.limits.max_timeout)
        return QueryAction(msg, verdict, rebroadcast, respond, deadline)

    def _judge(self, msg: Query, local_site: str, local_tags: Mapping[str, str]) -> Verdict:
        limits = self.limits
        if not self._ltime_ok(msg.ltime):
            return Verdict.BAD_LTIME  # never witnessed: the clock stays usable
        if (
            not (0 < msg.timeout <= limits.max_timeout)
            or not (0 <= msg.relay_factor <= limits.max_relay_factor)
            or _encoded_size(msg) > limits.max_query_size  # first: it bounds the filter's work
            or filter_problem(msg.filters, limits) is not None
            or (msg.aggregate and msg.aggregate not in AGGREGATES)
        ):
            return Verdict.INVALID
        self.clock.witness(msg.ltime)
        ring_size = len(self._ring)
        current = self.clock.time()
        if current > ring_size and msg.ltime < current - ring_size:
            return Verdict.TOO_OLD
        slot = msg.ltime % ring_size
        seen = self._ring[slot]
        if seen is not None and seen[0] == msg.ltime:
            if msg.id in seen[1]:
                return Verdict.DUPLICATE
            ids = seen[1]
        else:
            ids = []
            self._ring[slot] = (msg.ltime, ids)
        ids.append(msg.id)
        if len(ids) > limits.max_ids_per_slot:
            del ids[0]
        if matches(msg.filters, self.local_name, local_site, local_tags):
            return Verdict.MATCH
        return Verdict.NO_MATCH

    def respond(
        self,
        action: QueryAction,
        payload: bytes,
        relays: Sequence[tuple[str, str]],
        now: float,
    ) -> list[QueryOutbound]:
        """The local handler's answer: messages to send (none when answering ourselves or late).

        `relays` are (name, addr) of alive members; up to the query's relay factor of them are
        picked at random (never this node or the origin). ValueError when the action did not
        ask for an answer, or the payload is bigger than `max_response_size` (the handler runner
        bounds its output below that).
        """
        query = action.query
        if not action.respond:
            raise ValueError(f"this node does not answer query {query.id} ({action.verdict.value})")
        if len(payload) > self.limits.max_response_size:
            raise ValueError(f"answer of {len(payload)} bytes, more than {self.limits.max_response_size}")
        if now > action.deadline:
            self._count("respond.late")
            return []
        response = QueryResponse(query.ltime, query.id, self.local_name, payload)
        route = self._routes.get((query.ltime, query.id)) if query.aggregate else None
        if route is not None and route.aggregator is not None:
            return self._answer_aggregator(route, response, now)
        if query.origin == self.local_name:
            self.on_response(response, now)
            return []
        out = [self._outbound(query.origin_addr, response)]
        candidates = sorted({(n, a) for n, a in relays if n not in (self.local_name, query.origin)})
        picked = self._rng.sample(candidates, min(query.relay_factor, len(candidates)))
        for _, addr in picked:
            relay = Relay(query.origin, query.origin_addr, response)
            out.append(self._outbound(addr, relay))
        self._count("respond.sent")
        self._count("respond.relayed", len(picked))
        return out

    def on_relay(self, msg: Relay, now: float) -> list[QueryOutbound]:
        """A Relay arrived: forward the inner answer to its destination (or take it if ours).

        An answer to an aggregated query we gather for our site is kept for the summary
        instead; one from outside our site, or after the summary went, is forwarded as usual.
        """
        if msg.dest == self.local_name:
            self.on_response(msg.response, now)
            return []
        if not (0 <= msg.response.ltime < self.limits.max_ltime):
            self._count("relay.bad_ltime")  # a relay passes on nothing we would not accept
            return []
        key = (msg.response.ltime, msg.response.id)
        route = self._routes.get(key)
        if msg.aggregate and route is None and not self._seen(key) and self._hold(key, msg, now):
            return []
        if route is not None and route.gather is not None:
            out = self._gather(route, msg.response, now)
            if out is not None:
                return out
        self._count("relay.forwarded")
        return [self._outbound(msg.dest_addr, msg.response)]

    # --- aggregated queries (meshd.core.aggregate) ------------------------------------------

    def _seen(self, key: tuple[int, int]) -> bool:
        slot = self._ring[key[0] % len(self._ring)]
        return slot is not None and slot[0] == key[0] and key[1] in slot[1]

    def _hold(self, key: tuple[int, int], msg: Relay, now: float) -> bool:
        """An answer for a query we have not seen yet: a member may hear of an aggregated query
        (by gossip) before its aggregator does (directly from the origin), and its answer must
        not then bypass the aggregator. Held until the query comes (`release_early`) or for
        `early_hold`, then handled as usual; False when the bound is reached (forward now)."""
        if self._early_count >= self.limits.max_early_relays:
            self._count("relay.early_full")
            return False
        _, held = self._early.setdefault(key, (now + self.limits.early_hold, []))
        held.append(msg)
        self._early_count += 1
        self._count("relay.early_held")
        return True

    def release_early(self, query: Query, now: float) -> list[QueryOutbound]:
        """The query of answers we held arrived (call after on_query and on_aggregated): what
        to do with them now."""
        entry = self._early.pop((query.ltime, query.id), None)
        if entry is None:
            return []
        self._early_count -= len(entry[1])
        out: list[QueryOutbound] = []
        for msg in entry[1]:
            out += self.on_relay(msg, now)
        return out

    def _release_expired(self, now: float) -> list[QueryOutbound]:
        out: list[QueryOutbound] = []
        for key in [k for k, (until, _) in self._early.items() if now >= until]:
            _, held = self._early.pop(key)
            self._early_count -= len(held)
            self._count("relay.early_expired", len(held))
            out += [self._outbound(m.dest_addr, m.response) for m in held]
        return out

    def on_aggregated(
        self, action: QueryAction, local_site: str, site_members: Sequence[SiteMember], now: float
    ) -> list[tuple[str, str]]:
        """A new aggregated query (rebroadcast verdict): pick our site's aggregator and its
        backup among `site_members` (our site in our view, us included, every state) and
        remember where answers go. Returns (name, addr) of the members to send the query to
        directly: some only when we are the aggregator or its backup."""
        query = action.query
        if not action.rebroadcast or not query.aggregate:
            return []
        key = (query.ltime, query.id)
        for k in [k for k, r in self._routes.items() if now >= r.expires]:
            del self._routes[k]
        if len(self._routes) >= self.limits.max_routes:
            self._count("aggregate.full")  # our answer goes to the origin directly instead
            return []
        alive = {m.name: m.addr for m in site_members if m.state == MemberState.ALIVE}
        alive.setdefault(self.local_name, self.local_addr)
        ranked = pick_aggregators(query.id, query.ltime, alive)  # we are alive: never empty
        chosen, backup = ranked[0], (ranked[1] if len(ranked) > 1 else "")
        route = _Route(
            query, action.deadline, (chosen, alive[chosen]), (backup, alive[backup]) if backup else None
        )
        self._routes[key] = route
        if self.local_name not in (chosen, backup):
            return []
        # The backup gathers too and sends only if the primary's summary (a copy comes to it)
        # did not show up: a primary that died before the mesh noticed costs time, not the site.
        fraction = GATHER_FRACTION if chosen == self.local_name else BACKUP_FRACTION
        # A suspect is usually alive (a lost ack, or just restarted and not yet refuted): ask it
        # and wait for it within the window like an alive member. Only the dead are not waited for.
        asked = {m.name: m.addr for m in site_members if m.state in _ASKED_STATES}
        asked.setdefault(self.local_name, self.local_addr)
        alive_tags = [(m.name, local_site, m.tags) for m in site_members if m.state in _ASKED_STATES]
        down_tags = [(m.name, local_site, m.tags) for m in site_members if m.state == MemberState.DEAD]
        route.gather = Gather(
            query,
            local_site,
            members=frozenset(m.name for m in site_members) | {self.local_name},
            expected=frozenset(expected_members(query.filters, alive_tags)),
            down=expected_members(query.filters, down_tags),  # missing unless they answer anyway
            deadline=min(now + fraction * query.timeout, action.deadline),
            primary="" if chosen == self.local_name else chosen,
        )
        self._count("aggregate.gathering")
        targets = sorted((n, asked[n]) for n in route.gather.expected if n != self.local_name and n in asked)
        if len(targets) > self.limits.max_site_fan_out:
            targets = self._rng.sample(targets, self.limits.max_site_fan_out)
        return targets

    def _answer_aggregator(self, route: _Route, response: QueryResponse, now: float) -> list[QueryOutbound]:
        """Our answer to an aggregated query: into our gather, and to whichever of our site's
        aggregator and backup we are not (the primary needs no copy at its backup: should it
        die, its own answer is missing anyway)."""
        assert route.aggregator is not None
        out: list[QueryOutbound] = []
        if route.gather is not None:
            out += self._gather(route, response, now) or []
            if not route.gather.primary:
                return out
        query = route.query
        for name, addr in [r for r in (route.aggregator, route.backup) if r is not None]:
            if name != self.local_name:
                self._count("respond.to_aggregator")
                relay = Relay(query.origin, query.origin_addr, response, query.aggregate)
                out.append(self._outbound(addr, relay, reliable=True))
        return out

    def _gather(self, route: _Route, response: QueryResponse, now: float) -> list[QueryOutbound] | None:
        """Keep an answer for the summary (the summary when that completes it, at a primary);
        None: not ours to keep (the caller passes it on to the origin)."""
        gather = route.gather
        assert gather is not None
        if len(response.payload) > self.limits.max_response_size:
            self._count("gather.too_big")
            return []
        verdict = gather.add(response.source, response.payload)
        self._count(f"gather.{verdict.value}")
        if verdict is GatherVerdict.FOREIGN or (verdict is GatherVerdict.LATE and not gather.primary):
            return None
        if verdict is GatherVerdict.ACCEPTED and gather.complete() and not gather.primary:
            return self._send_summary(route, gather, now)
        return []

    def _send_summary(self, route: _Route, gather: Gather, now: float) -> list[QueryOutbound]:
        msg, squeezed = gather.summary(self.local_name, self.reducer, self.limits.max_response_size)
        if squeezed:
            self._count("gather.summary_too_big")
        self._count("gather.sent")
        out: list[QueryOutbound] = []
        backup = route.backup
        if (
            not gather.primary
            and backup is not None
            and backup[0] not in (self.local_name, gather.query.origin)
        ):
            # The backup stands down (an origin sees it anyway).
            out.append(self._outbound(backup[1], msg, reliable=True))
        if gather.query.origin == self.local_name:
            self.on_site_summary(msg, now)
            return out
        return [*out, self._outbound(gather.query.origin_addr, msg, reliable=True)]

    def _outbound(
        self, addr: str, message: QueryResponse | Relay | SiteSummary, reliable: bool = False
    ) -> QueryOutbound:
        """`reliable`: over TCP whatever its size. An aggregated query's answers and summaries
        go this way: each one stands for a whole site (or its one member in it), and a lost
        datagram would show live nodes as missing; it is one connection per member and site."""
        via_stream = reliable or _encoded_size(message) > self.limits.udp_response_size
        return QueryOutbound(addr, message, via_stream)

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n
