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
    # Bounds on what a key holder can make a node believe (issue 9). Incarnations stay far below
    # u64 (and exact in JSON doubles); one message may not move a member further than the jump.
    max_incarnation: int = 1 << 53
    max_incarnation_jump: int = 1_000_000
    max_members: int = 20_000  # member table size; also the most states one push-pull may carry
    new_member_rate: float = 100.0  # never-seen members accepted per second from gossip...
    new_member_burst: int = 2_000  # ...with this burst (a whole mid-size mesh at join)
    max_name_len: int = 256  # node names and node ids
    max_meta_entries: int = 1024  # per member
    max_meta_bytes: int = 256 * 1024  # per member, keys and values (no packet wall, but a wall)

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
