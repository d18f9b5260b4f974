"""Many-node simulator: the real core over the in-memory network, in virtual time.

    python -m meshd.sim --nodes 500 --loss 0.05 --seed 1             # markdown table (join storm)
    python -m meshd.sim --nodes 10000 --sites 1000 --duration 60s --loss 0.05 --churn 0.01 --json

It builds a converged cluster, injects one piece of news (a metadata change at one node), and
reports how fast it reaches the cluster next to Serf's analytic epidemic model
(reference/gossip-membership.md 2.4), then kills one node and reports failure detection.
Every member holds the whole member list, so memory grows with N^2; the records in those
lists are shared (one RecordPool for the whole simulation) and --json starts warm: every
node bulk-loads the converged member table (Node.load_members) instead of simulating the
join storm (--cold does that, for small N).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

from meshd import PROTOCOL_VERSION
from meshd.core.config import PRESETS, ProtocolConfig
from meshd.core.effects import MemberEvent
from meshd.core.members import RecordPool
from meshd.core.messages import MemberState
from meshd.core.node import Node
from meshd.net.memory import Link, MemoryNetwork
from meshd.sim_summary import run_site_summary
from meshd.units import parse_duration
from meshd.wire import Codec


def epidemic_fraction(n: int, fanout: int, loss: float, rounds: float, half: bool = True) -> float:
    """Serf's convergence model: fraction of n nodes informed after `rounds` gossip rounds.

    `half`: Serf's model carries a factor 0.5 in its contact rate; without it, the curve is
    that of ideal push gossip (each round, fanout contacts that all count)."""
    contact = (fanout / n) * (1 - loss) * (0.5 if half else 1.0)
    return 1.0 / (1.0 + (n + 1) * math.exp(-contact * n * rounds))


def epidemic_time(
    n: int, fanout: int, loss: float, interval: float, target: float, half: bool = True
) -> float:
    """Seconds until the model reaches `target` (e.g. 0.999) of the nodes."""
    contact = (fanout / n) * (1 - loss) * (0.5 if half else 1.0)
    rounds = math.log((n + 1) * target / (1 - target)) / (contact * n)
    return rounds * interval


@dataclass
class SpreadResult:
    nodes: int
    t50: float
    t90: float
    t99: float
    t100: float
    model50: float
    model90: float
    model99: float
    detect_first: float
    detect_all: float
    datagrams_per_node_s: float
    bytes_per_node_s: float
    wall_s: float


def build_cluster(n: int, config: ProtocolConfig, seed: int, link: Link) -> tuple[MemoryNetwork, list[Node]]:
    net = MemoryNetwork(seed=seed, link=Link())
    net.record_events = False
    codec = Codec("sim", None)
    nodes = [net.add_node(f"n{i}", config, codec) for i in range(n)]
    # Join in waves through a few seeds, as a real rollout would.
    seeds = [nd.addr for nd in nodes[:3]]
    for nd in nodes[1:]:
        nd.join(seeds[:1] if nd in nodes[:3] else seeds, net.now)
        net.poke(nd)
    if not net.run_until_true(lambda: all(nd.num_active() == n for nd in nodes), 300.0, step=1.0):
        raise RuntimeError("the simulated cluster did not converge")
    net.link = link
    return net, nodes


def run_spread(n: int, profile: str = "lan", loss: float = 0.0, seed: int = 1) -> SpreadResult:
    wall = time.perf_counter()
    config = PRESETS[profile]
    net, nodes = build_cluster(n, config, seed, Link(loss=loss))
    net.run_for(5.0)  # let join chatter settle
    origin = nodes[0]
    t0 = net.now
    origin.set_meta({"release": "r2"}, net.now)
    net.poke(origin)
    informed_at: list[float] = []
    pending = set(nodes)
    while pending and net.now - t0 < 120.0:
        net.run_for(config.gossip_interval / 4)
        done = {nd for nd in pending if (m := nd.member(origin.name)) and m.meta.get("release") == "r2"}
        informed_at.extend([net.now - t0] * len(done))
        pending -= done

    def pct(p: float) -> float:
        k = max(0, math.ceil(p * n) - 1)
        return informed_at[k] if k < len(informed_at) else float("inf")

    d0, b0 = net.stats.datagrams, net.stats.datagram_bytes
    span_start = net.now
    victim = nodes[n // 2]
    net.kill(victim)
    tk = net.now
    first = math.inf
    others = [nd for nd in nodes if nd is not victim]

    def seen(nd: Node) -> bool:
        m = nd.member(victim.name)
        return m is not None and m.state == MemberState.DEAD

    while net.now - tk < 300.0:
        net.run_for(0.25)
        count = sum(1 for nd in others if seen(nd))
        if count and first == math.inf:
            first = net.now - tk
        if count == len(others):
            break
    detect_all = net.now - tk if all(seen(nd) for nd in others) else math.inf
    span = net.now - span_start
    fan = config.gossip_nodes
    return SpreadResult(
        nodes=n,
        t50=pct(0.5),
        t90=pct(0.9),
        t99=pct(0.99),
        t100=pct(1.0),
        model50=epidemic_time(n, fan, loss, config.gossip_interval, 0.5),
        model90=epidemic_time(n, fan, loss, config.gossip_interval, 0.9),
        model99=epidemic_time(n, fan, loss, config.gossip_interval, 0.99),
        detect_first=first,
        detect_all=detect_all,
        datagrams_per_node_s=(net.stats.datagrams - d0) / span / n,
        bytes_per_node_s=(net.stats.datagram_bytes - b0) / span / n,
        wall_s=time.perf_counter() - wall,
    )


# --- the scale run (--json) ------------------------------------------------------------------

SETTLE_S = 5.0  # virtual seconds between start and the measurement window
KILL_AFTER_S = 1.0  # the failure to detect happens this long into the window
RESTART_AFTER_S = 5.0  # a churned node comes back this long after its crash
# The aggregated query's timeout: a site whose aggregator died unnoticed waits 40% of it.
SUMMARY_TIMEOUT_S = 4.0


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _site(i: int, sites: int) -> dict[str, str]:
    return {"site": f"s{i % sites}"} if sites > 0 else {}


def build_warm(
    n: int, sites: int, config: ProtocolConfig, seed: int, link: Link, pool: RecordPool | None
) -> tuple[MemoryNetwork, list[Node]]:
    """A converged cluster without the join storm: every node bulk-loads every member."""
    net = MemoryNetwork(seed=seed, link=link)
    net.record_events = False
    net.pool = pool
    codec = Codec("sim", None)
    nodes = [net.add_node(f"n{i}", config, codec, meta=_site(i, sites)) for i in range(n)]
    shared = pool if pool is not None else RecordPool()
    # Every simulated node runs this code: each announces PROTOCOL_VERSION (digest anti-entropy).
    records = [
        shared.record(nd.name, nd.node_id, nd.addr, nd.incarnation, nd.meta, PROTOCOL_VERSION) for nd in nodes
    ]
    for nd in nodes:
        nd.load_members(records, net.now)
    return net, nodes


def build_cold(
    n: int, sites: int, config: ProtocolConfig, seed: int, link: Link, pool: RecordPool | None
) -> tuple[MemoryNetwork, list[Node]]:
    """A cluster made by a join storm through three seeds, as a real rollout would."""
    net = MemoryNetwork(seed=seed, link=Link())
    net.record_events = False
    net.pool = pool
    codec = Codec("sim", None)
    nodes = [net.add_node(f"n{i}", config, codec, meta=_site(i, sites)) for i in range(n)]
    seeds = [nd.addr for nd in nodes[:3]]
    for i, nd in enumerate(nodes[1:], 1):
        nd.join(seeds[:1] if i < 3 else seeds, net.now)
        net.poke(nd)
    if not net.run_until_true(lambda: all(nd.num_active() == n for nd in nodes), 300.0, step=1.0):
        raise RuntimeError("the simulated cluster did not converge")
    net.link = link
    return net, nodes


def _percentiles(times: list[float], total: int) -> dict[str, float | None]:
    times = sorted(times)
    out: dict[str, float | None] = {}
    for p in ("50", "99", "99.9"):
        k = max(0, math.ceil(float(p) / 100 * total) - 1)
        out[p] = round(times[k], 3) if k < len(times) else None
    return out


def _finite(x: float) -> float | None:
    return round(x, 3) if math.isfinite(x) else None


def run_scale(
    n: int,
    sites: int = 0,
    duration: float = 60.0,
    loss: float = 0.0,
    churn: float = 0.0,
    seed: int = 1,
    profile: str = "lan",
    cold: bool = False,
    shared_pool: bool = True,
) -> dict[str, Any]:
    """One run: news spread, one kill's detection, churn, false deaths and the cost of it all."""
    wall = time.perf_counter()
    baseline = _rss_bytes()
    config = PRESETS[profile]
    pool = RecordPool() if shared_pool else None
    gc.disable()  # building makes N^2 objects that all live: no point tracing them as they come
    build = build_cold if cold else build_warm
    net, nodes = build(n, sites, config, seed, Link(loss=loss), pool)
    gc.freeze()  # ... nor later: the member tables stay for the whole run
    gc.enable()
    build_s = time.perf_counter() - wall
    net.run_for(SETTLE_S)
    rng = random.Random(seed ^ 0x5CA1E)

    origin, victim = nodes[0], nodes[n // 2]
    killed: set[str] = {victim.name}  # every name ever crashed (churn included)
    churned: set[str] = set()
    informed: dict[str, float] = {}
    seen_dead: dict[str, float] = {}
    false_dead = 0
    t0 = net.now
    t_kill = t0 + KILL_AFTER_S

    def on_event(at_node: str, ev: MemberEvent) -> None:
        nonlocal false_dead
        m = ev.member
        if ev.kind == "dead" and m.name not in killed:
            false_dead += 1
        if m.name == origin.name and m.meta.get("release") == "r2" and at_node not in informed:
            informed[at_node] = net.now - t0
        if m.name == victim.name and ev.kind == "dead" and at_node not in seen_dead:
            seen_dead[at_node] = net.now - t_kill

    net.on_event = on_event

    # Churn: crashes at random times in the window, each back RESTART_AFTER_S later.
    restarts = round(churn * n * duration / 60.0)
    spare = [nd for nd in nodes if nd is not origin and nd is not victim]
    back_at: dict[str, float] = {}  # churned name -> when it came back
    for nd in rng.sample(spare, min(restarts, len(spare))):
        at = t0 + rng.random() * max(0.0, duration - RESTART_AFTER_S)
        back_at[nd.name] = at + RESTART_AFTER_S
        net.call_at(at, functools.partial(_crash, net, nd, killed, churned))
        net.call_at(at + RESTART_AFTER_S, functools.partial(_restart, net, nd, nodes, config, rng))

    d0 = net.stats.datagrams
    b0 = net.stats.datagram_bytes + net.stats.stream_bytes
    cpu0 = time.process_time()
    origin.set_meta({**origin.meta, "release": "r2"}, net.now)
    net.poke(origin)
    net.call_at(t_kill, lambda: net.kill(victim))
    net.run_until(t0 + duration)
    cpu = time.process_time() - cpu0

    stable = [nd.name for nd in nodes if nd.name not in churned and nd is not origin and nd is not victim]
    spread_t = [informed[s] for s in stable if s in informed]
    detect_t = [seen_dead[s] for s in stable if s in seen_dead]
    fan = config.gossip_nodes
    model = {
        key: {
            p: round(epidemic_time(n, fan, loss, config.gossip_interval, float(p) / 100, half), 3)
            for p in ("50", "99", "99.9")
        }
        for key, half in (("with_half", True), ("without_half", False))
    }
    summary = _site_summary(net, nodes, victim, back_at) if sites > 0 else {}
    peak = _rss_bytes()
    return {
        "nodes": n,
        "sites": sites,
        "profile": profile,
        "loss": loss,
        "churn_per_min": churn,
        "seed": seed,
        "start": "cold" if cold else "warm",
        "duration_s": duration,
        "restarts": restarts,
        "spread_s": _percentiles(spread_t, len(stable)),
        "spread_informed": f"{len(spread_t)}/{len(stable)}",
        "model_spread_s": model,
        "detect_first_s": _finite(min(detect_t, default=math.inf)),
        "detect_all_s": _finite(max(detect_t) if len(detect_t) == len(stable) else math.inf),
        "detect_seen": f"{len(detect_t)}/{len(stable)}",
        "false_dead": false_dead,
        "datagrams_per_node_s": round((net.stats.datagrams - d0) / duration / n, 2),
        "bytes_per_node_s": round((net.stats.datagram_bytes + net.stats.stream_bytes - b0) / duration / n, 1),
        "cpu_s_per_virtual_s": round(cpu / duration, 3),
        "build_s": round(build_s, 2),
        "wall_s": round(time.perf_counter() - wall, 2),
        "peak_rss_bytes": peak,
        "bytes_per_member": round((peak - baseline) / (n * n), 1),
        "record_pool": len(pool) if pool is not None else None,
        **summary,
        "command": "",
    }


def _site_summary(
    net: MemoryNetwork, nodes: list[Node], victim: Node, back_at: dict[str, float]
) -> dict[str, Any]:
    """After the window: `GET /v1/health?summary=site`'s query from a live node, the killed
    node's site checked to list it as missing. `back_at`: when each churned node restarted."""
    asker = next(nd for nd in nodes[1:] if nd is not victim and net.nodes.get(nd.addr) is nd)
    asked_at = net.now
    run = run_site_summary(net, asker, SUMMARY_TIMEOUT_S)
    victim_site = victim.meta.get("site", "")
    victim_missing = any(victim.name in s.missing for s in run.result.sites if s.site == victim_site)
    missing = {n for s in run.result.sites for n in s.missing}
    up = {nd.name for nd in net.nodes.values() if nd.addr not in net.down}
    return {
        "summary_s": round(run.summary_s, 3),
        "summary_timed_out": run.result.timed_out,
        "summary_sites": f"{sum(1 for s in run.result.sites if s.parts)}/{len(run.result.sites)}",
        "messages_to_asker": run.messages_to_asker,
        "summary_dead_missing": victim_missing,
        "summary_missing": len(missing),
        "summary_missing_but_up": len(missing & up),  # live nodes the summary lost
        # ... of which had restarted within RESTART_AFTER_S before the query: their site may
        # not have heard them back yet (a just-restarted node is suspect there, or ranks itself
        # its site's aggregator before the others know it is back)
        "summary_missing_but_up_recent": sum(
            1 for name in missing & up if asked_at - back_at.get(name, -math.inf) <= RESTART_AFTER_S
        ),
    }


def _crash(net: MemoryNetwork, nd: Node, killed: set[str], churned: set[str]) -> None:
    killed.add(nd.name)
    churned.add(nd.name)
    net.remove(nd)


def _restart(
    net: MemoryNetwork, old: Node, nodes: list[Node], config: ProtocolConfig, rng: random.Random
) -> None:
    """The same name back with a higher incarnation, joining through a live member."""
    fresh = net.add_node(
        old.name,
        config,
        old.codec,
        meta=old.meta,
        addr=old.addr,
        node_id=old.node_id,
        incarnation=old.incarnation + 1,
    )
    while True:
        via = nodes[rng.randrange(len(nodes))]
        if via.addr not in net.down and net.nodes.get(via.addr) is via and via is not fresh:
            break
    nodes[nodes.index(old)] = fresh
    fresh.join([via.addr], net.now)
    net.poke(fresh)


def format_table(results: list[SpreadResult], loss: float) -> str:
    lines = [
        "| nodes | loss | news 50% / 90% / 99% / all (s) | Serf model 50% / 90% / 99% (s) "
        "| kill seen first / by all (s) | UDP pkts/node/s | UDP B/node/s | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.nodes} | {loss:.0%} | {r.t50:.2f} / {r.t90:.2f} / {r.t99:.2f} / {r.t100:.2f} "
            f"| {r.model50:.2f} / {r.model90:.2f} / {r.model99:.2f} "
            f"| {r.detect_first:.1f} / {r.detect_all:.1f} | {r.datagrams_per_node_s:.1f} "
            f"| {r.bytes_per_node_s:.0f} | {r.wall_s:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m meshd.sim", description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, action="append", help="cluster size (repeatable)")
    ap.add_argument("--sites", type=int, default=0, help="meta site=s<i %% S> (0: no site)")
    ap.add_argument("--duration", default="60s", help="virtual length of the measurement window")
    ap.add_argument("--churn", type=float, default=0.0, help="fraction of nodes restarting per minute")
    ap.add_argument("--json", action="store_true", help="one JSON object per size (warm start)")
    ap.add_argument("--cold", action="store_true", help="with --json: build by a join storm (small N)")
    ap.add_argument("--per-node-pools", action="store_true", help="with --json: no shared record pool")
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--profile", choices=sorted(PRESETS), default="lan")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    if args.json:
        for n in args.nodes or [100]:
            out = run_scale(
                n,
                args.sites,
                parse_duration(args.duration, "--duration"),
                args.loss,
                args.churn,
                args.seed,
                args.profile,
                args.cold,
                not args.per_node_pools,
            )
            out["command"] = "python -m meshd.sim " + " ".join(argv)
            print(json.dumps(out), flush=True)
        return 0
    results = [run_spread(n, args.profile, args.loss, args.seed) for n in (args.nodes or [100])]
    table = format_table(results, args.loss)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                f"# Simulator: news spread and failure detection ({args.profile}, seed {args.seed})\n\n"
                f"`python -m meshd.sim {' '.join(argv or [])}`: the real core over the in-memory "
                "network in virtual time; the model is Serf's analytic epidemic model.\n\n"
                f"{table}\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
