"""The pure formulas of SWIM/Lifeguard, checked against memberlist's own tables."""

import random

import pytest

from meshd.core.awareness import Awareness
from meshd.core.broadcast import BroadcastQueue, retransmit_limit
from meshd.core.config import LAN
from meshd.core.messages import Alive
from meshd.core.node import Node
from meshd.core.suspicion import Suspicion, remaining_suspicion_time, suspicion_timeout
from meshd.wire import Codec, encode_message


@pytest.mark.parametrize(("n", "expected"), [(5, 1.0), (50, 1.698), (100, 2.0), (1000, 3.0)])
def test_suspicion_timeout_scales_with_log10_n(n: int, expected: float) -> None:
    assert suspicion_timeout(1, n, 1.0) == pytest.approx(expected, rel=1e-3)
    assert suspicion_timeout(4, n, 0.5) == pytest.approx(expected * 2, rel=1e-3)


@pytest.mark.parametrize(
    ("confirmations", "elapsed", "expected"),
    [(0, 0.0, 30.0), (1, 2.0, 14.0), (2, 3.0, 4.810), (3, 4.0, -2.0), (4, 5.0, -3.0), (5, 10.0, -8.0)],
)
def test_remaining_suspicion_time_table(confirmations: int, elapsed: float, expected: float) -> None:
    # memberlist TestSuspicion_remainingSuspicionTime: k=3, min 2 s, max 30 s.
    got = remaining_suspicion_time(confirmations, 3, elapsed, 2.0, 30.0)
    assert got == pytest.approx(expected, abs=1e-3)


def test_suspicion_confirmations_are_independent_and_bounded() -> None:
    s = Suspicion("a", k=2, min_timeout=2.0, max_timeout=12.0, now=100.0)
    assert s.deadline == pytest.approx(112.0)
    assert not s.confirm("a")  # the first accuser does not confirm itself
    assert s.confirm("b")
    assert not s.confirm("b")  # the same peer twice is one confirmation
    mid = s.deadline
    assert 102.0 < mid < 112.0
    assert s.confirm("c")
    assert s.deadline == pytest.approx(102.0)
    assert not s.confirm("d")  # k reached: nothing more to learn


def test_suspicion_without_possible_confirmations_uses_min() -> None:
    s = Suspicion("a", k=0, min_timeout=2.0, max_timeout=12.0, now=0.0)
    assert s.deadline == pytest.approx(2.0)


def test_awareness_clamps_and_scales() -> None:
    a = Awareness(8)
    a.apply_delta(-1)
    assert a.score == 0
    a.apply_delta(3)
    assert a.scale(1.0) == 4.0
    a.apply_delta(100)
    assert a.score == 7
    assert a.scale(0.5) == 4.0


@pytest.mark.parametrize(("mult", "n", "expected"), [(3, 0, 0), (3, 1, 3), (3, 99, 6), (4, 100, 12)])
def test_retransmit_limit(mult: int, n: int, expected: int) -> None:
    assert retransmit_limit(mult, n) == expected


def test_queue_newer_news_replaces_older() -> None:
    q = BroadcastQueue(retransmit_mult=2)
    q.queue("m:a", b"old")
    q.queue("m:a", b"new")
    q.queue("m:b", b"bb")
    assert len(q) == 2
    assert sorted(q.get(10, 0, 1000)) == [b"bb", b"new"]


def test_queue_retransmit_limit_then_gone() -> None:
    q = BroadcastQueue(retransmit_mult=2)
    q.queue("x", b"x" * 10)
    limit = retransmit_limit(2, 9)  # 2
    for _ in range(limit):
        assert q.get(9, 0, 1000) == [b"x" * 10]
    assert q.get(9, 0, 1000) == []
    assert len(q) == 0


def test_queue_fewest_transmits_first_and_budget() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("a", b"a" * 100)
    assert q.get(10, 0, 1000) == [b"a" * 100]
    q.queue("b", b"b" * 100)
    # Room for one: the one never sent goes first.
    assert q.get(10, 0, 150) == [b"b" * 100]
    # Larger first among equals, smaller fills the gap; overhead counts per message.
    q2 = BroadcastQueue(retransmit_mult=4)
    q2.queue("s", b"s" * 10)
    q2.queue("l", b"l" * 50)
    assert q2.get(10, 5, 70) == [b"l" * 50, b"s" * 10]
    assert q2.get(10, 5, 20) == [b"s" * 10]


def test_queue_oversized_news_is_taken_separately() -> None:
    q = BroadcastQueue(retransmit_mult=1)
    q.queue("big", b"B" * 5000)
    q.queue("small", b"s")
    assert q.get(3, 0, 1000) == [b"s"]
    assert q.take_oversized(3, 1000) == [b"B" * 5000]


def test_push_pull_interval_grows_with_cluster_size() -> None:
    node = Node("a", "id-a", "a:1", LAN, Codec("c", None), random.Random(1), 0.0)
    assert node._push_pull_interval() == 30.0
    for i in range(99):
        msg = encode_message(Alive(1, f"n{i}", f"id{i}", f"198.18.1.{i + 1}:1"))
        node.receive_datagram(node.codec.pack([msg]), "x:1", 0.0)
    assert node.num_active() == 100
    assert node._push_pull_interval() == 90.0  # 3x at 65..128 nodes
