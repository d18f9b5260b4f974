"""What the membership core asks its shell to do: typed, frozen effects in one ordered outbox.

Every core entry point (a datagram, a stream, a timer, an operator call) only queues effects;
the shell drains them with `take_effects()` and carries each one out through an
`EffectHandler` (see meshd.core.pump). Order is the order the core decided things in; an
effect carried out may queue more (a "busy" answer queues its datagram), which the same drain
picks up.

    effect          handler call                  meaning
    -------------   ---------------------------   ----------------------------------------------
    SendDatagram    send_datagram(data, addr)     one sealed UDP packet
    OpenStream      open_stream(req)              one TCP exchange; its reply goes to stream_done
    MemberEvent     member_event(ev)              a member joined, changed, failed, left...
    AnswerQuery     answer_query(action)          run the handler, then call respond_query
    QueryDone       query_done(result)            a query this node asked has finished
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

from meshd.core.messages import MemberState

if TYPE_CHECKING:  # only types: query.py queues QueryDone, so it imports this module
    from meshd.core.query import QueryAction, QueryResult

__all__ = [
    "AnswerQuery",
    "EffectHandler",
    "EventKind",
    "MemberEvent",
    "MemberView",
    "MembershipEffect",
    "OpenStream",
    "Outbox",
    "QueryDone",
    "SendDatagram",
    "StreamKind",
]

EventKind = Literal["join", "update", "suspect", "alive", "dead", "left", "reap", "keyring"]
# "digest" and "repair": the two streams of a digest anti-entropy exchange (node.py).
StreamKind = Literal["join", "push_pull", "reconnect", "tcp_ping", "gossip", "query", "digest", "repair"]


class EffectHandler(Protocol):
    """What a shell does with the membership core's effects (the runtime, the memory network)."""

    def send_datagram(self, data: bytes, addr: str) -> None: ...

    def open_stream(self, req: OpenStream) -> None: ...

    def member_event(self, ev: MemberEvent) -> None: ...

    def answer_query(self, action: QueryAction) -> None: ...

    def query_done(self, result: QueryResult) -> None: ...


@dataclass(frozen=True)
class SendDatagram:
    data: bytes
    addr: str

    def apply(self, handler: EffectHandler) -> None:
        handler.send_datagram(self.data, self.addr)


@dataclass(frozen=True)
class OpenStream:
    """One TCP exchange the shell must carry out: send `data`, hand the reply to stream_done."""

    id: int
    addr: str
    data: bytes
    timeout: float
    kind: StreamKind
    to: str = ""  # the peer's node id when known: the request token is good at that node only

    def apply(self, handler: EffectHandler) -> None:
        handler.open_stream(self)


@dataclass(frozen=True)
class MemberView:
    name: str
    node_id: str
    addr: str
    state: MemberState
    incarnation: int
    meta: dict[str, str]
    state_change: float


@dataclass(frozen=True)
class MemberEvent:
    kind: EventKind
    member: MemberView

    def apply(self, handler: EffectHandler) -> None:
        handler.member_event(self)


@dataclass(frozen=True)
class AnswerQuery:
    """A query this node matches: run its handler, then call respond_query(action, payload)."""

    action: QueryAction

    def apply(self, handler: EffectHandler) -> None:
        handler.answer_query(self.action)


@dataclass(frozen=True)
class QueryDone:
    """A query this node asked finished: every expected answer arrived, or the timeout."""

    result: QueryResult

    def apply(self, handler: EffectHandler) -> None:
        handler.query_done(self.result)


MembershipEffect = SendDatagram | OpenStream | MemberEvent | AnswerQuery | QueryDone

E = TypeVar("E")


class Outbox(Generic[E]):
    """Effects in the order they were queued; take() hands them all over and starts afresh."""

    def __init__(self) -> None:
        self._items: list[E] = []

    def put(self, effect: E) -> None:
        self._items.append(effect)

    def take(self) -> list[E]:
        out, self._items = self._items, []
        return out

    def __len__(self) -> int:
        return len(self._items)
