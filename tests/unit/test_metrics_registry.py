"""The daemon's Prometheus registry, the core's probe round trips, the dashboard's stats event."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from meshd.cli.meshctl import cmd_monitor
from meshd.core.config import LAN
from meshd.core.messages import MemberState
from meshd.core.timings import Timings
from meshd.live_stats import RttWindow, stats_payload
from meshd.metrics import Exposition, TransferStats, daemon_registry
from meshd.net.memory import Link
from tests.cluster import make_cluster
from tests.fakes import member
from tests.metrics_text import family_types, sample

# One-way delay of the memory network's links: a direct probe's round trip is twice it.
DELAY = 0.01


def test_direct_probes_are_timed_from_ping_to_ack() -> None:
    net, nodes = make_cluster(4, link=Link(delay_min=DELAY, delay_max=DELAY))
    a = nodes[0]
    a.take_probe_rtts()
    net.run_for(10.0)
    rtts = a.take_probe_rtts()
    assert len(rtts) >= 5  # about one probe per second
    assert {path for path, _ in rtts} == {"direct"}
    assert all(2 * DELAY * 0.9 <= s <= 2 * DELAY * 1.1 for _, s in rtts), rtts
    assert a.take_probe_rtts() == []  # taken once


def test_probes_answered_through_a_relay_are_labelled_indirect() -> None:
    net, nodes = make_cluster(5, config=LAN.replace(suspicion_mult=2))
    a, b = nodes[0], nodes[1]
    net.block(a, b)  # a's pings to b are lost: b answers through the relays
    a.take_probe_rtts()
    net.run_for(40.0)
    indirect = [s for path, s in a.take_probe_rtts() if path == "indirect"]
    assert indirect
    assert all(s >= LAN.probe_timeout for s in indirect)  # relays are asked after the timeout


def test_timings_are_bounded_when_nobody_takes_them() -> None:
    t = Timings(maxlen=3)
    for i in range(5):
        t.add("direct", float(i))
    assert t.take() == [("direct", 2.0), ("direct", 3.0), ("direct", 4.0)]


def _sources(out: Exposition) -> None:
    out.gauge("meshd_ready", "1 once joined", 1)
    TransferStats(sent_bytes=5).collect_metrics(out)


def test_the_daemon_registry_exposes_sources_histograms_and_process_metrics() -> None:
    registry, histograms = daemon_registry(_sources)
    histograms.probe_rtt.labels(path="direct").observe(0.003)
    histograms.probe_rtt.labels(path="indirect").observe(0.7)
    histograms.query.observe(0.2)
    histograms.chunk_fetch.labels(source="origin").observe(1.5)
    histograms.activation.observe(0.4)
    text = generate_latest(registry).decode()
    types = family_types(text)
    for name in ("meshd_probe_rtt_seconds", "meshd_query_seconds", "meshd_chunk_fetch_seconds"):
        assert types[name] == "histogram", name
    assert sample(text, "meshd_probe_rtt_seconds_count", path="direct") == 1
    assert sample(text, "meshd_probe_rtt_seconds_bucket", path="direct", le="0.005") == 1
    assert sample(text, "meshd_probe_rtt_seconds_bucket", path="direct", le="0.001") == 0
    assert sample(text, "meshd_probe_rtt_seconds_sum", path="indirect") == pytest.approx(0.7)
    assert sample(text, "meshd_query_seconds_count") == 1
    assert sample(text, "meshd_chunk_fetch_seconds_count", source="origin") == 1
    assert sample(text, "meshd_chunk_fetch_seconds_count", source="site") == 0  # exists at 0
    assert sample(text, "meshd_activation_seconds_count") == 1
    assert sample(text, "meshd_ready") == 1
    assert sample(text, "meshd_transfer_sent_bytes_total") == 5
    assert types["meshd_transfer_sent_bytes"] == "counter"
    assert (sample(text, "process_resident_memory_bytes") or 0) > 0
    assert sample(text, "process_cpu_seconds_total") is not None
    assert "python_info" in types


def test_two_daemons_in_one_process_have_their_own_registries() -> None:
    first, h1 = daemon_registry(_sources)
    second, _ = daemon_registry(_sources)  # the global registry would refuse the same names
    h1.query.observe(1.0)
    assert sample(generate_latest(first).decode(), "meshd_query_seconds_count") == 1
    assert sample(generate_latest(second).decode(), "meshd_query_seconds_count") == 0


def test_counters_have_the_total_suffix_and_no_name_is_reported_twice() -> None:
    registry, _ = daemon_registry(_sources)
    text = generate_latest(registry).decode()
    typed = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    assert len(typed) == len({name for name, _ in typed})
    assert all(name.endswith("_total") for name, kind in typed if kind == "counter")


def test_the_stats_payload_has_the_shape_the_dashboard_reads() -> None:
    window = RttWindow()
    assert window.take_mean_ms() is None
    window.add(0.002)
    window.add(0.004)
    people = [
        member("a", MemberState.ALIVE),
        member("b", MemberState.ALIVE),
        member("c", MemberState.SUSPECT),
        member("d", MemberState.LEFT),
    ]
    transfer = TransferStats(sent_bytes=7)
    transfer.received("r1", "site", 100)
    transfer.received("r1", "origin", 30)
    payload = stats_payload(
        12.5,
        gossip_in_bytes=1000,
        gossip_out_bytes=2000,
        transfer=transfer,
        probe_rtt_ms=window.take_mean_ms(),
        members=people,
    )
    assert payload == {
        "t": 12.5,
        "gossip_in_bytes": 1000,
        "gossip_out_bytes": 2000,
        "transfer_sent_bytes": 7,
        "transfer_received_bytes": 100,
        "transfer_origin_bytes": 30,
        "probe_rtt_ms": 3.0,
        "members": {"alive": 2, "suspect": 1, "dead": 0, "left": 1},
    }
    assert json.loads(json.dumps(payload)) == payload
    assert window.take_mean_ms() is None  # a new window: no probe answered in it


class _Stream:
    """One stream with a stats and a release event; the node then closes it and the person
    stops `monitor` (Ctrl-C) while it waits to reconnect."""

    api = "http://127.0.0.1:1"

    def __init__(self) -> None:
        self.calls = 0

    def stream_events(self) -> Iterator[tuple[str, str]]:
        self.calls += 1
        if self.calls > 1:
            raise KeyboardInterrupt
        yield "stats", json.dumps({"t": 1.0})
        yield "release", json.dumps({"name": "app", "version": "2", "state": "active"})


@pytest.mark.parametrize("as_json", [False, True])
def test_meshctl_monitor_does_not_print_stats_events(
    as_json: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("meshd.cli.meshctl.time.sleep", lambda _s: None)
    stream = _Stream()
    assert cmd_monitor(stream, argparse.Namespace(json=as_json)) == 0  # type: ignore[arg-type]
    assert stream.calls == 2  # it reconnected once the stream ended
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert "app" in lines[0]
    assert "stats" not in lines[0]
