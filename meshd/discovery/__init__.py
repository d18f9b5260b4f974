"""mDNS discovery (`_meshd._udp.local.`): advertise this node, browse, join same-cluster peers.

mdns.py      Discovery: python-zeroconf advertise and browse, confined to chosen interfaces
joiner.py    DaemonDiscovery: joins what Discovery finds, through the Dialer
dialer.py    Dialer (sans-IO): offers by name, dials by address; backoff, rate and table limits
__main__.py  a bare agent printing peers as JSON lines (the lab runs it)
"""

from __future__ import annotations

from meshd.discovery.joiner import DaemonDiscovery, DiscoveryHost, start
from meshd.discovery.mdns import SERVICE_TYPE, Discovery

__all__ = ["SERVICE_TYPE", "DaemonDiscovery", "Discovery", "DiscoveryHost", "start"]
