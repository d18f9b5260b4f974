"""Every message meshd nodes exchange, as typed structs.

The registry is append-only: a message's tag (its type number on the wire) and the order of
its fields never change; new fields go at the end with a default, new messages get a new tag.
proto/PROTOCOL.md is the normative description; meshd/wire.py encodes these structs.
"""

from __future__ import annotations

import enum

import msgspec


class MemberState(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class _Msg(msgspec.Struct, array_like=True, tag_field="t", frozen=True):
    """Base: array-like msgpack with an integer tag in front."""


# --- membership (SWIM + Lifeguard) ------------------------------------------------------------


class Ping(_Msg, tag=1, frozen=True):
    seq: int
    target: str  # name of the node the sender thinks it is probing
    source: str  # sender's name
    source_addr: str  # "host:port" the ack goes to


class IndirectPing(_Msg, tag=2, frozen=True):
    seq: int
    target: str
    target_addr: str
    source: str
    source_addr: str
    nack: bool = True


class Ack(_Msg, tag=3, frozen=True):
    seq: int
    source: str = ""


class Nack(_Msg, tag=4, frozen=True):
    seq: int


class Alive(_Msg, tag=5, frozen=True):
    incarnation: int
    name: str
    node_id: str
    addr: str  # "host:port"
    meta: dict[str, str] = {}
    protocol: int = 1


class Suspect(_Msg, tag=6, frozen=True):
    incarnation: int
    name: str
    source: str


class Dead(_Msg, tag=7, frozen=True):
    incarnation: int
    name: str
    source: str  # source == name means a graceful leave


class PushNodeState(msgspec.Struct, array_like=True, frozen=True):
    name: str
    node_id: str
    addr: str
    incarnation: int
    state: MemberState
    meta: dict[str, str] = {}
    protocol: int = 1  # the member's announced protocol (its Alive.protocol), for the version gate


class PushPull(_Msg, tag=8, frozen=True):
    join: bool
    states: list[PushNodeState]
    reply: bool = False
    query_ltime: int = 0  # the sender's query Lamport clock (Serf exchanges it the same way)
    # Digest exchange (PushPullDigest): bucket_count > 0 means `states` holds only the sender's
    # records in `buckets` (indices at that resolution), not its whole table.
    buckets: list[int] = []
    bucket_count: int = 0


class KeyOp(_Msg, tag=9, frozen=True):
    """Keyring change spread by gossip: op is "install", "use" or "remove"."""

    op_id: int  # random, for de-duplication
    op: str
    key: bytes


class PushPullDigest(_Msg, tag=30, frozen=True):
    """Periodic anti-entropy, protocol 2: the sender's per-bucket table digest (digest.py)."""

    buckets: bytes  # 2^k big-endian u64 bucket sums, 1 <= 2^k <= 4096
    query_ltime: int = 0


# --- queries (Serf's design, completing early; tags 10..19 are reserved for queries) ----------


class QueryFilter(msgspec.Struct, array_like=True, frozen=True):
    """Who answers a query; an empty field matches every node (rules in meshd/core/query.py)."""

    nodes: list[str] = []  # node names; empty: any
    site: str = ""  # exact site, or "re:<pattern>" (full match); empty: any
    tags: dict[str, str] = {}  # every tag must match: exact value, or "re:<pattern>"


class Query(_Msg, tag=10, frozen=True):
    """A named question gossiped to every node; matching nodes answer the origin directly."""

    ltime: int  # query Lamport time; (ltime, id) is the de-duplication key
    id: int  # random 32-bit
    name: str
    payload: bytes
    origin: str  # name of the asking node
    origin_addr: str  # "host:port" answers go to
    filters: QueryFilter = QueryFilter()
    relay_factor: int = 0  # each answer also goes through this many random members
    timeout: float = 0.0  # seconds; answers after this are not wanted (no absolute deadline)
    aggregate: str = ""  # "site": answers are gathered per site, one SiteSummary each (aggregate.py)


class QueryResponse(_Msg, tag=11, frozen=True):
    """One node's answer to a Query, sent by UDP (or TCP when large) to the origin."""

    ltime: int
    id: int
    source: str  # name of the answering node
    payload: bytes


class Relay(_Msg, tag=12, frozen=True):
    """An answer handed to a random member, which forwards `response` to `dest_addr`."""

    dest: str  # name of the node the answer is for (the query's origin)
    dest_addr: str
    response: QueryResponse
    aggregate: str = ""  # "site": an answer to an aggregated query, for the site's aggregator


class SiteSummary(_Msg, tag=13, frozen=True):
    """One site's answers to an aggregated Query, reduced by its aggregator, sent to the origin."""

    ltime: int
    id: int
    site: str
    source: str  # name of the aggregating node (a member of `site`)
    payload: bytes  # the reducer's output over the answers of `answered`
    answered: list[str] = []  # names whose answers the payload covers
    missing: list[str] = []  # expected members of the site that did not answer, or are down


Message = (
    Ping
    | IndirectPing
    | Ack
    | Nack
    | Alive
    | Suspect
    | Dead
    | PushPull
    | KeyOp
    | Query
    | QueryResponse
    | Relay
    | SiteSummary
    | PushPullDigest
)
