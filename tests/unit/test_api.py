"""The operator API's pure pieces: the metrics text format and the member, filter and event JSON.

The HTTP routes over a fake agent are in tests/integration/test_api_http.py (they need a socket).
"""

from __future__ import annotations

import orjson
import pytest

from meshd.api.app import count_states, filter_members, member_json, sse_frame
from meshd.api.http import ApiError
from meshd.core.messages import MemberState
from meshd.metrics import Exposition, TransferStats, counter_name
from tests.fakes import FakeEvent, member
from tests.metrics_text import sample

PEOPLE = [
    member("b", MemberState.ALIVE, site="north", role="gw"),
    member("a", MemberState.DEAD, site="south", role="db"),
    member("c", MemberState.LEFT),
]


def test_exposition_format() -> None:
    out = Exposition()
    out.gauge("meshd_x", "help", 1.5, label='a"b\\c')
    out.counter("meshd_y_total", "help", 3)
    out.counter("meshd_y_total", "dup is ignored", 4)
    text = out.render()
    assert 'meshd_x{label="a\\"b\\\\c"} 1.5' in text  # escaped by prometheus-client
    assert sample(text, "meshd_x", label='a"b\\c') == 1.5
    assert text.count("# TYPE meshd_y_total counter") == 1
    assert sample(text, "meshd_y_total") == 3
    assert counter_name("streams.failed.tcp_ping") == "meshd_streams_failed_tcp_ping_total"


def test_transfer_stats_report_their_own_metrics() -> None:
    out = Exposition()
    TransferStats(10, 20, 3).collect_metrics(out)
    text = out.render()
    assert sample(text, "meshd_transfer_sent_bytes_total") == 10
    assert sample(text, "meshd_transfer_received_bytes_total") == 20
    assert sample(text, "meshd_transfer_origin_bytes_total") == 3


def test_member_json_fields() -> None:
    doc = member_json(
        member("n1", node_id="ff", addr="127.0.0.1:7788", site="x", meta={"health": "weird"}, role="gw")
    )
    assert doc == {
        "name": "n1",
        "id": "ff",
        "addr": "127.0.0.1:7788",
        "site": "x",
        "tags": {"role": "gw"},
        "state": "alive",
        "incarnation": 1,
        "health": "unknown",
    }


@pytest.mark.parametrize("state", [MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT])
def test_a_node_that_is_not_alive_has_unknown_health(state: MemberState) -> None:
    # Its last announcement said passing; a dead node's "passing" would mislead the operator.
    assert member_json(member("n1", MemberState.ALIVE, meta={"health": "passing"}))["health"] == "passing"
    assert member_json(member("n1", state, meta={"health": "passing"}))["health"] == "unknown"


def test_filters_and_counts() -> None:
    assert count_states(PEOPLE) == {"alive": 1, "suspect": 0, "dead": 1, "left": 1}
    assert [m.name for m in filter_members(PEOPLE, {}, [])] == ["a", "b", "c"]
    assert [m.name for m in filter_members(PEOPLE, {"state": "alive,dead"}, [])] == ["a", "b"]
    assert [m.name for m in filter_members(PEOPLE, {"site": "default"}, [])] == ["c"]
    assert [m.name for m in filter_members(PEOPLE, {}, ["role=gw"])] == ["b"]
    with pytest.raises(ApiError) as e:
        filter_members(PEOPLE, {"state": "sleepy"}, [])
    assert e.value.status == 400
    assert e.value.error == "bad_filter"


def test_sse_frames() -> None:
    frame = sse_frame(FakeEvent("dead", PEOPLE[1]))
    head, data = frame.split(b"\ndata: ")
    assert head == b"event: member"
    assert frame.endswith(b"\n\n")
    assert orjson.loads(data)["member"]["name"] == "a"
    assert sse_frame(FakeEvent("keyring", None)).startswith(b"event: keyring\n")
