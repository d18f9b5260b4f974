"""Many-node simulator: the real core over the in-memory network, in virtual time.

    python -m meshd.sim --nodes 500 --loss 0.05 --seed 1

It builds a converged cluster, injects one piece of news (a metadata change at one node), and
reports how fast it reaches the cluster next to Serf's analytic epidemic model
(reference/gossip-membership.md 2.4), then kills one node and reports failure detection.
Every member holds the whole member list, so memory grows with N^2: a few thousand nodes
fit on a laptop.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

from meshd.core.config import PRESETS, ProtocolConfig
from meshd.core.messages import MemberState
from meshd.core.node import Node
from meshd.net.memory import Link, MemoryNetwork
from meshd.wire import Codec


def epidemic_fraction(n: int, fanout: int, loss: float, rounds: float) -> float:
    """Serf's convergence model: fraction of n nodes informed after `rounds` gossip rounds."""
    contact = (fanout / n) * (1 - loss) * 0.5
    return 1.0 / (1.0 + (n + 1) * math.exp(-contact * n * rounds))


def epidemic_time(n: int, fanout: int, loss: float, interval: float, target: float) -> float:
    """Seconds until the model reaches `target` (e.g. 0.999) of the nodes."""
    contact = (fanout / n) * (1 - loss) * 0.5
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
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--profile", choices=sorted(PRESETS), default="lan")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
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
