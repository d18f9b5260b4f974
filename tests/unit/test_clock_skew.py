"""Clock skew made visible (issue 10, point 3): the sans-IO SkewWatcher and WarnLimiter, and the
node that wires them: a peer 400 days ahead still joins, is counted, reported and warned about
once per interval; replayed envelopes are warned about at most once a minute per sender."""

from __future__ import annotations

import logging
import random

import pytest

from meshd.core.config import LAN
from meshd.core.messages import Ack
from meshd.core.node import Node
from meshd.core.skew import SkewWatcher, format_offset
from meshd.core.warnlimit import WarnLimiter
from meshd.net.memory import MemoryNetwork
from meshd.replay import ReplayGuard, SenderClock, sender_id
from meshd.wire import Codec, encode_message
from tests.cluster import alive_names

A = b"\x01" * 8
B = b"\x02" * 8
S = 1_000_000  # µs per second
DAY = 86_400
WALL = 1_800_000_000 * S  # our wall clock in the unit tests, µs


# --- WarnLimiter ------------------------------------------------------------------------------


def test_warn_limiter_one_line_per_key_per_interval_with_the_count() -> None:
    lim = WarnLimiter(60.0)
    assert lim.hit("a", 0.0) == 1  # the first event is reported at once
    assert [lim.hit("a", t) for t in (1.0, 2.0, 59.0)] == [None, None, None]
    assert lim.hit("b", 5.0) == 1  # keys are independent
    assert lim.hit("a", 60.0) == 4  # the three quiet ones and this one
    assert lim.hit("a", 61.0) is None
    assert lim.hit("a", 200.0) == 2


def test_warn_limiter_is_bounded() -> None:
    lim = WarnLimiter(60.0, max_keys=3)
    for k in range(10):
        lim.hit(k, 0.0)
    assert len(lim) == 3


# --- SkewWatcher ------------------------------------------------------------------------------


def test_within_the_threshold_is_quiet_and_not_counted() -> None:
    w = SkewWatcher(threshold_s=300.0)
    for stamp in (WALL, WALL + 299 * S, WALL - 299 * S):
        assert w.observe(A, stamp, WALL, 0.0) is None
    assert w.became_skewed == 0
    assert w.view() == {"peers": 0, "max_offset_s": 0.0, "threshold_s": 300.0}


@pytest.mark.parametrize("sign", [1, -1])
def test_skew_in_both_directions_is_noticed_counted_and_rate_limited(sign: int) -> None:
    w = SkewWatcher(threshold_s=300.0, log_every_s=600.0)
    offset = sign * (400 * DAY + 2 * 3600)
    notice = w.observe(A, WALL + offset * S, WALL, 0.0)
    assert notice is not None
    assert (notice.sender, notice.offset_s, notice.skewed) == (A, offset, True)
    assert w.became_skewed == 1
    # Every envelope after that, for ten minutes: no more lines, still one skewed peer.
    assert all(w.observe(A, WALL + offset * S + t, WALL + t, t / S) is None for t in range(1, 599 * S, S))
    assert w.became_skewed == 1
    again = w.observe(A, WALL + offset * S, WALL, 600.0)
    assert again is not None
    assert again.skewed
    assert w.view() == {"peers": 1, "max_offset_s": float(offset), "threshold_s": 300.0}
    assert w.skewed() == {A: float(offset)}


def test_back_within_the_threshold_is_said_once_and_counts_again_when_it_drifts() -> None:
    w = SkewWatcher(threshold_s=300.0, log_every_s=600.0)
    assert w.observe(A, WALL + 3600 * S, WALL, 0.0) is not None
    back = w.observe(A, WALL + 10 * S, WALL, 1.0)
    assert back is not None
    assert not back.skewed
    assert w.observe(A, WALL + 11 * S, WALL, 2.0) is None
    assert w.view()["peers"] == 0
    assert w.observe(A, WALL - 3600 * S, WALL, 3.0) is not None
    assert w.became_skewed == 2


def test_view_reports_the_largest_offset_and_ignores_anonymous_senders() -> None:
    w = SkewWatcher(threshold_s=300.0)
    w.observe(A, WALL + 3600 * S, WALL, 0.0)
    w.observe(B, WALL - 7200 * S, WALL, 0.0)
    assert w.observe(bytes(8), WALL + 9_999_999 * S, WALL, 0.0) is None
    assert w.view() == {"peers": 2, "max_offset_s": -7200.0, "threshold_s": 300.0}


def test_watcher_is_bounded() -> None:
    w = SkewWatcher(max_peers=4)
    for i in range(1, 20):
        w.observe(bytes([i]) * 8, WALL + DAY * S, WALL, 0.0)
    assert len(w.skewed()) == 4


def test_format_offset() -> None:
    assert format_offset(400 * DAY + 2 * 3600 + 59) == "400d 2h ahead of"
    assert format_offset(-(3 * 60 + 5)) == "3m 5s behind"
    assert format_offset(0.2) == "0s ahead of"


# --- wired into the node ----------------------------------------------------------------------

SKEW_S = 400 * DAY + 2 * 3600
BASE_S = 1_800_000_000


def _node(net: MemoryNetwork, name: str, offset_s: float = 0.0) -> Node:
    def wall() -> int:
        return int((BASE_S + offset_s + net.now) * S)

    codec = Codec("test", None, node_id=f"id-{name}", clock=SenderClock(wall), guard=ReplayGuard())
    return net.add_node(name, LAN, codec, node_id=f"id-{name}")


def test_a_node_400_days_ahead_joins_and_the_others_report_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshd.node")
    net = MemoryNetwork(seed=3)
    normal, ahead, other = _node(net, "n0"), _node(net, "n1", SKEW_S), _node(net, "n2")
    for node in (ahead, other):
        node.join([normal.addr], net.now)
        net.poke(node)
    names = {"n0", "n1", "n2"}
    assert net.run_until_true(lambda: all(alive_names(x) == names for x in (normal, ahead, other)), 60.0)
    net.run_until(net.now + 1800.0)  # half an hour of gossip: at most one line per 10 minutes

    for node in (normal, other):
        skew = node.clock_skew()
        assert skew["peers"] == 1
        assert skew["max_offset_s"] == pytest.approx(SKEW_S, abs=1.0)
        assert [(p["name"], p["id"]) for p in skew["skewed"]] == [("n1", sender_id("id-n1").hex())]
        assert node.stats().counters["clock.skewed"] == 1
    # The skewed node sees everyone else 400 days behind.
    behind = ahead.clock_skew()
    assert behind["peers"] == 2
    assert behind["max_offset_s"] == pytest.approx(-SKEW_S, abs=1.0)

    lines = [r for r in caplog.records if r.levelno == logging.WARNING and "n1 (" in r.getMessage()]
    assert 2 <= len(lines) <= 2 * 4  # each of n0 and n2: the first, then at most one per 10 min
    assert (
        "clock is 400d 2h ahead of ours; distribution and membership are unaffected" in lines[0].getMessage()
    )
    assert any("400d 2h behind ours" in r.getMessage() for r in caplog.records)


def test_replayed_envelopes_are_warned_about_once_a_minute_per_sender(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="meshd.node")
    sender = Codec("test", None, node_id="id-a", guard=ReplayGuard())
    receiver = Codec("test", None, node_id="id-b", guard=ReplayGuard())
    node = Node("b", "id-b", "198.18.0.2:7788", LAN, receiver, random.Random(1), 0.0)
    packet = sender.pack([encode_message(Ack(1, "a"))])
    for _ in range(50):
        node.receive_datagram(packet, "198.18.0.1:7788", 10.0)
    assert node.stats().counters["drops.replay"] == 49
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"refused 1 envelope(s) from {sender_id('id-a').hex()}")
    assert "replay envelope" in warnings[0]
    node.receive_datagram(packet, "198.18.0.1:7788", 71.0)  # a minute later: the count since
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[1].startswith("refused 49 envelope(s)")
