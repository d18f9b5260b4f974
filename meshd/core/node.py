"""A SWIM member with the whole Lifeguard set, independent of any I/O.

Driven by: datagrams (receive_datagram), TCP exchanges (handle_stream / stream_done), timer
expiry (handle_timer) and operator calls (join, leave, set_meta, key_op, ask, respond_query);
`MembershipCore` below is that surface. After any call, carry out take_effects() (one ordered
outbox of meshd.core.effects, queries included: meshd.core.pump does this), then re-arm one
timer from get_timer(). Time is always passed in as `now`; randomness comes from the given RNG.

State rules (memberlist state.go, with meshd's additions marked +):

  message   | about us                            | about another member
  ----------+-------------------------------------+-----------------------------------------
  alive     | newer incarnation, or same with a   | applies if its incarnation is newer;
            | different addr/meta: refute         | + same node id at a new address: applies
            |                                     | + different node id: only over dead/left
  suspect   | incarnation >= ours: refute,        | incarnation >= ours: alive -> suspect;
            | awareness +1                        | already suspect: counts a confirmation
  dead      | refute unless we are leaving        | incarnation >= ours: -> dead
            |                                     | (source == name: -> left)
  push-pull | alive -> alive; suspect/dead ->     | the same, so a remote "dead" is only a
            | suspect (refutable); left -> left   | suspicion here: partitions can heal

Bounds (issue 9: a key holder may lie, but only so far), each breach a counted drop:
incarnations stay in [0, max_incarnation] and move at most max_incarnation_jump above what we
know of a member in one message (so our own refutation never overflows: a wild claim about us
is ignored, not adopted); addresses are literal IP:port (meshd.units.parse_ip_port); names,
meta and push-pull sizes are capped; never-seen members are admitted at new_member_rate into a
table of at most max_members. A member we hold dead whose own Alive comes back far *below* our
record (more than a jump) is rebased to it: only lies can have pushed our record there, and
the restarted node could never refute them (it ignores wild claims about itself).

Probing: round-robin over a shuffled list; ping, then after probe_timeout indirect pings
through k peers (who nack when the target is silent) plus a TCP ping; no ack by the end of
the awareness-scaled interval -> suspect. A suspect target gets [ping, suspect] (buddy
system) so it can refute at once.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from meshd import PROTOCOL_VERSION, wire
from meshd.core import digest
from meshd.core.aggregate import Reducer, SiteMember, pick_aggregators
from meshd.core.awareness import Awareness
from meshd.core.broadcast import BroadcastQueue
from meshd.core.bucket import TokenBucket
from meshd.core.config import ProtocolConfig
from meshd.core.counters import Counters
from meshd.core.effects import (  # MemberEvent, MemberView: shells import them from here too
    AnswerQuery,
    EventKind,
    MemberEvent,
    MembershipEffect,
    MemberView,
    OpenStream,
    Outbox,
    SendDatagram,
    StreamKind,
)
from meshd.core.members import MemberRecord, RecordPool
from meshd.core.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    KeyOp,
    MemberState,
    Message,
    Nack,
    Ping,
    PushNodeState,
    PushPull,
    PushPullDigest,
    Query,
    QueryFilter,
    QueryResponse,
    Relay,
    SiteSummary,
    Suspect,
)
from meshd.core.query import (
    QueryAction,
    QueryEngine,
    QueryLimits,
    QueryOutbound,
    expected_members,
    split_meta,
)
from meshd.core.skew import SkewWatcher, format_offset
from meshd.core.suspicion import Suspicion, suspicion_timeout
from meshd.core.timings import Timings
from meshd.core.warnlimit import WarnLimiter
from meshd.crypto import Keyring
from meshd.errors import AuthError, DecodeError, MeshError, ReplayError, StateError
from meshd.replay import sender_id
from meshd.units import is_ip_port

log = logging.getLogger("meshd.node")

REPLAY_WARN_EVERY = 60.0  # refused envelopes: at most one warning per sender per minute
SKEW_SHOWN = 16  # skewed peers listed by clock_skew()


class _Member:
    """One member in this node's table: a shared record plus this node's view of its state.

    Three references per member (the record is interned, see meshd.core.members): at 10,000
    members this table is what a node's memory is made of.
    """

    __slots__ = ("rec", "state", "state_change")

    def __init__(self, rec: MemberRecord, state: MemberState, state_change: float) -> None:
        self.rec = rec
        self.state = state
        self.state_change = state_change

    @property
    def name(self) -> str:
        return self.rec.name

    @property
    def node_id(self) -> str:
        return self.rec.node_id

    @property
    def addr(self) -> str:
        return self.rec.addr

    @property
    def incarnation(self) -> int:
        return self.rec.incarnation

    @property
    def meta(self) -> Mapping[str, str]:
        return self.rec.meta

    def view(self) -> MemberView:
        r = self.rec  # meta copied: consumers may edit their view, never the shared record
        return MemberView(
            r.name, r.node_id, r.addr, self.state, r.incarnation, dict(r.meta), self.state_change
        )


@dataclass
class _Probe:
    seq: int
    target: str
    start: float
    ack_deadline: float
    end: float
    acked: bool = False
    indirect_done: bool = False
    nack_deadline: float = 0.0  # until when nacks still count for our local health
    expected_nacks: int = 0
    nacks: int = 0
    tcp_acked: bool = False


@dataclass
class _Relay:
    origin_addr: str
    origin_seq: int
    nack: bool
    deadline: float


@dataclass
class _Stream:
    kind: StreamKind
    target: str = ""
    probe_seq: int = 0


@dataclass
class _Timers:
    probe: float = 0.0
    gossip: float = 0.0
    push_pull: float = 0.0
    reconnect: float = 0.0
    reap: float = 0.0


DEAD_STATES = (MemberState.DEAD, MemberState.LEFT)
# A compound body's array header grows from 1 to 3 bytes past 15 parts; budget for the worst.
COMPOUND_HEADER_MAX = 3
MAX_SEEN_KEYOPS = 256
# A datagram body may not decompress past this (a key holder could otherwise inflate 64 KiB
# into megabytes); big news goes over TCP anyway.
MAX_DATAGRAM_BODY = 1 << 20
JOIN_TIMEOUT_MIN = 5.0
QUERY_DIRECT_FAN_OUT = 64  # members a query is also sent to directly; gossip covers the rest
# Random picks tried before a sample falls back to scanning the table (few members qualify).
SAMPLE_TRIES_PER_PICK = 4
SAMPLE_TRIES_EXTRA = 16
REAP_HEAP_SLACK = 64  # stale reap entries tolerated beyond twice the members down
MAX_PROTOCOL = 255  # a member's announced protocol is clamped to this (stored per record)
DIGEST_PROTOCOL = 2  # peers announcing at least this get the digest exchange (PushPullDigest)
# Every so many periodic exchanges one is a full push-pull anyway, so a digest collision (or a
# difference the buckets cannot show) cannot hide for long: every 8th, or every N/128-th in a
# bigger table, so its cost amortized per round stays ~128 records (~8 KB, about one digest)
# instead of growing with N.
FULL_PUSH_PULL_EVERY = 8
FULL_PUSH_PULL_MEMBERS = 128


@dataclass(frozen=True)
class NodeStats:
    """What /metrics shows of a node's insides, read in one call (the shell never reaches in)."""

    health_score: int  # Lifeguard awareness: 0 = healthy
    broadcast_queue: int  # messages waiting to be gossiped
    queries_in_flight: int  # queries this node asked, not finished yet
    counters: dict[str, int]  # dotted event counts, the query engine's under "queries."


class MembershipCore(Protocol):
    """What a shell drives: NodeRuntime is typed against this, Node implements it."""

    # --- views (read by the shell, its API and /metrics)
    @property
    def name(self) -> str: ...
    @property
    def addr(self) -> str: ...
    @property
    def config(self) -> ProtocolConfig: ...
    @property
    def meta(self) -> dict[str, str]: ...
    @property
    def incarnation(self) -> int: ...
    @property
    def codec(self) -> wire.Codec: ...  # the shell's request tokens are sealed with it too
    def members(self) -> list[MemberView]: ...
    def member(self, name: str) -> MemberView | None: ...
    def num_active(self) -> int: ...
    def leave_pending(self) -> bool: ...
    def stats(self) -> NodeStats: ...
    def take_probe_rtts(self) -> list[tuple[str, float]]: ...
    def clock_skew(self) -> dict[str, Any]: ...

    # --- inputs
    def receive_datagram(self, data: bytes, addr: str, now: float) -> None: ...
    def handle_stream(self, data: bytes, addr: str, now: float) -> bytes | None: ...
    def stream_done(self, stream_id: int, reply: bytes | None, now: float) -> None: ...
    def handle_timer(self, now: float) -> None: ...
    def join(self, addrs: Iterable[str], now: float) -> list[int]: ...
    def leave(self, now: float) -> None: ...
    def set_meta(self, meta: dict[str, str], now: float) -> None: ...
    def set_addr(self, addr: str, now: float) -> None: ...
    def key_op(self, op: str, key: bytes, now: float) -> None: ...
    def ask(
        self,
        name: str,
        payload: bytes,
        filters: QueryFilter,
        timeout: float,
        relay_factor: int,
        now: float,
        aggregate: str = "",
    ) -> int: ...
    def respond_query(self, action: QueryAction, payload: bytes, now: float) -> None: ...
    def cancel_query(self, query_id: int) -> None: ...

    # --- outputs
    def take_effects(self) -> list[MembershipEffect]: ...
    def get_timer(self) -> float: ...


_IN_KEYS: dict[type, str] = {}  # message class -> its counter ("msgs.in.ping"), made once


class Node:
    def __init__(
        self,
        name: str,
        node_id: str,
        addr: str,
        config: ProtocolConfig,
        codec: wire.Codec,
        rng: random.Random,
        now: float,
        meta: dict[str, str] | None = None,
        incarnation: int = 0,
        seen_keyops: Iterable[int] = (),
        skew: SkewWatcher | None = None,
        reducer: Reducer | None = None,
        pool: RecordPool | None = None,
    ) -> None:
        """`reducer`: how this node sums up its site's answers to an aggregated query when it
        aggregates them (meshd.core.aggregate; the shell's, pure)."""
        self.name = name
        self.node_id = node_id
        self.addr = addr
        self.config = config
        self.codec = codec
        self.rng = rng
        self.awareness = Awareness(config.awareness_max_multiplier)
        self.broadcasts = BroadcastQueue(config.retransmit_mult)
        self.counters = Counters()
        self.probe_rtts = Timings()  # ("direct" | "indirect", seconds), taken by the shell
        self.leaving = False
        self.skew = skew or SkewWatcher()
        self._replay_warnings = WarnLimiter(REPLAY_WARN_EVERY)

        # Records are interned here; the simulator passes one pool to every node it runs.
        self._pool = pool if pool is not None else RecordPool()
        self._members: dict[str, _Member] = {}
        self._active = 0  # num_active(), kept by _set_state
        # Every other member in probe order (round-robin, reshuffled on wrap); random samples
        # for gossip, relays and push-pull are drawn from it too (see _sample).
        self._ring: list[_Member] = []
        self._probe_index = 0
        self._down: dict[str, _Member] = {}  # dead and left members (reconnect picks from these)
        self._reap_heap: list[tuple[float, int, _Member]] = []  # (state_change, seq, member), lazy
        self._reap_seq = 0
        self._probe: _Probe | None = None
        self._nack_waits: dict[int, _Probe] = {}  # failed probes still collecting nacks
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._streams: dict[int, _Stream] = {}
        self._seq = rng.randrange(1 << 30)
        self._stream_id = 0
        # Persisted by the shell (seen_keyops()) so a replay after a restart is not applied again.
        self._seen_keyops: deque[int] = deque(seen_keyops, maxlen=MAX_SEEN_KEYOPS)
        self._new_members = TokenBucket(config.new_member_rate, config.new_member_burst, now)

        self._outbox: Outbox[MembershipEffect] = Outbox()
        self.queries = QueryEngine(
            name,
            addr,
            rng,
            QueryLimits(udp_response_size=config.packet_budget - codec.overhead - COMPOUND_HEADER_MAX - 64),
            outbox=self._outbox,
            reducer=reducer,
        )  # finished queries join the same ordered outbox

        incarnation = min(max(incarnation, 0), config.max_incarnation)
        self._me = _Member(
            self._pool.record(name, node_id, addr, incarnation, meta or {}, PROTOCOL_VERSION),
            MemberState.ALIVE,
            now,
        )
        self._members[name] = self._me
        # Per-bucket sums of the table, kept on every change (digest anti-entropy, digest.py).
        self._digest = digest.TableDigest()
        self._digest_add(self._me)
        self._digests_left = FULL_PUSH_PULL_EVERY  # periodic rounds until a full push-pull is due
        self._full_next = ""  # a peer whose digest exchange failed: full push-pull with it next
        # Members of our own site (us included), kept as records change: an aggregated query
        # asks every node for its site's members, which must not cost a scan of the table.
        self._site_mates: dict[str, _Member] = {name: self._me}
        self._active = 1
        # Spread the timers so nodes started together do not probe in lockstep.
        self._timers = _Timers(
            probe=now + rng.random() * config.probe_interval,
            gossip=now + rng.random() * config.gossip_interval,
            push_pull=now + self._push_pull_interval() * (0.5 + rng.random() / 2),
            reconnect=now + config.reconnect_interval,
            reap=now + 1.0,
        )
        self._queue_alive(self._me)

    # --- views ---------------------------------------------------------------------------------

    def members(self) -> list[MemberView]:
        return [m.view() for m in self._members.values()]

    def member(self, name: str) -> MemberView | None:
        m = self._members.get(name)
        return m.view() if m else None

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    @property
    def meta(self) -> dict[str, str]:
        return dict(self._me.meta)

    def load_members(self, records: Iterable[MemberRecord], now: float) -> int:
        """Take in members known alive (a snapshot, a converged mesh): no events, no news.

        Names already listed (us included) are skipped; at most max_members are held. Returns
        how many were added. Their probe order is shuffled once here.
        """
        added: list[_Member] = []
        room = self.config.max_members - len(self._members)
        # _track_site inlined, the lookups hoisted: a warm 10,000-node simulation runs this
        # loop 10^8 times.
        members, mates, adopt = self._members, self._site_mates, self._pool.adopt
        site = self._me.meta.get("site", "")
        alive = MemberState.ALIVE
        for rec in records:
            if len(added) >= room:
                break
            if rec.name in members:
                continue
            rec = adopt(rec)
            m = _Member(rec, alive, now)
            members[rec.name] = m
            if rec.meta.get("site", "") == site:
                mates[rec.name] = m
            added.append(m)
        self.rng.shuffle(added)
        # Not yet probed this round: after the current position, in random order.
        self._ring[self._probe_index : self._probe_index] = added
        if added:
            self._digest_fit(force=True)  # one pass at the final size, not a rebuild per doubling
        self._active += len(added)
        if added:
            # Anti-entropy paced for the table we now hold, not the empty one we started with
            # (else every node of a loaded mesh pushes its whole table within the base interval).
            self._timers.push_pull = now + self._push_pull_interval() * (0.5 + self.rng.random() / 2)
        return len(added)

    def table_digest(self) -> bytes:
        """Our member table's per-bucket digest as PushPullDigest carries it (meshd.core.digest)."""
        return digest.to_bytes(self._digest.values)

    def seen_keyops(self) -> list[int]:
        """Keyring operations already applied or passed on, oldest first (for the shell to persist)."""
        return list(self._seen_keyops)

    @property
    def last_keyop(self) -> int | None:
        """The newest of seen_keyops(), without copying them (checked after every core call)."""
        return self._seen_keyops[-1] if self._seen_keyops else None

    def take_probe_rtts(self) -> list[tuple[str, float]]:
        """The probe round trips measured since the last call: ("direct"|"indirect", seconds)."""
        return self.probe_rtts.take()

    def stats(self) -> NodeStats:
        counters = dict(self.counters)
        counters.update({f"queries.{k}": v for k, v in self.queries.counters.items()})
        return NodeStats(self.awareness.score, len(self.broadcasts), self.queries.in_flight(), counters)

    def clock_skew(self) -> dict[str, Any]:
        """Peers whose clocks differ from ours beyond the threshold (SkewWatcher.view()), and the
        most skewed of them: [{"name", "id", "offset_s"}], names when they are members."""
        view: dict[str, Any] = dict(self.skew.view())
        worst = sorted(self.skew.skewed().items(), key=lambda kv: -abs(kv[1]))[:SKEW_SHOWN]
        names = self._names_by_sender({s for s, _ in worst})
        view["skewed"] = [
            {"name": names.get(s, ""), "id": s.hex(), "offset_s": round(off, 3)} for s, off in worst
        ]
        return view

    def num_active(self) -> int:
        """Members that count for the protocol's formulas: alive and suspect, us included."""
        return self._active

    # --- outputs -------------------------------------------------------------------------------

    def take_effects(self) -> list[MembershipEffect]:
        """Everything queued since the last call, in order (see meshd.core.effects)."""
        return self._outbox.take()

    def get_timer(self) -> float:
        t = self._timers
        deadline = min(t.probe, t.gossip, t.push_pull, t.reconnect, t.reap, self.queries.get_timer())
        p = self._probe
        if p is not None and not p.acked:
            deadline = min(deadline, p.end if p.indirect_done else p.ack_deadline)
        for w in self._nack_waits.values():
            deadline = min(deadline, w.nack_deadline)
        for r in self._relays.values():
            deadline = min(deadline, r.deadline)
        for s in self._suspicions.values():
            deadline = min(deadline, s.deadline)
        return deadline

    # --- operator inputs -----------------------------------------------------------------------

    def join(self, addrs: Iterable[str], now: float) -> list[int]:
        """Push-pull with each seed; returns the stream ids (reported back via stream_done)."""
        return [self._open_push_pull(a, "join", now) for a in addrs if a != self.addr]

    def leave(self, now: float) -> None:
        """Tell the mesh we are leaving on purpose: members will list us as `left`."""
        if self.leaving:
            return
        self.leaving = True
        me = self._me
        self._set_state(me, MemberState.LEFT, now)
        self.broadcasts.queue("m:" + me.name, wire.encode_message(Dead(me.incarnation, me.name, me.name)))
        # Do not wait for the next gossip tick: the process is about to exit.
        self._gossip(now)

    def leave_pending(self) -> bool:
        """True while our leave message still has transmissions to make."""
        return self.leaving and self.broadcasts.pending("m:" + self.name)

    def set_meta(self, meta: dict[str, str], now: float) -> None:
        """StateError when peers would drop it (over max_meta_entries / max_meta_bytes)."""
        if meta == self._me.meta:
            return
        if not self._meta_fits(meta):
            size = sum(len(k) + len(v) for k, v in meta.items())
            raise StateError(
                f"node metadata of {len(meta)} entries, {size} bytes is over the limit "
                f"({self.config.max_meta_entries} entries, {self.config.max_meta_bytes} bytes)"
            )
        old_site = self._me.meta.get("site", "")
        self._set_rec(self._me, self._rec(self._me.rec, meta=meta))
        if meta.get("site", "") != old_site:  # we moved: rebuild our site's index (rare, O(N))
            self._site_mates = {
                m.name: m for m in self._members.values() if m.meta.get("site", "") == meta.get("site", "")
            }
        self._bump_own()
        self._queue_alive(self._me)
        self._emit("update", self._me, now)

    def ask(
        self,
        name: str,
        payload: bytes,
        filters: QueryFilter,
        timeout: float,
        relay_factor: int,
        now: float,
        aggregate: str = "",
    ) -> int:
        """Start a gossip query; its QueryResult comes out as a QueryDone effect.

        `aggregate="site"`: one summary per site comes back (meshd.core.aggregate)."""
        alive = [
            (m.name, *split_meta(m.meta)) for m in self._members.values() if m.state == MemberState.ALIVE
        ]
        expected = expected_members(filters, alive)
        site_of = None
        down: set[str] = set()
        if aggregate:
            site_of = {
                m.name: split_meta(m.meta)[0] for m in self._members.values() if m.state != MemberState.LEFT
            }
            down_states = (MemberState.SUSPECT, MemberState.DEAD)
            held_down = [
                (m.name, *split_meta(m.meta)) for m in self._members.values() if m.state in down_states
            ]
            down = expected_members(filters, held_down)
        qid = self.queries.originate(
            name,
            payload,
            filters,
            timeout,
            relay_factor,
            expected,
            now,
            aggregate=aggregate,
            site_of=site_of,
            down=down,
        )
        msg = self.queries.query_message(qid)
        if msg is None:
            return qid  # nobody to wait for
        self._handle_query(msg, now)
        if aggregate:
            self._send_to_aggregators(msg, expected, alive)
            return qid
        # Gossip reaches everyone only with high probability (a small mesh's retransmit limit
        # misses a node now and then, and the query then waits out its timeout): send it
        # straight to the members expected to answer too; receivers de-duplicate the copies.
        targets = [self._members[n] for n in sorted(expected) if n != self.name]
        if len(targets) > QUERY_DIRECT_FAN_OUT:
            targets = self.rng.sample(targets, QUERY_DIRECT_FAN_OUT)
        data = wire.encode_message(msg)
        for m in targets:
            self._send(m.addr, [data], m.node_id)
        self.counters.inc("queries.direct", len(targets))
        return qid

    def _send_to_aggregators(
        self, msg: Query, expected: set[str], alive: list[tuple[str, str, dict[str, str]]]
    ) -> None:
        """The query straight to each site's aggregator and its backup as we see them."""
        by_site: dict[str, list[str]] = {}
        for member, site, _ in alive:
            by_site.setdefault(site, []).append(member)
        sites = {site for member, site, _ in alive if member in expected}
        data = wire.encode_message(msg)
        sent = 0
        for site in sorted(sites):
            for chosen in pick_aggregators(msg.id, msg.ltime, by_site[site]):
                if chosen != self.name:
                    m = self._members[chosen]
                    self._send(m.addr, [data], m.node_id)
                    sent += 1
        self.counters.inc("queries.direct", sent)

    def respond_query(self, action: QueryAction, payload: bytes, now: float) -> None:
        # Only as many alive members as the query relays through (never the origin): a random
        # sample of the table is a random sample of what the engine would have picked from.
        origin = action.query.origin
        relays = [
            (m.name, m.addr)
            for m in self._sample(
                action.query.relay_factor, lambda m: m.state == MemberState.ALIVE and m.name != origin
            )
        ]
        self._send_query_out(self.queries.respond(action, payload, relays, now))

    def cancel_query(self, query_id: int) -> None:
        """Forget a query this node asked, without a result (the asker went away)."""
        self.queries.cancel(query_id)

    def set_addr(self, addr: str, now: float) -> None:
        """Our address changed (DHCP, a new uplink): a new incarnation tells the mesh."""
        if addr == self.addr:
            return
        self.addr = self.queries.local_addr = addr
        self._set_rec(self._me, self._rec(self._me.rec, addr=addr))
        self._bump_own()
        self._queue_alive(self._me)
        self._emit("update", self._me, now)

    def key_op(self, op: str, key: bytes, now: float) -> None:
        """Apply a keyring change here (StateError if it does not fit) and spread it."""
        ring = self.codec.keyring
        if ring is None:
            raise StateError("insecure node: no keyring")
        msg = KeyOp(self.rng.getrandbits(62), op, key)
        self._apply_keyop(ring, msg)
        self._seen_keyops.append(msg.op_id)
        self._emit("keyring", self._me, now)
        self.broadcasts.queue(f"k:{msg.op_id}", wire.encode_message(msg))

    # --- network inputs ------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: str, now: float) -> None:
        try:
            opened = self.codec.open_envelope(data, max_size=MAX_DATAGRAM_BODY)
            msgs = wire.decode_body(opened.body)
        except DecodeError as e:
            self._count_drop(e, now)
            return
        self._observe_clock(opened, now)
        self.counters.inc("packets.in")
        self.counters.inc("bytes.in", len(data))
        for msg in msgs:
            self._dispatch(msg, addr, now)

    def handle_stream(self, data: bytes, addr: str, now: float) -> bytes | None:
        """Serve one inbound TCP exchange; returns the sealed reply (None: nothing to say)."""
        try:
            opened = self.codec.open_envelope(data)
            msgs = wire.decode_body(opened.body)
        except DecodeError as e:
            self._count_drop(e, now)
            return None
        self._observe_clock(opened, now)
        self.counters.inc("streams.in")
        reply: list[bytes] = []
        for msg in msgs:
            if isinstance(msg, PushPull):
                self.counters.inc("push_pull.in")
                if not self._push_pull_ok(msg):
                    continue
                # Merge first: a refutation of what they say about us goes into our reply.
                self._merge(msg.states, now)
                self.queries.witness_push_pull(msg.query_ltime)
                if msg.bucket_count:
                    # A digest exchange's second half (their records of the differing buckets):
                    # nothing to send back, the Ack(0) below answers it.
                    self.counters.inc("push_pull.repair.in")
                    continue
                reply.append(wire.encode_message(self._push_pull(False, True)))
            elif isinstance(msg, PushPullDigest):
                self.counters.inc("push_pull.digest.in")
                answer = self._answer_digest(msg)
                if answer is not None:
                    reply.append(wire.encode_message(answer))
            elif isinstance(msg, Ping):
                if msg.target and msg.target != self.name:
                    self.counters.inc("drops.misdirected")
                    continue
                reply.append(wire.encode_message(Ack(msg.seq, self.name)))
            else:
                self._dispatch(msg, addr, now)
        if not reply:
            if all(isinstance(m, Ping) for m in msgs):
                return None  # only pings meant for someone else: nothing to say
            reply.append(wire.encode_message(Ack(0, self.name)))
        return self.codec.pack(reply, opened.sender.hex())

    def stream_done(self, stream_id: int, reply: bytes | None, now: float) -> None:
        st = self._streams.pop(stream_id, None)
        if st is None:
            return
        if reply is None:
            self.counters.inc(f"streams.failed.{st.kind}")
            self._digest_failed(st)
            return
        try:
            opened = self.codec.open_envelope(reply)
            msgs = wire.decode_body(opened.body)
        except DecodeError as e:
            self._count_drop(e, now)
            self._digest_failed(st)
            return
        self._observe_clock(opened, now)
        answered = False
        for msg in msgs:
            if isinstance(msg, PushPull):
                if not self._push_pull_ok(msg):
                    continue
                # A node that knew nobody takes the whole table its seed sent (a keyed peer it
                # asked): the new-member rate is for gossip, and at 10,000 members it would keep
                # most of the mesh out until the next push-pull, minutes later. It still passes
                # each member on (memberlist does too): in a cold start many nodes join at once
                # and know different parts of the mesh, and those announcements are what
                # converges them; staying quiet left nodes apart for over a minute.
                bootstrap = st.kind == "join" and len(self._members) == 1
                self._merge(msg.states, now, bootstrap=bootstrap)
                self.queries.witness_push_pull(msg.query_ltime)
                if st.kind == "join":
                    self.counters.inc("join.ok")
                elif st.kind == "digest" and msg.reply and msg.bucket_count and not answered:
                    answered = True
                    self._repair(st.target, msg, now)
            elif (
                isinstance(msg, Ack)
                and st.kind == "reconnect"
                and st.probe_seq
                and msg.seq == st.probe_seq
                and msg.source == st.target
            ):
                # The dead member answers (a partition healed, it came back): now the push-pull.
                m = self._members.get(st.target)
                if m is not None and m.state == MemberState.DEAD and not self.leaving:
                    self.counters.inc("reconnects.answered")
                    self._open_push_pull(m.addr, "reconnect", now, m.name)
            elif (
                isinstance(msg, Ack)
                and st.kind == "tcp_ping"
                and msg.seq == st.probe_seq
                and msg.source == st.target
            ):
                # Only the member we probe counts: another node now at its old address
                # must not keep a dead member alive.
                p = self._probe
                if p is not None and p.seq == st.probe_seq:
                    p.tcp_acked = True
        if st.kind == "digest" and not answered:
            self._digest_failed(st)  # an Ack or garbage instead of the bucket reply

    def handle_timer(self, now: float) -> None:
        t = self._timers
        p = self._probe
        if p is not None and not p.acked:
            if not p.indirect_done and now >= p.ack_deadline:
                self._indirect_probe(p, now)
            if p.indirect_done and now >= p.end:
                self._probe_failed(p, now)
        if self._nack_waits:
            for seq in [q for q, w in self._nack_waits.items() if now >= w.nack_deadline]:
                self._judge_own_health(self._nack_waits.pop(seq))
        if self._relays:
            for seq in [s for s, r in self._relays.items() if now >= r.deadline]:
                r = self._relays.pop(seq)
                if r.nack:
                    self._send(r.origin_addr, [wire.encode_message(Nack(r.origin_seq))])
        if self._suspicions:
            for name in [n for n, s in self._suspicions.items() if now >= s.deadline]:
                self._suspicion_expired(name, now)
        self._send_query_out(self.queries.handle_timer(now))
        if now >= t.probe:
            self._start_probe(now)
        if now >= t.gossip:
            t.gossip = now + self.config.gossip_interval
            self._gossip(now)
        if now >= t.push_pull:
            t.push_pull = now + self._push_pull_interval()
            self._periodic_push_pull(now)
        if now >= t.reconnect:
            t.reconnect = now + self.config.reconnect_interval
            self._reconnect(now)
        if now >= t.reap:
            t.reap = now + 1.0
            self._reap(now)

    # --- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, msg: Message, addr: str, now: float) -> None:
        kind = type(msg)
        key = _IN_KEYS.get(kind)
        if key is None:
            key = _IN_KEYS[kind] = "msgs.in." + kind.__name__.lower()
        self.counters.inc(key)
        if not self._addrs_ok(msg):
            return
        if isinstance(msg, Ping):
            self._handle_ping(msg, now)
        elif isinstance(msg, IndirectPing):
            self._handle_indirect_ping(msg, now)
        elif isinstance(msg, Ack):
            self._handle_ack(msg, now)
        elif isinstance(msg, Nack):
            p = self._probe if self._probe is not None and self._probe.seq == msg.seq else None
            p = p or self._nack_waits.get(msg.seq)
            if p is not None:
                p.nacks += 1
        elif isinstance(msg, Alive):
            self._alive(msg, now)
        elif isinstance(msg, Suspect):
            self._suspect(msg, now)
        elif isinstance(msg, Dead):
            self._dead(msg, now)
        elif isinstance(msg, PushPull):
            if self._push_pull_ok(msg):
                self._merge(msg.states, now)  # only valid over TCP, but harmless
        elif isinstance(msg, KeyOp):
            self._handle_keyop(msg, now)
        elif isinstance(msg, Query):
            self._handle_query(msg, now)
        elif isinstance(msg, QueryResponse):
            self.queries.on_response(msg, now)
        elif isinstance(msg, Relay):
            self._send_query_out(self.queries.on_relay(msg, now))
        elif isinstance(msg, SiteSummary):
            self.queries.on_site_summary(msg, now)

    # --- bounds on what peers claim (see the module docstring) --------------------------------

    def _drop(self, why: str, detail: object) -> bool:
        self.counters.inc("drops." + why)
        log.debug("dropped %s: %r", why, detail)
        return False

    def _addr_ok(self, addr: str) -> bool:
        return (isinstance(addr, str) and is_ip_port(addr)) or self._drop("addr", addr)

    def _addrs_ok(self, msg: Message) -> bool:
        """Every address a message makes us send to is a literal IP:port (no DNS, no garbage)."""
        if isinstance(msg, Ping):
            return self._addr_ok(msg.source_addr)
        if isinstance(msg, IndirectPing):
            return self._addr_ok(msg.target_addr) and self._addr_ok(msg.source_addr)
        if isinstance(msg, Query):
            return self._addr_ok(msg.origin_addr)
        if isinstance(msg, Relay):
            return self._addr_ok(msg.dest_addr)
        return True  # Alive's addr is checked with the rest of the record (_record_ok)

    def _record_ok(self, name: str, node_id: str, addr: str, meta: dict[str, str]) -> bool:
        """A member record (Alive, push-pull state) within the name, meta and address bounds."""
        known = self._members.get(name)
        if known is not None:
            r = known.rec
            if r.addr == addr and r.node_id == node_id and r.meta == meta:
                return True  # what we hold passed these checks (push-pull repeats every record)
        cfg = self.config
        if not 0 < len(name) <= cfg.max_name_len or len(node_id) > cfg.max_name_len:
            return self._drop("name", name[:64])
        if not self._meta_fits(meta):
            return self._drop("meta", name)
        return self._addr_ok(addr)

    def _meta_fits(self, meta: dict[str, str]) -> bool:
        """Within max_meta_entries and max_meta_bytes (keys and values): what peers accept."""
        cfg = self.config
        if len(meta) > cfg.max_meta_entries:
            return False
        return sum(len(k) + len(v) for k, v in meta.items()) <= cfg.max_meta_bytes

    def _incarnation_ok(self, incarnation: int, known: int | None, name: str) -> bool:
        """Within [0, max_incarnation], and at most one jump above what we know (if we do)."""
        cfg = self.config
        if not 0 <= incarnation <= cfg.max_incarnation or (
            known is not None and incarnation - known > cfg.max_incarnation_jump
        ):
            return self._drop("incarnation", (name, incarnation, known))
        return True

    def _push_pull_ok(self, msg: PushPull) -> bool:
        if len(msg.states) > self.config.max_members:
            return self._drop("push_pull_size", len(msg.states))
        if msg.bucket_count or msg.buckets:
            count = msg.bucket_count
            if (
                digest.bits_of(count) is None
                or len(msg.buckets) > count
                or not all(0 <= b < count for b in msg.buckets)
            ):
                return self._drop("push_pull_buckets", (count, len(msg.buckets)))
        return True

    def _admit_new_member(self, name: str, now: float, rate_limited: bool = True) -> bool:
        """A never-seen member costs a table slot and dials: both are bounded."""
        if len(self._members) >= self.config.max_members:
            return self._drop("members_full", name)
        if rate_limited and not self._new_members.take(now):
            return self._drop("new_member_rate", name)
        return True

    def _count_drop(self, e: MeshError, now: float) -> None:
        kind = "replay" if isinstance(e, ReplayError) else "auth" if isinstance(e, AuthError) else "decode"
        self.counters.inc("drops." + kind)
        if isinstance(e, ReplayError):
            # Authentic but refused: a replay, or a peer that lost its state. Never silent, but
            # one line per sender per minute whatever an attacker replays.
            n = self._replay_warnings.hit(e.sender, now)
            if n is not None:
                log.warning(
                    "refused %d envelope(s) from %s in the last %gs at most (%s): replayed traffic, "
                    "or a sender that restarted without its state and with its clock behind",
                    n, self._who(e.sender), REPLAY_WARN_EVERY, e,
                )  # fmt: skip
                return
        log.debug("dropped packet: %s", e)

    def _observe_clock(self, opened: wire.Opened, now: float) -> None:
        notice = self.skew.observe(opened.sender, opened.stamp, self.codec.clock.wall(), now)
        if notice is None:
            return
        who = self._who(notice.sender)
        if notice.skewed:
            self.counters["clock.skewed"] = self.skew.became_skewed  # peers that crossed it
            log.warning(
                "peer %s's clock is %s ours; distribution and membership are unaffected (stamps "
                "are compared per sender)",
                who, format_offset(notice.offset_s),
            )  # fmt: skip
        else:
            log.info("peer %s's clock is back within %gs of ours", who, self.skew.threshold_s)

    def _names_by_sender(self, senders: set[bytes]) -> dict[bytes, str]:
        found: dict[bytes, str] = {}
        if senders:
            for m in self._members.values():
                sid = sender_id(m.node_id)
                if sid in senders:
                    found[sid] = m.name
        return found

    def _who(self, sender: bytes) -> str:
        """A member's name and sender id for a log line (just the id when unknown)."""
        if not sender:
            return "an unknown sender"
        name = self._names_by_sender({sender}).get(sender)
        return f"{name} ({sender.hex()})" if name else sender.hex()

    # --- probing -------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _next_target(self) -> _Member | None:
        ring = self._ring
        for _ in range(2):
            while self._probe_index < len(ring):
                m = ring[self._probe_index]
                self._probe_index += 1
                if m.state not in DEAD_STATES:
                    return m
            # Wrapped around: reshuffle (memberlist resetNodes), O(N) once per N probes.
            self.rng.shuffle(ring)
            self._probe_index = 0
        return None

    def _sample(self, k: int, ok: Callable[[_Member], bool]) -> list[_Member]:
        """Up to k distinct random members that pass `ok`, uniformly.

        Random picks from the ring until k pass: constant time while most members qualify
        (alive ones, in a healthy mesh). Only when many picks miss (few qualify, or fewer
        than k exist) does one scan of the table decide.
        """
        ring = self._ring
        n = len(ring)
        if k <= 0 or n == 0:
            return []
        picked: list[_Member] = []
        if k * SAMPLE_TRIES_PER_PICK < n:
            tried: set[int] = set()
            rand = self.rng.randrange
            for _ in range(k * SAMPLE_TRIES_PER_PICK + SAMPLE_TRIES_EXTRA):
                i = rand(n)
                if i in tried:
                    continue
                tried.add(i)
                m = ring[i]
                if ok(m):
                    picked.append(m)
                    if len(picked) == k:
                        return picked
        candidates = [m for m in ring if ok(m)]
        return self.rng.sample(candidates, min(k, len(candidates)))

    def _start_probe(self, now: float) -> None:
        interval = self.awareness.scale(self.config.probe_interval)
        self._timers.probe = now + interval
        if self.leaving:
            return
        m = self._next_target()
        if m is None:
            self._probe = None
            return
        seq = self._next_seq()
        self._probe = _Probe(seq, m.name, now, now + self.config.probe_timeout, now + interval)
        msgs = [wire.encode_message(Ping(seq, m.name, self.name, self.addr))]
        if m.state == MemberState.SUSPECT:
            # Buddy system: tell the target it is suspected so it can refute right away.
            msgs.append(wire.encode_message(Suspect(m.incarnation, m.name, self.name)))
        self.counters.inc("probes")
        self._send(m.addr, msgs, m.node_id)

    def _indirect_probe(self, p: _Probe, now: float) -> None:
        p.indirect_done = True
        # Relays nack after their own probe timeout; give the nack a round trip more to come
        # back. (memberlist stops counting at the end of the interval, which a relay's nack
        # cannot meet at the LAN and WAN presets, so true failures hurt the prober's score.)
        p.nack_deadline = max(p.end, now + self.config.probe_timeout * 1.5)
        target = self._members.get(p.target)
        if target is None:
            return
        relays = self._sample(
            self.config.indirect_checks, lambda m: m.state == MemberState.ALIVE and m is not target
        )
        p.expected_nacks = len(relays)
        req = wire.encode_message(IndirectPing(p.seq, target.name, target.addr, self.name, self.addr, True))
        for r in relays:
            self._send(r.addr, [req], r.node_id)
        # TCP fallback in parallel: catches a UDP-only fault between us and the target.
        ping = wire.encode_message(Ping(p.seq, target.name, self.name, self.addr))
        data = self.codec.pack([ping], target.node_id)
        sid = self._new_stream(_Stream("tcp_ping", target.name, p.seq))
        self._outbox.put(
            OpenStream(sid, target.addr, data, max(0.01, p.end - now), "tcp_ping", target.node_id)
        )

    def _handle_ack(self, msg: Ack, now: float) -> None:
        p = self._probe
        if p is not None and p.seq == msg.seq and not p.acked:
            p.acked = True
            # After the probe timeout the ack may have come through a relay (memberlist times
            # the probe from its ping too).
            self.probe_rtts.add("indirect" if p.indirect_done else "direct", now - p.start)
            self.awareness.apply_delta(-1)
            return
        r = self._relays.pop(msg.seq, None)
        if r is not None:
            self._send(r.origin_addr, [wire.encode_message(Ack(r.origin_seq, msg.source))])

    def _probe_failed(self, p: _Probe, now: float) -> None:
        self._probe = None
        self._nack_waits[p.seq] = p
        if now >= p.nack_deadline:
            self._judge_own_health(self._nack_waits.pop(p.seq))
        if p.tcp_acked:
            self.counters.inc("probes.tcp_only")
            log.debug("reached %s over TCP but UDP probes failed: network may be misconfigured", p.target)
            return
        m = self._members.get(p.target)
        if m is None or m.state in DEAD_STATES:
            return
        self.counters.inc("probes.failed")
        self._suspect(Suspect(m.incarnation, m.name, self.name), now)

    def _judge_own_health(self, p: _Probe) -> None:
        """Lifeguard: relays that should have nacked and did not mean *we* may be the slow one."""
        if p.expected_nacks > 0:
            self.awareness.apply_delta(max(0, p.expected_nacks - p.nacks))
        else:
            self.awareness.apply_delta(1)

    def _handle_ping(self, msg: Ping, now: float) -> None:
        if msg.target and msg.target != self.name:
            self.counters.inc("drops.misdirected")
            return
        self._send(
            msg.source_addr, [wire.encode_message(Ack(msg.seq, self.name))], self._node_id_of(msg.source)
        )

    def _handle_indirect_ping(self, msg: IndirectPing, now: float) -> None:
        seq = self._next_seq()
        self._relays[seq] = _Relay(msg.source_addr, msg.seq, msg.nack, now + self.config.probe_timeout)
        self._send(msg.target_addr, [wire.encode_message(Ping(seq, msg.target, self.name, self.addr))])

    # --- state transitions ---------------------------------------------------------------------

    def _alive(self, msg: Alive, now: float, bootstrap: bool = False) -> None:
        """`bootstrap`: from our first join's table; a member we did not know is added without
        the new-member rate (max_members still holds)."""
        if not self._record_ok(msg.name, msg.node_id, msg.addr, msg.meta):
            return
        proto = min(max(msg.protocol, 1), MAX_PROTOCOL)  # stored per record: keep it a small int
        m = self._members.get(msg.name)
        if not self._incarnation_ok(msg.incarnation, None, msg.name):
            return
        if msg.name == self.name:
            me = self._me
            if self.leaving:
                return
            if not self._incarnation_ok(msg.incarnation, me.incarnation, msg.name):
                return  # a wild claim about us: refuting it would hand the liar our counter
            if msg.incarnation > me.incarnation or (
                msg.incarnation == me.incarnation
                and (msg.addr != me.addr or msg.meta != me.meta or msg.node_id != me.node_id)
            ):
                self._refute(msg.incarnation, now)
            return
        if m is None:
            if not self._admit_new_member(msg.name, now, rate_limited=not bootstrap):
                return
            m = _Member(
                self._pool.record(msg.name, msg.node_id, msg.addr, msg.incarnation, msg.meta, proto),
                MemberState.ALIVE,
                now,
            )
            self._members[msg.name] = m
            self._digest_add(m)
            self._track_site(m)
            self._active += 1
            self._digest_fit()
            self._insert_probe_target(m)
            self._queue_alive(m)
            self._emit("join", m, now)
            return
        if msg.node_id != m.node_id:
            # Same name, another identity: only allowed to take over a member that is gone.
            if m.state not in DEAD_STATES:
                self.counters.inc("conflicts")
                log.warning(
                    "name conflict: %s claimed by %s at %s, held by %s at %s",
                    msg.name,
                    msg.node_id,
                    msg.addr,
                    m.node_id,
                    m.addr,
                )
                return
        elif m.state in DEAD_STATES and m.incarnation - msg.incarnation > self.config.max_incarnation_jump:
            # Our record of this dead member is far above what it says itself: lies pushed it
            # there while it was down, and it ignores them now. Take its word (see above).
            self.counters.inc("members.rebased")
        elif msg.incarnation <= m.incarnation or not self._incarnation_ok(
            msg.incarnation, m.incarnation, msg.name
        ):
            return
        old_state, old_meta, old_addr = m.state, m.meta, m.addr
        self._set_rec(m, self._pool.record(msg.name, msg.node_id, msg.addr, msg.incarnation, msg.meta, proto))
        self._track_site(m)
        self._suspicions.pop(m.name, None)
        if old_state != MemberState.ALIVE:
            self._set_state(m, MemberState.ALIVE, now)
        self._queue_alive(m)
        if old_state in DEAD_STATES:
            # Still in the probe ring (dead ones are skipped there until reaped).
            self._emit("join", m, now)
        elif old_state == MemberState.SUSPECT:
            self._emit("alive", m, now)
        elif old_meta != m.meta or old_addr != m.addr:
            self._emit("update", m, now)

    def _suspect(self, msg: Suspect, now: float) -> None:
        m = self._members.get(msg.name)
        if m is None or msg.incarnation < m.incarnation:
            return
        if not self._incarnation_ok(msg.incarnation, m.incarnation, msg.name):
            return
        if m is self._me:
            if not self.leaving:
                self._refute(msg.incarnation, now)
            return
        if m.state == MemberState.SUSPECT:
            s = self._suspicions.get(m.name)
            if s is not None and s.confirm(msg.source):
                self.broadcasts.queue("m:" + m.name, wire.encode_message(msg))
            return
        if m.state in DEAD_STATES:
            return
        self._set_rec(m, self._pool.with_incarnation(m.rec, msg.incarnation))
        self._set_state(m, MemberState.SUSPECT, now)
        n = self.num_active()
        k = self.config.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        min_t = suspicion_timeout(self.config.suspicion_mult, n, self.config.probe_interval)
        max_t = self.config.suspicion_max_timeout_mult * min_t
        self._suspicions[m.name] = Suspicion(msg.source, k, min_t, max_t, now)
        self.broadcasts.queue("m:" + m.name, wire.encode_message(msg))
        self._emit("suspect", m, now)

    def _suspicion_expired(self, name: str, now: float) -> None:
        s = self._suspicions.pop(name)
        m = self._members.get(name)
        if m is None or m.state != MemberState.SUSPECT:
            return
        log.info(
            "marking %s as failed, suspect timeout reached (%d peer confirmations)",
            name,
            len(s.confirmations) - 1,
        )
        self._dead(Dead(m.incarnation, name, self.name), now)

    def _dead(self, msg: Dead, now: float) -> None:
        m = self._members.get(msg.name)
        if m is None or msg.incarnation < m.incarnation:
            return
        if not self._incarnation_ok(msg.incarnation, m.incarnation, msg.name):
            return
        if m is self._me:
            if not self.leaving:
                self._refute(msg.incarnation, now)
            return
        # Once gone, only a graceful leave may still correct a "dead" reached by timeout.
        if m.state in DEAD_STATES and not (msg.source == msg.name and m.state == MemberState.DEAD):
            return
        self._suspicions.pop(m.name, None)
        self._set_rec(m, self._pool.with_incarnation(m.rec, msg.incarnation))
        self._set_state(m, MemberState.LEFT if msg.source == msg.name else MemberState.DEAD, now)
        self.broadcasts.queue("m:" + m.name, wire.encode_message(msg))
        self._emit("left" if m.state == MemberState.LEFT else "dead", m, now)

    def _refute(self, accused: int, now: float) -> None:
        me = self._me
        if accused >= self.config.max_incarnation:
            # Only reachable by walking us up a jump at a time, ~9e9 messages; never overflow.
            self._drop("incarnation", (me.name, accused, me.incarnation))
            return
        self._set_rec(me, self._pool.with_incarnation(me.rec, max(me.incarnation, accused) + 1))
        self.awareness.apply_delta(1)
        self.counters.inc("refutes")
        self._queue_alive(me)

    def _bump_own(self) -> None:
        me = self._me
        bumped = min(me.incarnation + 1, self.config.max_incarnation)
        self._set_rec(me, self._pool.with_incarnation(me.rec, bumped))

    def _rec(
        self, rec: MemberRecord, addr: str | None = None, meta: Mapping[str, str] | None = None
    ) -> MemberRecord:
        return self._pool.record(
            rec.name,
            rec.node_id,
            rec.addr if addr is None else addr,
            rec.incarnation,
            rec.meta if meta is None else meta,
        )

    @staticmethod
    def _mix(rec: MemberRecord, state: MemberState) -> int:
        """A member's digest value; the alive one is cached on the shared record."""
        if state == MemberState.ALIVE:
            return rec.alive_mix
        return digest.entry(rec.name_hash, rec.incarnation, state)

    def _digest_add(self, m: _Member) -> None:
        self._digest.add(m.rec.name_hash, self._mix(m.rec, m.state))

    def _digest_remove(self, m: _Member) -> None:
        self._digest.remove(m.rec.name_hash, self._mix(m.rec, m.state))

    def _digest_fit(self, force: bool = False) -> None:
        """Re-bucket when the table outgrew (or shrank far below) its bucket count: O(N), rare."""
        n = len(self._members)
        if force or self._digest.needs_resize(n):
            alive, mix = MemberState.ALIVE, self._mix
            self._digest.rebuild(
                n,
                (
                    (r.name_hash, r.alive_mix if m.state is alive else mix(r, m.state))
                    for m in self._members.values()
                    for r in (m.rec,)
                ),
            )

    def _set_rec(self, m: _Member, rec: MemberRecord) -> None:
        """Every record change goes through here: the digest follows the incarnation."""
        if rec.incarnation != m.rec.incarnation:
            self._digest_remove(m)
            m.rec = rec
            self._digest_add(m)
        else:
            m.rec = rec

    def _set_state(self, m: _Member, state: MemberState, now: float) -> None:
        """Every state change goes through here: it keeps the active count, the dead index and
        the reap heap in step (O(1) or O(log dead) each)."""
        was_down, is_down = m.state in DEAD_STATES, state in DEAD_STATES
        rec = m.rec
        self._digest.remove(rec.name_hash, self._mix(rec, m.state))
        m.state = state
        self._digest.add(rec.name_hash, self._mix(rec, state))
        m.state_change = now
        if was_down != is_down:
            self._active += -1 if is_down else 1
        if m is self._me:
            return
        if is_down:
            self._down[m.name] = m
            self._reap_seq += 1
            heapq.heappush(self._reap_heap, (now, self._reap_seq, m))
            if len(self._reap_heap) > 2 * len(self._down) + REAP_HEAP_SLACK:
                # A flapping member leaves a stale entry per death, for a day: keep the heap
                # to the members down now (plus slack), whatever the churn.
                self._reap_heap = [(d.state_change, i, d) for i, d in enumerate(self._down.values())]
                heapq.heapify(self._reap_heap)
        elif was_down:
            del self._down[m.name]

    def _queue_alive(self, m: _Member) -> None:
        r = m.rec
        self.broadcasts.queue(
            "m:" + r.name,
            wire.encode_message(Alive(r.incarnation, r.name, r.node_id, r.addr, r.meta, r.protocol)),
        )

    def _insert_probe_target(self, m: _Member) -> None:
        # Random position, so a new member is not always probed last (memberlist).
        self._ring.insert(self.rng.randint(0, len(self._ring)), m)

    def _emit(self, kind: EventKind, m: _Member, now: float) -> None:
        if kind in ("dead", "left"):
            self.queries.member_down(m.name, now)
        self._outbox.put(MemberEvent(kind, m.view()))

    # --- queries -------------------------------------------------------------------------------

    def _handle_query(self, msg: Query, now: float) -> None:
        site, tags = split_meta(self._me.meta)
        action = self.queries.on_query(msg, site, tags, now)
        if action.rebroadcast:
            self.broadcasts.queue(f"q:{msg.ltime}:{msg.id}", wire.encode_message(msg))
        if action.rebroadcast and msg.aggregate:
            # Where our answer goes; as our site's aggregator, the query straight to the site.
            data = wire.encode_message(msg)
            for name, addr in self.queries.on_aggregated(action, site, self._site_members(), now):
                self._send(addr, [data], self._node_id_of(name))
        if action.rebroadcast:
            self._send_query_out(self.queries.release_early(msg, now))  # answers that came first
        if action.respond:
            self._outbox.put(AnswerQuery(action))

    def _site_members(self) -> list[SiteMember]:
        """Members of our site in our view, us included, any state but left (aggregated queries)."""
        return [
            SiteMember(m.name, m.addr, m.state, split_meta(m.meta)[1])
            for m in self._site_mates.values()
            if m.state != MemberState.LEFT
        ]

    def _track_site(self, m: _Member) -> None:
        """Keep _site_mates current after `m`'s record changed (or it was added)."""
        if m.meta.get("site", "") == self._me.meta.get("site", ""):
            self._site_mates[m.name] = m
        else:
            self._site_mates.pop(m.name, None)

    def _send_query_out(self, out: list[QueryOutbound]) -> None:
        for o in out:
            data = wire.encode_message(o.message)
            if o.via_stream:
                # Answers bigger than a packet arrive whole over TCP.
                sid = self._new_stream(_Stream("query"))
                self._outbox.put(
                    OpenStream(sid, o.addr, self.codec.pack([data]), self.config.tcp_timeout, "query")
                )
            else:
                self._send(o.addr, [data])

    # --- keyring -------------------------------------------------------------------------------

    @staticmethod
    def _apply_keyop(ring: Keyring, msg: KeyOp) -> None:
        if msg.op == "install":
            ring.install(msg.key)
        elif msg.op == "use":
            ring.use(msg.key)
        elif msg.op == "remove":
            ring.remove(msg.key)
        else:
            raise StateError(f"unknown key operation {msg.op!r}")

    def _handle_keyop(self, msg: KeyOp, now: float) -> None:
        if msg.op_id in self._seen_keyops:
            return
        self._seen_keyops.append(msg.op_id)
        ring = self.codec.keyring
        if ring is None:
            self.counters.inc("keyring.ignored")
            return
        try:
            self._apply_keyop(ring, msg)
        except MeshError as e:
            # Another node's change that does not fit here (say, "use" before "install"
            # arrived): pass it on anyway, others may still need it.
            self.counters.inc("keyring.failed")
            log.warning("key operation %s failed: %s", msg.op, e)
        else:
            self._emit("keyring", self._me, now)
        self.broadcasts.queue(f"k:{msg.op_id}", wire.encode_message(msg))

    # --- gossip and anti-entropy ---------------------------------------------------------------

    def _packet_room(self) -> int:
        return self.config.packet_budget - self.codec.overhead

    def _node_id_of(self, name: str) -> str:
        """The node id of a member, "" when unknown: the envelope then names no receiver."""
        m = self._members.get(name)
        return m.node_id if m is not None else ""

    def _send(self, addr: str, msgs: list[bytes], to: str = "") -> None:
        """Send messages to addr (node id `to`, if known) in one packet, with piggybacked news."""
        room = self._packet_room() - COMPOUND_HEADER_MAX - sum(len(m) for m in msgs)
        if room > 0:
            msgs = msgs + self.broadcasts.get(self.num_active(), 0, room)
        self._emit_packet(addr, msgs, to)

    def _emit_packet(self, addr: str, msgs: list[bytes], to: str = "") -> None:
        data = self.codec.pack(msgs, to)
        self.counters.inc("packets.out")
        self.counters.inc("bytes.out", len(data))
        self._outbox.put(SendDatagram(data, addr))

    def _gossip_targets(self, now: float) -> list[_Member]:
        dead_horizon = now - self.config.gossip_to_the_dead_time
        return self._sample(
            self.config.gossip_nodes,
            lambda m: (
                m.state in (MemberState.ALIVE, MemberState.SUSPECT)
                or (m.state == MemberState.DEAD and m.state_change >= dead_horizon)
            ),
        )

    def _gossip(self, now: float) -> None:
        if not len(self.broadcasts):
            return
        n = self.num_active()
        room = self._packet_room() - COMPOUND_HEADER_MAX
        for m in self._gossip_targets(now):
            big = self.broadcasts.take_oversized(n, room)
            if big:
                # No packet-size wall: news too big for UDP goes over TCP.
                sid = self._new_stream(_Stream("gossip", m.name))
                self._outbox.put(
                    OpenStream(
                        sid,
                        m.addr,
                        self.codec.pack(big, m.node_id),
                        self.config.tcp_timeout,
                        "gossip",
                        m.node_id,
                    )
                )
            msgs = self.broadcasts.get(n, 0, room)
            if not msgs:
                continue
            self._emit_packet(m.addr, msgs, m.node_id)

    def _push_pull_interval(self) -> float:
        # memberlist pushPullScale: slower anti-entropy in bigger clusters.
        n = self.num_active()
        base = self.config.push_pull_interval
        if n <= 32:
            return base
        return base * (math.ceil(math.log2(n) - math.log2(32)) + 1)

    def _local_state(self) -> list[PushNodeState]:
        return [
            PushNodeState(r.name, r.node_id, r.addr, r.incarnation, m.state, r.meta, r.protocol)
            for m in self._members.values()
            for r in (m.rec,)
        ]

    def _bucket_state(self, buckets: list[int], count: int) -> list[PushNodeState]:
        """Our records in `buckets` of `count`: one pass over the table (no per-member index, so
        no memory per member), taken only when some bucket differs."""
        if not buckets:
            return []
        shift = 64 - (count.bit_length() - 1)
        want = set(buckets)
        return [
            PushNodeState(r.name, r.node_id, r.addr, r.incarnation, m.state, r.meta, r.protocol)
            for m in self._members.values()
            for r in (m.rec,)
            if r.name_hash >> shift in want
        ]

    def _push_pull(self, join: bool, reply: bool) -> PushPull:
        # The query clock rides along (Serf): a new or restarted node asks at the mesh's time.
        return PushPull(join, self._local_state(), reply, self.queries.clock.time())

    def _new_stream(self, st: _Stream) -> int:
        self._stream_id += 1
        self._streams[self._stream_id] = st
        return self._stream_id

    def _open_push_pull(self, addr: str, kind: StreamKind, now: float, target: str = "") -> int:
        push = wire.encode_message(self._push_pull(kind == "join", False))
        to = self._node_id_of(target)
        data = self.codec.pack([push], to)
        sid = self._new_stream(_Stream(kind, target))
        timeout = self.config.tcp_timeout
        if kind == "join":
            # A join is a one-off and often meets a seed still starting up: be patient.
            timeout = max(timeout, JOIN_TIMEOUT_MIN)
        self._outbox.put(OpenStream(sid, addr, data, timeout, kind, to))
        return sid

    def _periodic_push_pull(self, now: float) -> None:
        """Anti-entropy with one random alive member: by digest (cost ~ the difference) with
        peers that speak it; a full push-pull with older ones, when the safety net is due, and
        with a peer whose digest exchange failed last time."""
        if self.leaving:
            return
        self._digests_left -= 1
        m = self._members.get(self._full_next) if self._full_next else None
        self._full_next = ""
        if m is not None and m.state == MemberState.ALIVE and m is not self._me:
            self.counters.inc("push_pull.fallback")
        else:
            picked = self._sample(1, lambda m: m.state == MemberState.ALIVE)
            if not picked:
                return
            m = picked[0]
            if m.rec.protocol >= DIGEST_PROTOCOL and self._digests_left > 0:
                self._open_digest(m)
                return
        if self._digests_left <= 0:
            self._digests_left = max(FULL_PUSH_PULL_EVERY, len(self._members) // FULL_PUSH_PULL_MEMBERS)
        self._open_push_pull(m.addr, "push_pull", now, m.name)

    def _open_digest(self, m: _Member) -> None:
        self.counters.inc("push_pull.digest.out")
        msg = PushPullDigest(self.table_digest(), self.queries.clock.time())
        data = self.codec.pack([wire.encode_message(msg)], m.node_id)
        sid = self._new_stream(_Stream("digest", m.name))
        self._outbox.put(OpenStream(sid, m.addr, data, self.config.tcp_timeout, "digest", m.node_id))

    def _answer_digest(self, msg: PushPullDigest) -> PushPull | None:
        """Our records of the buckets where their digest and ours differ, at the coarser of the
        two resolutions (O(buckets), plus one pass over the table when any differ)."""
        theirs = digest.from_bytes(msg.buckets)
        if theirs is None:
            self._drop("digest", len(msg.buckets))
            return None
        self.queries.witness_push_pull(msg.query_ltime)
        count = min(len(theirs), self._digest.count)
        diff = digest.differing(self._digest.values, theirs)
        self.counters.inc("push_pull.digest.buckets", len(diff))
        states = self._bucket_state(diff, count)
        return PushPull(False, states, True, self.queries.clock.time(), diff, count)

    def _repair(self, target: str, msg: PushPull, now: float) -> None:
        """The digest reply merged: send the responder our records of the differing buckets
        (those it does not already hold as we do), so repair goes both ways."""
        m = self._members.get(target)
        if not msg.buckets or m is None or m is self._me:
            return
        sent = {(s.name, s.incarnation, s.state) for s in msg.states}
        states = [
            s
            for s in self._bucket_state(msg.buckets, msg.bucket_count)
            if (s.name, s.incarnation, s.state) not in sent
        ]
        if not states:
            return
        push = PushPull(False, states, False, self.queries.clock.time(), msg.buckets, msg.bucket_count)
        data = self.codec.pack([wire.encode_message(push)], m.node_id)
        sid = self._new_stream(_Stream("repair", m.name))
        self._outbox.put(OpenStream(sid, m.addr, data, self.config.tcp_timeout, "repair", m.node_id))

    def _digest_failed(self, st: _Stream) -> None:
        if st.kind == "digest":
            self.counters.inc("push_pull.digest.failed")
            self._full_next = st.target

    def _reconnect(self, now: float) -> None:
        """Serf's reconnect: try one failed member, so healed partitions merge again.

        A TCP ping first, the full push-pull only once the member answers it: most reconnect
        targets are simply dead, and a push-pull sent to every one of them every interval made
        each node send its whole table (O(N) bytes) per reconnect_interval for nothing."""
        horizon = now - self.config.reconnect_timeout
        dead = [m for m in self._down.values() if m.state == MemberState.DEAD and m.state_change >= horizon]
        if dead and not self.leaving:
            m = self.rng.choice(dead)
            self.counters.inc("reconnects")
            seq = self._next_seq()
            ping = wire.encode_message(Ping(seq, m.name, self.name, self.addr))
            sid = self._new_stream(_Stream("reconnect", m.name, seq))
            data = self.codec.pack([ping], m.node_id)
            self._outbox.put(OpenStream(sid, m.addr, data, self.config.tcp_timeout, "reconnect", m.node_id))

    def _reap(self, now: float) -> None:
        horizon = now - self.config.reap_interval
        heap = self._reap_heap
        while heap and heap[0][0] < horizon:
            at, _, m = heapq.heappop(heap)
            if m.state not in DEAD_STATES or m.state_change != at or self._members.get(m.name) is not m:
                continue  # revived (or died again later) since: a stale entry
            del self._members[m.name]
            del self._down[m.name]
            self._digest_remove(m)
            self._site_mates.pop(m.name, None)
            # O(N), once per reaped member (a day after it went): the ring keeps no positions.
            i = self._ring.index(m)
            del self._ring[i]
            if i < self._probe_index:
                self._probe_index -= 1
            self._emit("reap", m, now)
        self._digest_fit()

    def _merge(self, states: list[PushNodeState], now: float, bootstrap: bool = False) -> None:
        for s in states:
            if not self._record_ok(s.name, s.node_id, s.addr, s.meta):
                continue  # only this state; the rest of the exchange may be fine
            if s.state == MemberState.ALIVE:
                alive = Alive(s.incarnation, s.name, s.node_id, s.addr, s.meta, s.protocol)
                self._alive(alive, now, bootstrap)
            elif s.state == MemberState.LEFT:
                if s.name not in self._members:
                    continue  # no point learning about a member only to list it as left
                self._dead(Dead(s.incarnation, s.name, s.name), now)
            else:
                if s.name not in self._members:
                    continue
                # Remote dead is only a suspicion here: it can still refute (heals partitions).
                self._suspect(Suspect(s.incarnation, s.name, self.name), now)
