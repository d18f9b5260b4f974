"""The pump: every effect, in order, to the handler, until the core queues no more; then the timer."""

from __future__ import annotations

import random

import pytest

from meshd.core.config import LOCAL
from meshd.core.effects import (
    MemberEvent,
    MembershipEffect,
    MemberView,
    OpenStream,
    QueryDone,
    SendDatagram,
)
from meshd.core.messages import MemberState, Query, QueryFilter
from meshd.core.node import Node
from meshd.core.pump import pump
from meshd.core.query import QueryAction, QueryResult
from meshd.wire import Codec, encode_message

VIEW = MemberView("b", "id-b", "b:1", MemberState.ALIVE, 0, {}, 0.0)
RESULT = QueryResult(7, "q", (), (), 1.0, False)


class ScriptedCore:
    """Hands out the batches it is given, one per take_effects() call; then nothing."""

    def __init__(self, *batches: list[MembershipEffect], deadline: float = 42.0) -> None:
        self.batches = list(batches)
        self.deadline = deadline
        self.takes = 0

    def take_effects(self) -> list[MembershipEffect]:
        self.takes += 1
        return self.batches.pop(0) if self.batches else []

    def get_timer(self) -> float:
        return self.deadline


class Recorder:
    """An EffectHandler that writes down what it was asked to do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def send_datagram(self, data: bytes, addr: str) -> None:
        self.calls.append(("send_datagram", (data, addr)))

    def open_stream(self, req: OpenStream) -> None:
        self.calls.append(("open_stream", req))

    def member_event(self, ev: MemberEvent) -> None:
        self.calls.append(("member_event", ev))

    def answer_query(self, action: QueryAction) -> None:
        self.calls.append(("answer_query", action))

    def query_done(self, result: QueryResult) -> None:
        self.calls.append(("query_done", result))


def test_every_effect_goes_to_its_handler_method_in_order() -> None:
    stream = OpenStream(1, "b:1", b"pp", 5.0, "join")
    event = MemberEvent("join", VIEW)
    core = ScriptedCore(
        [SendDatagram(b"a", "b:1"), stream, event, QueryDone(RESULT), SendDatagram(b"z", "c:1")]
    )
    handler = Recorder()
    assert pump(core, handler) == 42.0
    assert handler.calls == [
        ("send_datagram", (b"a", "b:1")),
        ("open_stream", stream),
        ("member_event", event),
        ("query_done", RESULT),
        ("send_datagram", (b"z", "c:1")),
    ]


def test_effects_queued_while_carrying_out_go_out_in_the_same_pump() -> None:
    core = ScriptedCore([SendDatagram(b"1", "x:1")], [SendDatagram(b"2", "x:1")], [])
    handler = Recorder()
    pump(core, handler)
    assert [c[1] for c in handler.calls] == [(b"1", "x:1"), (b"2", "x:1")]
    assert core.takes == 3  # drained until the core had nothing more


def test_nothing_to_do_still_returns_the_next_deadline() -> None:
    core = ScriptedCore(deadline=3.5)
    handler = Recorder()
    assert pump(core, handler) == 3.5
    assert handler.calls == []


class FailingHandler(Recorder):
    def send_datagram(self, data: bytes, addr: str) -> None:
        if data == b"bad":
            raise ValueError(f"cannot send to {addr}")
        super().send_datagram(data, addr)


def test_without_an_error_sink_a_failure_propagates() -> None:
    core = ScriptedCore([SendDatagram(b"bad", "x:1")])
    with pytest.raises(ValueError, match="cannot send"):
        pump(core, FailingHandler())


def test_a_failing_effect_is_reported_and_the_rest_still_carried_out() -> None:
    core = ScriptedCore([SendDatagram(b"bad", "x:1"), SendDatagram(b"ok", "y:1")])
    handler = FailingHandler()
    failures: list[tuple[str, Exception]] = []
    assert pump(core, handler, lambda what, e: failures.append((what, e))) == 42.0
    assert handler.calls == [("send_datagram", (b"ok", "y:1"))]
    [(what, exc)] = failures
    assert what == "SendDatagram"
    assert isinstance(exc, ValueError)


class BrokenCore(ScriptedCore):
    def __init__(self, fail_take: bool, fail_timer: bool) -> None:
        super().__init__([SendDatagram(b"x", "x:1")])
        self.fail_take, self.fail_timer = fail_take, fail_timer

    def take_effects(self) -> list[MembershipEffect]:
        if self.fail_take:
            raise RuntimeError("take boom")
        return super().take_effects()

    def get_timer(self) -> float:
        if self.fail_timer:
            raise RuntimeError("timer boom")
        return super().get_timer()


def test_a_failing_core_is_reported_and_the_timer_still_asked() -> None:
    failures: list[str] = []
    core = BrokenCore(fail_take=True, fail_timer=False)
    assert pump(core, Recorder(), lambda what, e: failures.append(what)) == 42.0
    assert failures == ["take_effects"]


def test_a_failing_get_timer_gives_none_so_the_shell_picks_a_deadline() -> None:
    failures: list[str] = []
    handler = Recorder()
    core = BrokenCore(fail_take=False, fail_timer=True)
    assert pump(core, handler, lambda what, e: failures.append(what)) is None
    assert failures == ["get_timer"]
    assert handler.calls == [("send_datagram", (b"x", "x:1"))]


class AnsweringHandler(Recorder):
    """Answers every query at once, as the runtime does with a "busy" answer."""

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node

    def answer_query(self, action: QueryAction) -> None:
        super().answer_query(action)
        self.node.respond_query(action, b"ok", 0.0)


def test_a_query_answered_while_pumping_finishes_in_the_same_pump() -> None:
    node = Node("a", "id-a", "a:1", LOCAL, Codec("t", None), random.Random(1), 0.0)
    node.take_effects()
    qid = node.ask("q", b"", QueryFilter(), 5.0, 0, 0.0)
    handler = AnsweringHandler(node)
    assert pump(node, handler) == node.get_timer()
    kinds = [name for name, _ in handler.calls]
    assert kinds == ["answer_query", "query_done"]  # the node answers itself, then it is done
    done = handler.calls[-1][1]
    assert isinstance(done, QueryResult)
    assert done.id == qid
    assert [a.name for a in done.responses] == ["a"]
    assert isinstance(handler.calls[0][1], QueryAction)


def test_an_answer_to_another_node_goes_out_in_the_same_pump() -> None:
    codec = Codec("t", None)
    b = Node("b", "id-b", "b:1", LOCAL, codec, random.Random(2), 0.0)
    b.take_effects()
    query = Query(0, 7, "q", b"", "a", "127.0.0.1:1", QueryFilter(), 0, 5.0)
    b.receive_datagram(codec.pack([encode_message(query)]), "127.0.0.1:1", 0.1)
    handler = AnsweringHandler(b)
    pump(b, handler)
    assert [name for name, _ in handler.calls] == ["answer_query", "send_datagram"]
    sent = handler.calls[1][1]
    assert isinstance(sent, tuple)
    assert sent[1] == "127.0.0.1:1"
