#!/usr/bin/env python3
"""`make sim`: the simulator's published runs, each in its own process (its own peak RSS).

    python bench/sim_grid.py                     # the published grid (about 1.5 hours, 12 GB peak)
    python bench/sim_grid.py --small             # 100 and 1,000 nodes only (a few minutes)
    python bench/sim_grid.py --nodes 10000 --loss 0.05 --churn 0.01 --keep   # one more run

Every run is `python -m meshd.sim --nodes N --sites N/10 --duration 60s --loss L --churn C
--seed 1 --json`: warm start, lan profile. The JSON objects go to bench/results/simulator.json
({"runs": [...]}, each with the command that made it); --keep keeps the runs already there
whose (nodes, loss, churn) was not rerun. bench/results/simulator.md gets the table
(bench/report.py's sim_table), and `make report` puts it with the plots in README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.benchstats import source_commit  # noqa: E402
from bench.report import churn_of, sim_table  # noqa: E402

RESULTS = REPO / "bench" / "results"
SMALL = [(n, loss, churn) for n, loss, churn in itertools.product((100, 1000), (0.0, 0.05, 0.1), (0.0, 0.01))]
BIG = [(10_000, 0.05, 0.01), (10_000, 0.0, 0.0)]


def run_one(nodes: int, loss: float, churn: float, duration: str, seed: int) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "meshd.sim", "--nodes", str(nodes), "--sites", str(max(1, nodes // 10)),
        "--duration", duration, "--loss", str(loss), "--churn", str(churn), "--seed", str(seed), "--json",
    ]  # fmt: skip
    started = time.monotonic()
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    run: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    run["commit"] = source_commit()  # what was measured: the core changes between runs
    run["date"] = time.strftime("%Y-%m-%d %H:%M")
    print(
        f"{nodes} nodes, loss {loss:g}, churn {churn:g}/min: spread 99% {run['spread_s']['99']} s, "
        f"kill seen by all {run['detect_all_s']} s, false deaths {run['false_dead']}, "
        f"summary {run.get('summary_s')} s, {run['peak_rss_bytes'] / 2**30:.2f} GiB, "
        f"{time.monotonic() - started:.0f} s wall",
        flush=True,
    )
    return run


def key(run: dict[str, Any]) -> tuple[int, float, float]:
    return int(run["nodes"]), float(run["loss"]), churn_of(run)


def write(runs: list[dict[str, Any]], results: Path) -> None:
    runs = sorted(runs, key=lambda r: (r["loss"], churn_of(r), r["nodes"]))
    (results / "simulator.json").write_text(json.dumps({"bench": "simulator", "runs": runs}, indent=1) + "\n")
    lines = [
        "# Simulator: the real core at 100 to 10,000 nodes, against Serf's model",
        "",
        "`make sim` (bench/sim_grid.py): each row is one `python -m meshd.sim --nodes N --sites N/10 "
        "--duration 60s --loss L --churn C --seed 1 --json` (its command is in simulator.json), in its own "
        "process on this 2-core machine: warm start (every node bulk-loads the converged member table; one "
        "shared record pool), lan profile, 60 virtual seconds.",
        "",
        "- **spread**: one metadata change at one node, until 50/99/99.9% of the nodes that stayed up "
        "have it.",
        "- **model**: Serf's analytic epidemic model (fan-out 3, 200 ms rounds) with its built-in 0.5 factor "
        "in the contact rate, and without it (ideal push gossip).",
        "- **kill seen by all**: one node crashed 1 s into the window, until every node that stayed up "
        "marks it dead.",
        "- **false deaths**: dead events, at any node, about a node that was not crashed.",
        "- **site summary**: after the window, `GET /v1/health?summary=site`'s query from one node "
        "(timeout 4 s): virtual time until every site's summary is in, messages the asker received, "
        "sites that sent one.",
        "- **churn**: that fraction of the nodes crashes per minute, at random times, each back 5 s later "
        "with a higher incarnation through a live member.",
        "- **bytes per member**: peak RSS over N^2; **B per node per s**: UDP and TCP bytes sent, per node.",
        "",
        *sim_table(runs),
        "",
    ]
    (results / "simulator.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="100 and 1,000 nodes only")
    ap.add_argument("--nodes", type=int, action="append", help="run only these sizes (with --loss, --churn)")
    ap.add_argument("--loss", type=float, action="append")
    ap.add_argument("--churn", type=float, action="append")
    ap.add_argument("--duration", default="60s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep earlier runs that were not rerun")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.nodes:
        grid = list(itertools.product(args.nodes, args.loss or [0.05], args.churn or [0.01]))
    else:
        grid = SMALL if args.small else SMALL + BIG
    done: dict[tuple[int, float, float], dict[str, Any]] = {}
    path = args.results / "simulator.json"
    if args.keep and path.exists():
        done = {key(r): r for r in json.loads(path.read_text()).get("runs", [])}
    for nodes, loss, churn in grid:
        run = run_one(nodes, loss, churn, args.duration, args.seed)
        done[key(run)] = run
        write(list(done.values()), args.results)  # after each run: a long grid keeps what it has
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
