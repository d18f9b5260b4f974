"""The lab resolves its own addresses for good: no host waits on ARP, at any lab size.

The kernel's ARP table is shared by every namespace and capped (gc_thresh3, 1024 by default);
33 hosts talking to each other went past it and dropped one new connection's SYN in forty. Real
gateways each have their own table; permanent entries give the lab that (scripts/lab.py).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any


def test_every_host_has_its_site_and_router_pinned(clean_lab: Any) -> None:
    lab = clean_lab
    for site in (1, 2):
        hosts = lab.hosts(site)
        for h in hosts:
            seen = lab.neighbours(h)
            wanted = {o.ip for o in hosts if o is not h} | {lab.router_ip(site)}
            assert {ip for ip, state in seen.items() if "PERMANENT" in state} >= wanted, (h.name, seen)


def router_pins(lab: Any, site: int) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", lab.router_ns, "-j", "neigh", "show", "dev", f"s{site}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {e["dst"] for e in json.loads(out or "[]") if "PERMANENT" in e.get("state", [])}


def test_a_cut_and_restored_site_is_pinned_again(clean_lab: Any) -> None:
    """Taking a link down drops its neighbours, permanent ones too: restore pins them again
    (the mesh healing over it: tests/lab/test_lab_sites.py)."""
    lab = clean_lab
    wanted = {h.ip for h in lab.hosts(2)}
    assert router_pins(lab, 2) == wanted
    lab.cut(2)
    assert router_pins(lab, 2) == set()
    lab.restore(2)
    assert router_pins(lab, 2) == wanted
