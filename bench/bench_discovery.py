#!/usr/bin/env python3
"""Discovery benchmark in the network-namespace lab: meshd against `serf agent -discover`.

Run as root from the repository:  sudo python bench/bench_discovery.py [--runs 5] [--profile lan]

Measured, side by side in one run, with the same timing preset for both systems:

- site formation: three fresh processes started in one site with mDNS and no seeds; time from
  the first process start until every one of them has logged the join of the two others
  (meshd `member join: X`, serf `EventMemberJoin: X`; lines are timestamped as they arrive);
- heal: two sites of three, merged by one seed; the site-2 uplink is cut; time until each side
  lists the other dead (serf: failed), then, after the link returns, time until all six list all
  six alive, with no operator action. Both systems reconnect to failed members at the same
  interval, meshd's for the preset (10 s at lan; serf gets it through `reconnect_interval` in a
  config file, its default being 30 s). `--runs` (default 5) repetitions of each, median (min-max).

serf runs from Debian's package (`serf agent -discover=<cluster> -iface eth0`, mDNS service
`_serf_<cluster>._tcp`), meshd as `meshd run --mdns-interface <lab ip>`. Everything stays in
lab namespaces (198.18.0.0/15); a packet socket on the root namespace counts mDNS on the
machine's real interfaces during the run, which must stay 0. Results: a table on stdout and in
bench/results/discovery.md. The lab (prefix `mdb-`) is always torn down.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.benchstats import DEFAULT_RUNS, cell, environment, json_path, summary, write_json  # noqa: E402
from bench.lab_module import load_lab  # noqa: E402

RESULTS = REPO / "bench" / "results" / "discovery.md"
SERF_PORT = 7946
SERF_RPC = "127.0.0.1:7373"


lm = load_lab()


@dataclass
class Proc:
    """A process in a lab host whose output lines are timestamped on arrival."""

    host: str
    popen: subprocess.Popen[bytes]
    lines: list[tuple[float, str]] = field(default_factory=list)

    def start_reader(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))


def reconnect_interval(profile: str) -> float:
    """meshd's reconnect interval for a preset: both systems get it in the heal test."""
    from meshd.core.config import PRESETS

    return PRESETS[profile].reconnect_interval


class System:
    """How to start one system in a lab host and read its member list."""

    name = ""
    join_re: re.Pattern[str]

    def __init__(self, lab: Any, cluster: str, profile: str) -> None:
        self.lab = lab
        self.cluster = cluster
        self.profile = profile
        self.procs: dict[str, Proc] = {}

    def argv(self, host: Any, seeds: list[str]) -> list[str]:
        raise NotImplementedError

    def seed_addr(self, host: Any) -> str:
        raise NotImplementedError

    def prepare(self, host: Any) -> None:
        shutil.rmtree(self.lab.host_dir(host) / self.name, ignore_errors=True)

    def start(self, host_name: str, seeds: list[str] | None = None) -> Proc:
        host = self.lab.host(host_name)
        self.prepare(host)
        popen = self.lab.popen(host, self.argv(host, seeds or []), stdout=subprocess.PIPE)
        proc = Proc(host_name, popen)
        proc.start_reader()
        self.procs[host_name] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            self.lab.kill(proc.popen, signal.SIGKILL)
        self.procs.clear()
        self.lab.kill_all()

    def joined_at(self, host: str, peers: set[str]) -> float | None:
        """Arrival time of the line that completed `peers` on `host`, or None."""
        missing = set(peers)
        for t, line in list(self.procs[host].lines):
            m = self.join_re.search(line)
            if m:
                missing.discard(m.group(1))
                if not missing:
                    return t
        return None

    def view(self, host: str) -> dict[str, str] | None:
        raise NotImplementedError

    def views(self, hosts: list[str]) -> dict[str, dict[str, str] | None]:
        with ThreadPoolExecutor(len(hosts)) as pool:
            return dict(zip(hosts, pool.map(self.view, hosts), strict=True))


class Meshd(System):
    name = "meshd"
    join_re = re.compile(r"member join: (\S+)")

    def argv(self, host: Any, seeds: list[str]) -> list[str]:
        return self.lab.meshd_argv(host, cluster=self.cluster, profile=self.profile, joins=seeds)

    def prepare(self, host: Any) -> None:
        shutil.rmtree(self.lab.host_dir(host) / "meshd", ignore_errors=True)
        (self.lab.host_dir(host) / "meshd").mkdir(parents=True)

    def seed_addr(self, host: Any) -> str:
        return f"{host.ip}:{lm.MESHD_PORT}"

    def view(self, host: str) -> dict[str, str] | None:
        return self.lab.member_states(host)


class Serf(System):
    name = "serf"
    join_re = re.compile(r"EventMemberJoin: (\S+)")

    def config_file(self, host: Any) -> Path:
        """serf's reconnect interval set to meshd's for the preset (serf's own default is 30 s)."""
        path = self.lab.host_dir(host) / "serf-config.json"
        path.write_text(json.dumps({"reconnect_interval": f"{reconnect_interval(self.profile):g}s"}))
        return path

    def argv(self, host: Any, seeds: list[str]) -> list[str]:
        argv = [
            "serf", "agent", "-node", host.name, "-bind", f"{host.ip}:{SERF_PORT}",
            "-rpc-addr", SERF_RPC, "-discover", self.cluster, "-iface", host.ifname,
            "-profile", self.profile, "-log-level", "info",
            "-config-file", str(self.config_file(host)),
        ]  # fmt: skip
        for seed in seeds:
            argv += ["-retry-join", seed, "-retry-interval", "1s"]
        return argv

    def seed_addr(self, host: Any) -> str:
        return f"{host.ip}:{SERF_PORT}"

    def view(self, host: str) -> dict[str, str] | None:
        try:
            proc = self.lab.exec(
                host, ["serf", "members", "-rpc-addr", SERF_RPC, "-format", "json"], timeout=5
            )
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0:
            return None
        try:
            members = json.loads(proc.stdout)["members"]
        except (ValueError, KeyError):
            return None
        states = {"alive": "alive", "failed": "dead", "left": "left", "leaving": "left"}
        return {m["name"]: states.get(m["status"], m["status"]) for m in members}


def _poll(
    system: System, hosts: list[str], cond: Callable[[dict[str, Any]], bool], timeout: float
) -> float | None:
    """Seconds until cond(views) holds, polling every 0.25 s; None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond(system.views(hosts)):
            return time.monotonic() - t0
        time.sleep(0.25)
    return None


def _alive(view: dict[str, str] | None) -> set[str]:
    return {n for n, s in (view or {}).items() if s == "alive"}


@dataclass
class Formation:
    first: float | None = None  # first peer seen anywhere, from the first process start
    complete: float | None = None  # every host lists the two others, from the first process start
    after_up: float | None = None  # complete, from the moment the last process printed its first line


def bench_site_formation(system: System, timeout: float) -> Formation:
    """Three fresh processes in site 1, mDNS only."""
    lab = system.lab
    hosts = [h.name for h in lab.hosts(1)]
    system.stop_all()
    t0 = time.monotonic()
    for h in hosts:
        system.start(h)
    deadline = t0 + timeout
    done: dict[str, float] = {}
    while time.monotonic() < deadline and len(done) < len(hosts):
        for h in hosts:
            if h not in done:
                t = system.joined_at(h, set(hosts) - {h})
                if t is not None:
                    done[h] = t
        time.sleep(0.05)
    firsts = []
    for h in hosts:
        for t, line in list(system.procs[h].lines):
            m = system.join_re.search(line)
            if m and m.group(1) != h:  # serf logs its own join too
                firsts.append(t)
    result = Formation(first=min(firsts) - t0 if firsts else None)
    if len(done) == len(hosts):
        # Cross-check the logs against the member lists.
        ok = _poll(system, hosts, lambda v: all(_alive(x) == set(hosts) for x in v.values()), 15)
        if ok is not None:
            result.complete = max(done.values()) - t0
            up = max(system.procs[h].lines[0][0] for h in hosts)
            result.after_up = max(done.values()) - up
    system.stop_all()
    return result


@dataclass
class Heal:
    formed: float | None = None
    detect: float | None = None
    heal: float | None = None


def bench_heal(system: System, form_timeout: float, heal_timeout: float) -> Heal:
    lab = system.lab
    hosts = [h.name for h in lab.hosts()]
    everyone = set(hosts)
    result = Heal()
    system.stop_all()
    seed = system.seed_addr(lab.host("s2h1"))
    for h in sorted(hosts, key=lambda n: n == "s1h1"):  # the seed's side first, s1h1 last
        system.start(h, seeds=[seed] if h == "s1h1" else [])
    result.formed = _poll(
        system, hosts, lambda v: all(_alive(x) == everyone for x in v.values()), form_timeout
    )
    if result.formed is None:
        system.stop_all()
        return result

    def split(views: dict[str, dict[str, str] | None]) -> bool:
        for h, view in views.items():
            other = {n for n in hosts if n[:2] != h[:2]}
            if view is None or any(view.get(n) != "dead" for n in other):
                return False
        return True

    lab.cut(2)
    try:
        result.detect = _poll(system, hosts, split, heal_timeout)
    finally:
        lab.restore(2)
    if result.detect is not None:
        result.heal = _poll(
            system, hosts, lambda v: all(_alive(x) == everyone for x in v.values()), heal_timeout
        )
    system.stop_all()
    return result


def _fmt(x: float | None, timeout: float | None = None) -> str:
    if x is None:
        return f"> {timeout:.0f} s" if timeout else "n/a"
    return f"{x:.2f} s"


def render(doc: dict[str, Any]) -> str:
    """The Markdown result file, from the raw document alone (bench/report.py reuses it)."""
    env, c = doc["env"], doc["conditions"]
    form, heal = doc["formation"], doc["heal"]
    lines = [
        "# Discovery: meshd vs serf in the namespace lab",
        "",
        f"`{env['command']}` at commit {env.get('commit') or '?'}, "
        f"{env['date']} on {env['host']} (kernel {env['kernel']}, {env['cpus']} CPUs, "
        f"load {env['load_1m_at_start']} at start), {c['serf']}, Python {env['python']}; profile "
        f"`{c['profile']}` for both systems; reconnect interval {c['reconnect_interval_s']:g} s for both "
        f"(meshd's `{c['profile']}` preset; serf given it with `reconnect_interval` in its config file, "
        "its own default being 30 s). Each cell: median (min-max) over the runs, n = runs that finished; "
        f"{c['runs']} run(s) of site formation and {c['heal_runs']} of the heal test per system.",
        "",
        "Lab: `scripts/lab.py` (network namespaces, a bridge per site, one router, 198.18.0.0/15, "
        "link-local IPv6 on without DAD, as serf's mDNS client fails without IPv6). "
        "Site formation: 3 fresh processes in one site, mDNS only, no seeds; clock from the first "
        "process start until all three logged the two others' joins (cross-checked "
        "against the member lists). Heal: 2 sites x 3, one seed, a fresh mesh per run; the clock starts "
        "when the site-2 uplink is cut and stops when every member lists the other site dead (serf: "
        "failed); a new clock starts when the link is restored and stops when all six list all six "
        "alive. Member lists are polled every 0.25 s (meshd `/v1/members`, serf `serf members`).",
        "",
        "| measure | meshd | serf |",
        "|---|---|---|",
    ]
    rows = [
        ("first peer seen, from process start", form, "first"),
        ("**3-host site complete, from process start**", form, "complete"),
        ("site complete, from the last process's first log line", form, "after_up"),
        ("2x3 mesh formed through one seed", heal, "formed"),
        ("cut: each side sees the other dead", heal, "detect"),
        (
            f"**restore: whole mesh alive again** (reconnect every {c['reconnect_interval_s']:g} s)",
            heal,
            "heal",
        ),
    ]
    for label, group, key in rows:
        if not group:
            continue
        cells = [cell(summary([r[key] for r in group.get(n, [])])) for n in ("meshd", "serf")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"mDNS packets seen on the machine's real interfaces during the run: **{doc['mdns_leaks']}**.",
        "",
        "Notes: meshd's start includes the Python interpreter and imports; serf is a static Go binary. "
        "A run that did not finish within its bound counts as failed (shown next to the cell), never as "
        "the bound. meshd's heal goal is 60 s after the link returns.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", "--reps", type=int, default=DEFAULT_RUNS, help="site formations per system")
    parser.add_argument("--heal-runs", type=int, default=None, help="heal tests per system (default: --runs)")
    parser.add_argument("--profile", choices=["lan", "wan", "local"], default="lan")
    parser.add_argument("--timeout", type=float, default=60.0, help="bound on site formation, s")
    parser.add_argument("--heal-timeout", type=float, default=120.0, help="bound on detect/heal, s")
    parser.add_argument("--no-heal", action="store_true", help="site formation only")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs meshd")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    ok, why = lm.available()
    if not ok:
        print(f"bench_discovery: {why}", file=sys.stderr)
        return 2
    if shutil.which("serf") is None:
        print("bench_discovery: serf is not installed (apt-get install serf)", file=sys.stderr)
        return 2

    lab = lm.Lab("mdb-")
    lab.python = args.python
    serf_version = subprocess.run(["serf", "version"], capture_output=True, text=True).stdout
    env = environment()
    serf = "serf " + (serf_version.splitlines() or ["?"])[0].strip()
    formation: dict[str, list[Formation]] = {"meshd": [], "serf": []}
    heal: dict[str, list[Heal]] = {"meshd": [], "serf": []}
    heal_runs = args.runs if args.heal_runs is None else args.heal_runs
    sniffer = lm.MdnsSniffer()
    try:
        with sniffer:
            lab.up(sites=2, hosts=3, ipv6=True)  # serf's mDNS client gives up without IPv6
            systems = [Meshd(lab, "bench", args.profile), Serf(lab, "bench", args.profile)]
            for rep in range(args.runs):
                for system in systems if rep % 2 == 0 else systems[::-1]:
                    f = bench_site_formation(system, args.timeout)
                    formation[system.name].append(f)
                    print(f"formation rep {rep + 1} {system.name:5}: first {_fmt(f.first)}, "
                          f"complete {_fmt(f.complete, args.timeout)}, after up {_fmt(f.after_up)}",
                          flush=True)  # fmt: skip
            for rep in range(0 if args.no_heal else heal_runs):
                for system in systems if rep % 2 == 0 else systems[::-1]:
                    h = bench_heal(system, args.timeout, args.heal_timeout)
                    heal[system.name].append(h)
                    print(f"heal rep {rep + 1} {system.name:5}: formed {_fmt(h.formed)}, "
                          f"detect {_fmt(h.detect)}, heal {_fmt(h.heal)}", flush=True)  # fmt: skip
    finally:
        lab.down()
    leaks = sniffer.result().mdns_total
    doc = {
        "bench": "discovery",
        "env": env,
        "conditions": {
            "profile": args.profile,
            "reconnect_interval_s": reconnect_interval(args.profile),
            "runs": args.runs,
            "heal_runs": 0 if args.no_heal else heal_runs,
            "serf": serf,
            "poll_s": 0.25,
        },
        "formation": {n: [asdict(f) for f in fs] for n, fs in formation.items()},
        "heal": {n: [asdict(h) for h in hs] for n, hs in heal.items() if hs},
        "mdns_leaks": leaks,
    }
    report = render(doc)
    print()
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    write_json(json_path(args.out), doc)
    print(f"written to {args.out} and {json_path(args.out)}")
    return 0 if leaks == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
