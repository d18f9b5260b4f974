"""mDNS in the lab: a real, independent browser (avahi) resolves meshd's service, same-cluster
hosts of a site find each other, other clusters and other sites are not offered, and no mDNS
packet leaves the lab."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time
from types import ModuleType
from typing import Any

import pytest

from meshd import PROTOCOL_VERSION

WAIT = 20.0


def _avahi_resolved(lab: Any, host: str, env: dict[str, str]) -> list[list[str]]:
    """`avahi-browse -rtp _meshd._udp` in a host: the resolved (`=`) records, split."""
    proc = lab.exec(
        host,
        ["env", *[f"{k}={v}" for k, v in env.items()], "avahi-browse", "-rtp", "_meshd._udp"],
        timeout=15,
    )
    return [line.split(";") for line in proc.stdout.splitlines() if line.startswith("=;")]


def test_avahi_browse_resolves_meshd_service(clean_lab: Any, lab_module: ModuleType) -> None:
    for tool in ("avahi-daemon", "avahi-browse", "dbus-daemon"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install avahi-utils avahi-daemon)")
    lab = clean_lab
    procs, env = lab.start_avahi("s1h1")
    agent = lab_module.DiscoveryAgent(lab, "s1h2", cluster="lab-avahi")
    try:
        records = lab_module.wait_until(
            lambda: [r for r in _avahi_resolved(lab, "s1h1", env) if r[3] == "s1h2"],
            WAIT,
            interval=0.5,
            what="avahi-browse to resolve s1h2._meshd._udp",
        )
        # =;iface;proto;name;type;domain;host;address;port;txt
        rec = records[0]
        assert rec[4] == "_meshd._udp"
        assert rec[2] == "IPv4"
        assert rec[7] == lab.host("s1h2").ip
        assert rec[8] == "7788"
        txt = dict(item.strip('"').split("=", 1) for item in rec[9].split())
        assert txt == {"id": "id-s1h2", "cluster": "lab-avahi", "site": "s1", "v": str(PROTOCOL_VERSION)}
    finally:
        agent.stop()
        for p in reversed(procs):  # avahi before its bus
            lab.kill(p)


def test_site_hosts_find_each_other_other_cluster_and_site_ignored_no_leak(
    clean_lab: Any, lab_module: ModuleType
) -> None:
    lab, lm = clean_lab, lab_module
    with (
        lm.sniff_in(lab, None) as root_seen,
        lm.sniff_in(lab, lab.router_ns) as router_seen,
        lm.sniff_in(lab, lab.switch_ns(2)) as sw2_seen,
    ):
        a = lm.DiscoveryAgent(lab, "s1h1", cluster="lab-a")
        b = lm.DiscoveryAgent(lab, "s1h2", cluster="lab-a")
        other = lm.DiscoveryAgent(lab, "s1h3", cluster="lab-b")
        far = lm.DiscoveryAgent(lab, "s2h1", cluster="lab-a")  # same cluster, other site: unreachable
        agents = [a, b, other, far]
        try:
            lm.wait_until(lambda: a.peers() == {"s1h2"} and b.peers() == {"s1h1"}, WAIT, what="s1h1 <-> s1h2")
            # Give the other cluster's and the other site's announcements time to arrive too.
            time.sleep(1.0)
            b_counters = b.stop()  # goodbye: s1h1 must notice
            lm.wait_until(lambda: "s1h2" in a.gone(), WAIT, what="s1h1 to notice s1h2's goodbye")
            counters = {ag.name: ag.stop() for ag in agents if ag is not b}
        finally:
            for ag in agents:
                ag.stop()
    assert counters["s1h1"]["ignored_cluster"] >= 1  # s1h3 was seen and not offered
    assert b_counters["ignored_cluster"] >= 1
    assert other.peers() == set()
    assert counters["s1h3"]["discovered"] == 0
    assert far.peers() == set()
    assert counters["s2h1"]["discovered"] == 0
    assert a.peers() == {"s1h2"}

    # No mDNS on any real interface of the machine (loopback excluded: other tests use it).
    assert root_seen, "no capture on the root namespace"
    assert root_seen[0].mdns_total == 0, root_seen
    # The router hears each site's link-local mDNS on that site's port only: never forwarded.
    (router,) = router_seen
    assert router.mdns_total > 0
    for ifname, sources in router.sources.items():
        site = int(ifname.removeprefix("s"))
        net = ipaddress.ip_network(f"198.18.{site}.0/24")
        assert all(ipaddress.ip_address(s) in net for s in sources), (ifname, sources)
    # Site 2's switch carries site 2's mDNS only.
    (sw2,) = sw2_seen
    assert sw2.mdns_total > 0
    assert all(
        ipaddress.ip_address(s) in ipaddress.ip_network("198.18.2.0/24")
        for sources in sw2.sources.values()
        for s in sources
    ), sw2.sources


def test_lab_adds_nothing_to_the_root_namespace(clean_lab: Any) -> None:
    """The lab itself adds nothing to the root namespace (no veth, no bridge)."""
    lab = clean_lab
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    for h in lab.hosts():
        assert h.ns not in out
    assert "br0" not in out
    assert "uplink" not in out
