"""Protocol timings and limits, with memberlist's three presets (lan, wan, local).

Values are memberlist's DefaultLANConfig / DefaultWANConfig / DefaultLocalConfig
(reference/gossip-membership.md 1.2); every one can be overridden in the node's config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ProtocolConfig:
    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    retransmit_mult: int = 4
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    push_pull_interval: float = 30.0
    tcp_timeout: float = 10.0
    awareness_max_multiplier: int = 8
    gossip_nodes: int = 3
    gossip_interval: float = 0.2
    gossip_to_the_dead_time: float = 30.0
    packet_budget: int = 1400
    # Beyond memberlist: partitions heal by themselves (Serf's reconnect), dead members are reaped.
    reconnect_interval: float = 10.0
    reconnect_timeout: float = 24 * 3600.0
    reap_interval: float = 24 * 3600.0  # how long dead/left members stay listed (Serf: tombstone 24h)
    dead_node_reclaim_time: float = 0.0  # a new address may take a dead name at once (0: always)

    def replace(self, **changes: object) -> ProtocolConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


LAN = ProtocolConfig()

WAN = ProtocolConfig(
    probe_interval=5.0,
    probe_timeout=3.0,
    suspicion_mult=6,
    push_pull_interval=60.0,
    tcp_timeout=30.0,
    gossip_nodes=4,
    gossip_interval=0.5,
    gossip_to_the_dead_time=60.0,
    reconnect_interval=30.0,
)

LOCAL = ProtocolConfig(
    probe_interval=1.0,
    probe_timeout=0.2,
    indirect_checks=1,
    retransmit_mult=2,
    suspicion_mult=3,
    push_pull_interval=15.0,
    tcp_timeout=1.0,
    gossip_interval=0.1,
    gossip_to_the_dead_time=15.0,
    reconnect_interval=5.0,
)

PRESETS: dict[str, ProtocolConfig] = {"lan": LAN, "wan": WAN, "local": LOCAL}
