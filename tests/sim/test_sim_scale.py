"""The simulator's scale path: the same outcomes as the plain path, and a bound on memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from meshd.core.config import LAN
from meshd.core.members import RecordPool
from meshd.net.memory import Link, MemoryNetwork
from meshd.sim import build_warm, epidemic_time, run_scale
from meshd.wire import Codec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def storm(pool: RecordPool | None, n: int = 24, seed: int = 7) -> tuple[list[Any], int]:
    """A join storm, a metadata change, a crash and a restart under loss: the event log."""
    net = MemoryNetwork(seed=seed, link=Link(loss=0.05))
    net.pool = pool
    codec = Codec("sim", None)
    nodes = [net.add_node(f"n{i}", LAN, codec, meta={"site": f"s{i % 3}"}) for i in range(n)]
    for nd in nodes[1:]:
        nd.join([nodes[0].addr], net.now)
        net.poke(nd)
    net.run_for(10.0)
    nodes[3].set_meta({"site": "s0", "release": "r2"}, net.now)
    net.poke(nodes[3])
    net.kill(nodes[5])
    net.run_for(15.0)
    back = net.add_node("n5", LAN, codec, meta={"site": "s2"}, addr=nodes[5].addr, incarnation=1)
    back.join([nodes[1].addr], net.now)
    net.poke(back)
    net.run_for(10.0)
    return net.events, net.stats.datagrams


def test_one_shared_pool_gives_the_same_run_as_a_pool_per_node() -> None:
    shared_events, shared_datagrams = storm(RecordPool())
    own_events, own_datagrams = storm(None)
    assert len(shared_events) > 24 * 23  # the storm's joins at least, then dead and rejoin
    kinds = {ev.kind for _, _, ev in shared_events}
    assert {"join", "update", "suspect", "dead"} <= kinds
    assert shared_events == own_events
    assert shared_datagrams == own_datagrams


def test_a_shared_pool_holds_one_record_per_member_version() -> None:
    pool = RecordPool()
    net, nodes = build_warm(50, 5, LAN, 3, Link(), pool)
    assert len(pool) == 50
    a, b = nodes[0], nodes[1]
    assert a._members["n7"].rec is b._members["n7"].rec  # shared, not copied
    assert all(nd.num_active() == 50 for nd in nodes)
    assert net.events == []
    assert all(len(nd.broadcasts) == 1 for nd in nodes)


def test_warm_start_is_a_converged_mesh_that_runs() -> None:
    net, nodes = build_warm(40, 4, LAN, 5, Link(loss=0.05), RecordPool())
    net.record_events = True
    net.run_for(20.0)
    assert all(nd.num_active() == 40 for nd in nodes)
    assert not [ev for _, _, ev in net.events if ev.kind in ("suspect", "dead")]
    seen = nodes[9].member("n3")
    assert seen is not None
    assert seen.meta == {"site": "s3"}


def test_run_scale_reports_spread_detection_and_cost() -> None:
    r = run_scale(60, sites=6, duration=20.0, loss=0.05, churn=0.05, seed=2)
    assert r["nodes"] == 60
    assert r["restarts"] == 1
    assert r["spread_s"]["50"] <= r["spread_s"]["99"] <= r["spread_s"]["99.9"] < 5.0
    assert r["detect_first_s"] <= r["detect_all_s"] < 19.0
    assert r["false_dead"] == 0
    half, full = r["model_spread_s"]["with_half"], r["model_spread_s"]["without_half"]
    assert full["99"] < half["99"]
    assert half["99"] == round(epidemic_time(60, LAN.gossip_nodes, 0.05, LAN.gossip_interval, 0.99), 3)
    assert r["bytes_per_node_s"] > 0
    assert r["cpu_s_per_virtual_s"] > 0


def test_restarted_nodes_come_back_alive_everywhere() -> None:
    r = run_scale(40, duration=30.0, churn=0.1, seed=3, cold=True)
    assert r["restarts"] == 2
    assert r["false_dead"] == 0


def test_ci_sized_run_keeps_memory_per_member_bounded() -> None:
    # Its own process: peak RSS is per process. Measured 111 bytes per member at 2,000 nodes
    # (a node-member pair: the dict slot, the 3-slot entry, the probe ring's pointer).
    cmd = [sys.executable, "-m", "meshd.sim", "--nodes", "2000", "--sites", "200", "--duration", "10s"]
    out = subprocess.run(
        [*cmd, "--loss", "0.05", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT, check=True
    )
    r = json.loads(out.stdout)
    assert r["bytes_per_member"] < 150, r
    assert r["spread_s"]["99.9"] is not None
    assert r["false_dead"] == 0
