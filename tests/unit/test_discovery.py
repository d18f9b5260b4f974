"""mDNS discovery without the network: names, addresses, and the daemon hook's decisions.

Discovery over real mDNS on loopback is in tests/integration/test_discovery_mdns.py.
"""

from __future__ import annotations

import asyncio

import pytest

from meshd.core.messages import MemberState
from meshd.discovery import DaemonDiscovery, Discovery
from meshd.discovery.mdns import _host_label
from meshd.errors import ConfigError
from meshd.metrics import Exposition
from tests.fakes import FakeHost, member
from tests.metrics_text import sample

LO = "127.0.0.1"


def ignore(*_: object) -> None:
    pass


def test_bad_names_and_addresses_are_config_errors() -> None:
    for name in ("a.b", "x" * 64):
        with pytest.raises(ConfigError):
            Discovery(name, f"id-{name}", "c", "lo", 1, [LO], [LO], ignore)
    with pytest.raises(ConfigError):
        Discovery("n", "id", "c", "s", 1, ["not-an-ip"], None, ignore)
    assert _host_label("Gate Way_1", "ABCDEF0123456789") == "gate-way-1-abcdef01"
    assert len(_host_label("y" * 63, "ff" * 16)) <= 63


def test_the_hook_derives_what_to_advertise_from_the_daemon() -> None:
    hook = DaemonDiscovery(FakeHost("gw1.example.org", "c", f"{LO}:7788"))
    d = hook.discovery
    assert d.name == "gw1-example-org"  # a FQDN node name becomes a single mDNS label
    assert d.node_id == "id-gw1.example.org"
    assert d.port == 7788
    assert d.addresses == [LO]
    assert d.interfaces == [LO]  # a loopback-only node stays on loopback
    v6 = DaemonDiscovery(FakeHost("gw2", "c", "[fd00::2]:7788", mdns_interfaces=["198.18.0.1"]))
    assert v6.discovery.addresses == []
    assert v6.discovery.interfaces == ["198.18.0.1"]
    with pytest.raises(ConfigError):
        DaemonDiscovery(FakeHost("gw3", "c", f"{LO}:7788", mdns_interfaces=["fd00::1"]))


async def test_the_hook_joins_new_peers_and_skips_alive_members() -> None:
    host = FakeHost(
        "me",
        "c",
        f"{LO}:7788",
        people=[
            member("me", addr=f"{LO}:7788"),
            member("up", addr=f"{LO}:7790"),
            member("down", MemberState.DEAD, addr=f"{LO}:7792"),
        ],
    )
    hook = DaemonDiscovery(host)
    try:
        hook._on_peer("up", f"{LO}:7790", {})  # already an alive member: nothing to do
        assert host.joins == []
        assert hook._joins == {}
        hook._on_peer("down", f"{LO}:7792", {})  # dead in our view: worth a join
        hook._on_peer("down-again", f"{LO}:7792", {})  # one join at a time per address
        await asyncio.gather(*hook._joins.values())
        assert host.joins == [[f"{LO}:7792"]]
        assert hook.retry_delay(f"{LO}:7792") == 0  # joined: no backoff

        host.join_result = 0  # e.g. another cluster key
        hook._on_peer("stranger", f"{LO}:7794", {})
        await asyncio.gather(*hook._joins.values())
        assert hook.retry_delay(f"{LO}:7794") > 1.0  # failed: backing off
    finally:
        await hook.close()


def test_the_hook_reports_discovery_counters_as_metrics() -> None:
    hook = DaemonDiscovery(FakeHost("me", "c", f"{LO}:7788"))
    hook.discovery.counters["discovered"] += 2
    out = Exposition()
    hook.collect_metrics(out)
    assert sample(out.render(), "meshd_mdns_discovered_total") == 2
