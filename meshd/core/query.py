"""Gossip queries as Serf does them, but completing as soon as every expected node has answered.

Sans-IO: no clock, no sockets, no global random. Every input takes `now`; random choices use the
`random.Random` given to the engine. The node feeds messages in and carries the outputs out;
a finished query comes out as a QueryDone effect in the node's outbox (meshd.core.effects).

Rules (h11 style: the decisions are data, `ON_QUERY` below, and the tests walk the table)

    receiving a Query (in this order)                       verdict     rebroadcast  respond
    -----------------------------------------------------   ---------   -----------  -------
    too big, timeout outside (0, max], relay factor          INVALID     no           no
      outside [0, max], or a bad/too long "re:" pattern
    ltime older than clock - ring size (after witnessing)    TOO_OLD     no           no
    (ltime, id) already in the ring                          DUPLICATE   no           no
    filters do not match this node                           NO_MATCH    yes          no
    filters match                                            MATCH       yes          yes

    * Non-matching nodes still rebroadcast (Serf): the filter says who answers, not who relays.
    * The query clock is a Lamport clock: originate uses the current time and then increments;
      a received query is witnessed (clock = max(clock, ltime + 1)) before the age check.
    * The ring has `ring_size` slots indexed by ltime % ring_size (Serf's queryBuffer, 512);
      a slot holds the ids seen at one ltime, at most `max_ids_per_slot` of them.

    receiving a QueryResponse for one of our queries        verdict     effect
    -----------------------------------------------------   ---------   -----------------------
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
"re:<pattern>", a Python regular expression that must match the whole value (unlike Serf's
unanchored tag regexps: "re:s[1-3]" does not match "s10"). A literal value starting with "re:" is
written as a pattern ("re:re:x" matches "re:x"). Patterns are bounded in length; tag values are
the node's own short strings, which bounds the matching cost.
"""

from __future__ import annotations

import enum
import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

import msgspec

from meshd.core.counters import Counters
from meshd.core.effects import MembershipEffect, Outbox, QueryDone
from meshd.core.messages import Query, QueryFilter, QueryResponse, Relay
from meshd.errors import ConfigError, StateError

if TYPE_CHECKING:
    from random import Random  # only the type: the node passes its seeded generator in

REGEX_PREFIX: Final = "re:"
TAG_META_PREFIX: Final = "tag:"
QUERY_TIMEOUT_MULT: Final = 16  # Serf's QueryTimeoutMult


class Verdict(enum.Enum):
    INVALID = "invalid"
    TOO_OLD = "too_old"
    DUPLICATE = "duplicate"
    NO_MATCH = "no_match"
    MATCH = "match"


# verdict -> (rebroadcast, respond)
ON_QUERY: Final[Mapping[Verdict, tuple[bool, bool]]] = MappingProxyType(
    {
        Verdict.INVALID: (False, False),
        Verdict.TOO_OLD: (False, False),
        Verdict.DUPLICATE: (False, False),
        Verdict.NO_MATCH: (True, False),
        Verdict.MATCH: (True, True),
    }
)


class ResponseVerdict(enum.Enum):
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
    max_pending: int = 64  # queries this node has in flight
    ring_size: int = 512  # Serf's QueryBuffer
    max_ids_per_slot: int = 64


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
    message: QueryResponse | Relay
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


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _value_matches(want: str, have: str) -> bool:
    if want.startswith(REGEX_PREFIX):
        try:
            return _compile(want[len(REGEX_PREFIX) :]).fullmatch(have) is not None
        except re.error:
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
        except re.error as exc:
            return f"{where}: bad regular expression: {exc}"
    return None


def _encoded_size(msg: Query | QueryResponse | Relay) -> int:
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

    def complete(self) -> bool:
        if self.expected is None:
            return False
        return all(n in self.answers or n in self.down for n in self.expected)


class QueryEngine:
    """Originates queries, decides what to do with received ones, gathers the answers."""

    def __init__(
        self,
        local_name: str,
        local_addr: str,
        rng: Random,
        limits: QueryLimits | None = None,
        outbox: Outbox[MembershipEffect] | None = None,
    ) -> None:
        """`outbox`: where finished queries go (QueryDone); the node passes its own, so they
        come out in order with everything else it queues."""
        self.local_name = local_name
        self.local_addr = local_addr
        self.limits = limits or QueryLimits()
        self.clock = LamportClock()
        self.counters = Counters()
        self._rng = rng
        self._pending: dict[int, _Pending] = {}
        self._ring: list[tuple[int, list[int]] | None] = [None] * self.limits.ring_size
        self.outbox: Outbox[MembershipEffect] = outbox if outbox is not None else Outbox()

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
    ) -> int:
        """Start a query and return its id; gossip `query_message(id)` and also hand that same
        message to `on_query` so this node answers itself when it matches.

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
        if len(self._pending) >= limits.max_pending:
            raise StateError(f"{limits.max_pending} queries already in flight")
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
        )
        size = _encoded_size(query)
        if size > limits.max_query_size:
            raise ConfigError(
                f"payload: the query encodes to {size} bytes, more than {limits.max_query_size}"
            )
        self.clock.increment()
        pending = _Pending(query, now, now + timeout, set(expected) if expected is not None else None)
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
        verdict = self._accept(msg, now)
        self._count(f"response.{verdict.value}")
        return verdict

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

    def member_down(self, name: str, now: float) -> None:
        """A member failed or left: stop waiting for it (it is still named as missing)."""
        for pending in list(self._pending.values()):
            if pending.expected and name in pending.expected and name not in pending.answers:
                pending.down.add(name)
                if pending.complete():
                    self._finish(pending, now, timed_out=False)

    def get_timer(self) -> float:
        """The next deadline (absolute), math.inf when no query is in flight."""
        return min((p.deadline for p in self._pending.values()), default=math.inf)

    def handle_timer(self, now: float) -> None:
        for pending in list(self._pending.values()):
            if now >= pending.deadline:
                self._finish(pending, now, timed_out=True)

    def in_flight(self) -> int:
        return len(self._pending)

    def _finish(self, pending: _Pending, now: float, *, timed_out: bool) -> None:
        del self._pending[pending.query.id]
        expected = pending.expected or set()
        self.outbox.put(
            QueryDone(
                QueryResult(
                    id=pending.query.id,
                    name=pending.query.name,
                    responses=tuple(pending.answers.values()),
                    missing=tuple(sorted(expected - pending.answers.keys())),
                    elapsed_ms=(now - pending.started) * 1000.0,
                    timed_out=timed_out,
                )
            )
        )

    # --- answering --------------------------------------------------------------------------

    def on_query(self, msg: Query, local_site: str, local_tags: Mapping[str, str], now: float) -> QueryAction:
        verdict = self._judge(msg, local_site, local_tags)
        self._count(f"query.{verdict.value}")
        rebroadcast, respond = ON_QUERY[verdict]
        deadline = now + min(msg.timeout, self.limits.max_timeout)
        return QueryAction(msg, verdict, rebroadcast, respond, deadline)

    def _judge(self, msg: Query, local_site: str, local_tags: Mapping[str, str]) -> Verdict:
        limits = self.limits
        if (
            not (0 < msg.timeout <= limits.max_timeout)
            or not (0 <= msg.relay_factor <= limits.max_relay_factor)
            or filter_problem(msg.filters, limits) is not None
            or _encoded_size(msg) > limits.max_query_size
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
        """A Relay arrived: forward the inner answer to its destination (or take it if ours)."""
        if msg.dest == self.local_name:
            self.on_response(msg.response, now)
            return []
        self._count("relay.forwarded")
        return [self._outbound(msg.dest_addr, msg.response)]

    def _outbound(self, addr: str, message: QueryResponse | Relay) -> QueryOutbound:
        via_stream = _encoded_size(message) > self.limits.udp_response_size
        return QueryOutbound(addr, message, via_stream)

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n
