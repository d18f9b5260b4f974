#!/usr/bin/env python3
"""Release distribution, side by side in the lab: meshd vs a central HTTP server vs BitTorrent.

Topologies (scripts/lab.py, prefix `mdb-`), one per `--config SxH` (repeatable; default 1x8,
1x16, 2x8 and 1x32): S sites of H client hosts each, plus the origin host in site 1. The origin's
uplink (its eth0 egress) is limited by tc tbf (`--rate`, default 100mbit). With S > 1 the link
between the sites is thin: each other site's router link is limited both ways (`--site-rate`,
default 20mbit). The same incompressible release (`--size-mb`, default 40 MB) goes to every
client three ways:

  http     `python -m http.server` on the origin; every client downloads it with curl at once
  torrent  opentracker + an aria2c seeder on the origin (mktorrent); every client runs aria2c
  meshd    `meshd run --profile lan` on every host; `meshctl publish` at the origin

Clocks, the same for the three (the result file says it again next to the figures):
  http     start: the curl clients are launched (server already answering);
           stop:  the last curl has exited 0.
  torrent  start: the aria2c seeder is launched, with the tracker up and every client already
                  running and announced (mktorrent and the info hash are made before);
           stop:  the last client's --on-bt-download-complete hook ran (it writes a timestamp;
                  aria2c runs it when the last piece is verified, before seeding).
  meshd    start: `meshctl publish` is launched at the origin (chunking and signing included),
                  with every daemon up and every member alive in every member list;
           stop:  the last client's releases/rel/current/<file> exists (the atomic switch that
                  ends activation), polled every 50 ms; afterwards each client must list the
                  release as active in /v1/releases and hold it byte for byte.
Storage: every run of every system writes its host data to a fresh ext4 of its own (a loop
device with direct I/O, made by mkfs and mounted for that run only; see fresh_fs).
Origin egress: tx bytes of the origin's eth0 between start and stop (all traffic). With S > 1,
also the bytes that crossed the thin link into the other sites (router side, tx).

Every figure is repeated `--runs N` times (default 5; the systems' order rotates per run) and
reported as median (min-max). Raw runs go to distribution.json beside the .md (`--out`), which
bench/report.py reads. Then delta efficiency: bytes to move for a version with 2% changed
(4 spots of 0.5%), meshd (new chunks' stored bytes + manifest) against casync.

Needs root (ip netns, tc), opentracker, mktorrent, aria2c, curl, casync. Bounded: every wait has
a deadline and every lab process is killed after each system's run.
Usage: bench/bench_distribution.py [--config 1x8 --config 1x16 ...] [--runs 5] [--size-mb 40]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.benchstats import DEFAULT_RUNS, cell, environment, json_path, summary, write_json  # noqa: E402
from bench.lab_module import load_lab  # noqa: E402

PREFIX = "mdb-"
RESULTS = REPO / "bench" / "results" / "distribution.md"
TRACKER_PORT = 6969
HTTP_PORT = 8080
STEP_TIMEOUT = 240.0
SYSTEMS = ("http", "torrent", "meshd")
DEFAULT_CONFIGS = ("1x8", "1x16", "2x8", "1x32")
HOOK = """#!/bin/sh
# aria2c --on-bt-download-complete: GID, number of files, path. Download verified, seeding next.
date +%s.%N > "$3.done.tmp" && mv "$3.done.tmp" "$3.done"
"""


@dataclass(frozen=True)
class Config:
    """S sites x H client hosts; the origin is one more host in site 1."""

    sites: int
    clients_per_site: int

    @property
    def name(self) -> str:
        return f"{self.sites}x{self.clients_per_site}"

    @property
    def clients(self) -> int:
        return self.sites * self.clients_per_site


def parse_config(text: str) -> Config:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or not 1 <= int(m.group(1)) <= 8 or not 1 <= int(m.group(2)) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: SITESxHOSTS, 1..8 sites of 1..64 hosts")
    return Config(int(m.group(1)), int(m.group(2)))


@dataclass
class Topology:
    """The lab laid out for one config: who is the origin, who are the clients."""

    origin: Any
    clients: list[Any]
    thin_links: list[tuple[str, str]]  # (namespace, device) carrying bytes into the other sites


def lay_out(lab: Any, config: Config, rate: str, site_rate: str) -> Topology:
    """Build the lab for a config: origin uplink `rate`; other sites behind `site_rate` both ways."""
    lab.up(sites=config.sites, hosts=config.clients_per_site + 1)
    origin = lab.hosts(1)[0]
    clients = lab.hosts(1)[1:]
    for site in range(2, config.sites + 1):
        clients += lab.hosts(site)[: config.clients_per_site]  # the spare last host stays idle
    lab._limit(origin.ns, "eth0", rate)
    thin = []
    for site in range(2, config.sites + 1):
        lab._limit(lab.router_ns, f"s{site}", site_rate)  # into the site
        lab._limit(lab.switch_ns(site), "uplink", site_rate)  # out of the site
        thin.append((lab.router_ns, f"s{site}"))
    return Topology(origin, clients, thin)


def tx_bytes(ns: str, dev: str = "eth0") -> int:
    return int(load_lab().iface_bytes(ns, dev, "tx_bytes"))


class Counters:
    """Origin egress and thin-link bytes between start() and stop()."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.origin0 = 0
        self.thin0 = 0

    def _thin(self) -> int:
        return sum(tx_bytes(ns, dev) for ns, dev in self.topo.thin_links)

    def start(self) -> None:
        self.origin0, self.thin0 = tx_bytes(self.topo.origin.ns), self._thin()

    def stop(self) -> dict[str, int]:
        return {
            "egress_bytes": tx_bytes(self.topo.origin.ns) - self.origin0,
            "thin_link_bytes": self._thin() - self.thin0,
        }


IDLE_WINDOW = 2.0  # seconds of a meshed, idle cluster measured before each meshd run


def cpu_s(procs: list[subprocess.Popen[Any]]) -> float:
    """CPU seconds (user + system, every thread) the lab processes used so far: on a 2-core box
    with every host a namespace, CPU per MB is what a swarm of many hosts runs out of first."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in procs:
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


# What each meshd host did during a run, from its /metrics (sums of these counter families):
# where the CPU goes is easier to judge with the packets and requests it took.
SCRAPED = (
    "meshd_udp_sent_packets_total",
    "meshd_udp_received_packets_total",
    "meshd_tcp_connects_total",
    "meshd_dist_serve_pieces_total",  # summed over the hosts: the pieces they all asked for
    "meshd_dist_fetch_timeouts_total",
    "meshd_dist_fetch_errors_total",
    "meshd_transfer_received_bytes_total",  # over a release's size: chunks fetched twice or more
    "meshd_dist_serve_drops_busy_total",
    "meshd_dist_fetch_short_total",
)


def scrape(lab: Any, lm: ModuleType, hosts: list[Any]) -> dict[str, float]:
    """SCRAPED summed over `hosts` (a family a host does not export counts 0)."""
    out = dict.fromkeys(SCRAPED, 0.0)
    for h in hosts:
        proc = lab.exec(h, ["curl", "-s", "-m", "3", f"http://127.0.0.1:{lm.API_PORT}/metrics"], timeout=8)
        for line in proc.stdout.splitlines():
            name, _, value = line.partition(" ")
            if name in out:
                out[name] += float(value)
    return out


def wait(what: str, pred: Any, timeout: float = STEP_TIMEOUT, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def has_file(path: Path, size: int, digest: str) -> bool:
    try:
        if path.stat().st_size != size:
            return False
    except OSError:
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == digest


def finish_times(seen: dict[str, float], t0: float) -> dict[str, float]:
    """Per-host seconds from the start, and the figures the table shows."""
    return {h: round(t - t0, 4) for h, t in sorted(seen.items())}


def hook_times(marks: dict[str, str], t0: float, t0_wall: float) -> dict[str, float]:
    """Completion per client on the monotonic clock, from the hook's `date +%s.%N` stamps.

    The stamp is taken when aria2c runs the hook, so the poll's own delay is not in the figure."""
    return {name: t0 + float(text.strip()) - t0_wall for name, text in marks.items()}


# --- the three systems -----------------------------------------------------------------------


def run_http(lab: Any, topo: Topology, src: Path, digest: str) -> dict[str, Any]:
    origin, clients = topo.origin, topo.clients
    procs = [
        lab.popen(
            origin,
            [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", origin.ip,
             "--directory", str(src.parent)],
            log=lab.host_dir(origin) / "http.log",
        )
    ]  # fmt: skip
    try:
        wait(
            "http server",
            lambda: (
                lab.exec(
                    clients[0], ["curl", "-sf", "-o", "/dev/null", f"http://{origin.ip}:{HTTP_PORT}/"]
                ).returncode
                == 0
            ),
        )
        outs = []
        for c in clients:
            out = lab.host_dir(c) / "http" / src.name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.unlink(missing_ok=True)
            outs.append(out)
        counters = Counters(topo)
        counters.start()
        t0 = time.monotonic()  # clock start: the clients are launched
        curls = {
            c.name: lab.popen(
                c, ["curl", "-sf", "-o", str(out), f"http://{origin.ip}:{HTTP_PORT}/{src.name}"]
            )
            for c, out in zip(clients, outs, strict=True)
        }
        procs += curls.values()
        seen: dict[str, float] = {}
        deadline = t0 + STEP_TIMEOUT
        while len(seen) < len(curls):
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for the curl clients")
            for name, p in curls.items():
                if name not in seen and p.poll() is not None:
                    if p.returncode != 0:
                        raise RuntimeError(f"curl on {name} exited {p.returncode}")
                    seen[name] = time.monotonic()
            time.sleep(0.02)
        took = max(seen.values()) - t0  # clock stop: the last curl exited
        counts = counters.stop()
        ok = all(has_file(out, src.stat().st_size, digest) for out in outs)
    finally:
        for p in reversed(procs):
            lab.kill(p)
        lab.kill_all()
    return {"time_s": took, **counts, "ok": ok, "per_host_s": finish_times(seen, t0)}


def tracker_peers(lab: Any, topo: Topology) -> int:
    """Peers opentracker knows for the torrent (its /stats?mode=peer), -1 when it won't say."""
    out = lab.exec(
        topo.origin, ["curl", "-sf", f"http://{topo.origin.ip}:{TRACKER_PORT}/stats?mode=peer"], timeout=10
    )
    nums = re.findall(r"\d+", out.stdout)
    return int(nums[0]) if out.returncode == 0 and nums else -1


def run_torrent(lab: Any, topo: Topology, src: Path, digest: str) -> dict[str, Any]:
    origin, clients = topo.origin, topo.clients
    work = lab.host_dir(origin) / "bt"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    seed_dir = work / "seed"
    seed_dir.mkdir()
    shutil.copy(src, seed_dir / src.name)
    hook = work / "on-complete.sh"
    hook.write_text(HOOK)
    hook.chmod(0o755)
    torrent = work / "release.torrent"
    announce = f"http://{origin.ip}:{TRACKER_PORT}/announce"
    subprocess.run(
        ["mktorrent", "-a", announce, "-l", "18", "-o", str(torrent), str(seed_dir / src.name)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    common = [
        "aria2c",
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--file-allocation=none",
        "--summary-interval=0",
        "--console-log-level=warn",
        "--bt-max-peers=0",
        "--seed-ratio=0.0",  # seed on: finished clients keep serving, as in a real swarm
        "--bt-tracker-connect-timeout=5",
        "--bt-tracker-timeout=5",
        "--follow-torrent=mem",
        "--auto-save-interval=0",  # no control-file writes mid-run (they were the old, wrong signal)
    ]
    shown = subprocess.run(["aria2c", "-S", str(torrent)], capture_output=True, text=True, timeout=60)
    info_hash = next(line.split()[-1] for line in shown.stdout.splitlines() if "Info Hash" in line)
    (work / "whitelist").write_text(info_hash + "\n")
    procs = [
        lab.popen(
            origin,
            ["opentracker", "-i", origin.ip, "-p", str(TRACKER_PORT), "-P", str(TRACKER_PORT),
             "-d", str(work), "-w", "whitelist",  # Debian's opentracker serves only listed hashes
             "-A", origin.ip],  # stats (clients announced?) are for admin addresses only
            log=work / "tracker.log",
        )
    ]  # fmt: skip
    try:
        wait(
            "opentracker",
            lambda: lab.exec(origin, ["curl", "-s", "-o", "/dev/null", announce], timeout=5).returncode == 0,
        )
        outs: dict[str, Path] = {}
        for c in clients:
            d = lab.host_dir(c) / "bt"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            outs[c.name] = d / src.name
            procs.append(
                lab.popen(
                    c,
                    [*common, f"--on-bt-download-complete={hook}", f"--dir={d}", str(torrent)],
                    log=lab.host_dir(c) / "aria2.log",
                )
            )
        # Clients up first: each has announced (the tracker lists them all) before seeding starts.
        if tracker_peers(lab, topo) >= 0:
            wait("clients announced", lambda: tracker_peers(lab, topo) >= len(clients), timeout=60, every=0.2)
        else:
            time.sleep(3.0)  # a tracker without stats: aria2c announces within a second of start
        announced = tracker_peers(lab, topo)
        counters = Counters(topo)
        counters.start()
        cpu0 = cpu_s(procs)
        t0_wall, t0 = time.time(), time.monotonic()  # clock start: the seeder is launched
        procs.append(
            lab.popen(origin, [*common, "-V", f"--dir={seed_dir}", str(torrent)], log=work / "seeder.log")
        )
        marks = {name: p.with_name(p.name + ".done") for name, p in outs.items()}
        wait("torrent clients' completion hooks", lambda: all(m.exists() for m in marks.values()), every=0.05)
        counts = counters.stop()
        cpu = cpu_s(procs) - cpu0
        # Clock stop: the last hook's own timestamp (wall clock, taken when aria2c ran it).
        seen = hook_times({name: m.read_text() for name, m in marks.items()}, t0, t0_wall)
        took = max(seen.values()) - t0
        size = src.stat().st_size
        ok = all(has_file(p, size, digest) for p in outs.values())
    finally:
        for p in reversed(procs):
            lab.kill(p)
        lab.kill_all()
    return {
        "time_s": took,
        **counts,
        "ok": ok,
        "peers_announced_at_start": announced,
        "cpu_s": cpu,
        "per_host_s": finish_times(seen, t0),
    }


def run_meshd(
    lab: Any, lm: ModuleType, topo: Topology, src: Path, digest: str, pub_key: Path, profile: str
) -> dict[str, Any]:
    origin, clients = topo.origin, topo.clients
    hosts = [origin, *clients]
    seed = f"{origin.ip}:{lm.MESHD_PORT}"
    # The daemons' logs outlive the run's file system: the last meshd run's, for a slow run.
    logs = lab.workdir / "meshd-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    procs = []
    try:
        for h in hosts:
            procs.append(
                lab.start_meshd(
                    h,
                    cluster="bench-dist",
                    mdns=False,
                    fresh=True,
                    log=logs / f"{h.name}.log",
                    joins=[] if h is origin else [seed],
                    profile=profile,
                    extra=["--trust-publisher", f"{pub_key}.pub", "--log-level", "info"],
                )
            )
        # Daemons up and meshed first: every member lists every member alive.
        wait(
            "meshd mesh",
            lambda: all(
                sum(1 for s in (lab.member_states(h) or {}).values() if s == "alive") == len(hosts)
                for h in hosts
            ),
            every=0.5,
        )
        currents = {
            c.name: lab.host_dir(c) / "meshd" / "releases" / "rel" / "current" / src.name for c in clients
        }
        argv = [
            sys.executable, "-m", "meshd.cli.meshctl", "publish", str(src), "--name", "rel",
            "--version", "1", "--key", str(pub_key), "--json",
            "--token-file", str(lab.host_dir(origin) / "meshd" / "api-token"),
        ]  # fmt: skip
        # The mesh's own upkeep (gossip, probes) while nothing is distributed: CPU per second,
        # so that the run's CPU can be split into upkeep and distribution.
        idle0, idle_t0 = cpu_s(procs), time.monotonic()
        time.sleep(IDLE_WINDOW)
        idle_rate = (cpu_s(procs) - idle0) / (time.monotonic() - idle_t0)
        scraped0 = scrape(lab, lm, clients)
        counters = Counters(topo)
        counters.start()
        cpu0 = cpu_s(procs)
        t0 = time.monotonic()  # clock start: meshctl publish is launched at the origin
        pub = lab.popen(origin, argv, stdout=subprocess.PIPE)
        procs.append(pub)
        seen: dict[str, float] = {}
        published: float | None = None
        deadline = t0 + STEP_TIMEOUT
        while len(seen) < len(currents):
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"timed out: {len(seen)} of {len(currents)} clients have it")
            if published is None and pub.poll() is not None:
                published = now
                if pub.returncode != 0:
                    raise RuntimeError(f"meshctl publish exited {pub.returncode}")
            for name, path in currents.items():
                if name not in seen and path.exists():
                    seen[name] = now
            time.sleep(0.05)
        took = max(seen.values()) - t0  # clock stop: the last client's `current` switch
        counts = counters.stop()
        cpu = cpu_s(procs[: len(hosts)]) - cpu0
        if published is None:
            pub.wait(timeout=60)
            published = time.monotonic()
        assert pub.stdout is not None
        rid = json.loads(pub.stdout.read())["id"]
        for c in clients:
            doc = lab.api_get(c, "/v1/releases") or {}
            if not any(r["id"] == rid and r["state"] == "active" for r in doc.get("releases", [])):
                raise RuntimeError(f"{c.name}: release not active in /v1/releases")
        ok = all(has_file(p, src.stat().st_size, digest) for p in currents.values())
        scraped1 = scrape(lab, lm, clients)
    finally:
        for p in procs:
            lab.kill(p)
        lab.kill_all()
    return {
        "time_s": took,
        "publish_s": published - t0,
        "cpu_s": cpu,
        "idle_cpu_per_s": idle_rate,
        # per client host, from publish until its counters were read after the last switch
        "per_host": {
            k.removeprefix("meshd_"): round((scraped1[k] - scraped0[k]) / len(clients), 1) for k in SCRAPED
        },
        **counts,
        "ok": ok,
        "per_host_s": finish_times(seen, t0),
    }


# --- delta -----------------------------------------------------------------------------------


def delta_pair(src: Path, work: Path) -> tuple[Path, Path]:
    v1 = work / "v1" / "release.bin"
    v2 = work / "v2" / "release.bin"
    v1.parent.mkdir(parents=True, exist_ok=True)
    v2.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(src.read_bytes())
    shutil.copy(src, v1)
    rnd = random.Random(42)
    spot = len(data) // 200  # 0.5% each, 4 spots: 2%
    for i in range(4):
        at = (i * 2 + 1) * len(data) // 8
        data[at : at + spot] = rnd.randbytes(spot)
    v2.write_bytes(bytes(data))
    return v1, v2


def meshd_delta(v1: Path, v2: Path) -> dict[str, int]:
    from meshd.release.chunker import StoredChunk, chunk_tree
    from meshd.release.manifest import Manifest

    old = chunk_tree(v1)
    stored: dict[str, int] = {}

    def sink(c: StoredChunk) -> None:
        stored[c.id] = len(c.stored)

    new = chunk_tree(v2, sink)
    manifest = len(Manifest.build("rel", "2", new, created=0).to_bytes()) + 140  # + signature
    moved = sum(n for cid, n in stored.items() if cid not in old.chunk_sizes) + manifest
    return {
        "bytes": moved,
        "chunks": sum(1 for c in new.chunk_sizes if c not in old.chunk_sizes),
        "total_chunks": len(new.chunk_sizes),
    }


def casync_delta(v1: Path, v2: Path, work: Path) -> dict[str, int]:
    s1, s2 = work / "store1", work / "store2"
    for v, s, idx in ((v1, s1, work / "v1.caibx"), (v2, s2, work / "v2.caibx")):
        subprocess.run(
            ["casync", "make", f"--store={s}", str(idx), str(v)], check=True, capture_output=True, timeout=300
        )
    have = {p.name for p in s1.rglob("*.cacnk")}
    files = [p for p in s2.rglob("*.cacnk")]
    new = [p for p in files if p.name not in have]
    index = (work / "v2.caibx").stat().st_size
    return {
        "bytes": sum(p.stat().st_size for p in new) + index,
        "chunks": len(new),
        "total_chunks": len(files),
    }


# --- main ------------------------------------------------------------------------------------

LABELS = {
    "http": "central HTTP (http.server + curl)",
    "torrent": "BitTorrent (opentracker + aria2c, seeding on)",
    "meshd": "meshd (lan profile, publish at the origin)",
}
CLOCKS = {
    "http": "from launching the curl clients (server answering) to the last curl's exit",
    "torrent": "from launching the seeder (tracker up, every client running and announced) to the "
    "last client's --on-bt-download-complete hook",
    "meshd": "from launching `meshctl publish` at the origin (chunking and signing included; every "
    "daemon up, every member alive everywhere) to the last client's `current` switch",
}


def summarize_runs(runs: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """median/min/max of time, egress and thin-link bytes (as multiples of the release size)."""

    def pick(key: str, scale: float = 1.0) -> dict[str, Any]:
        if not any(key in r for r in runs):
            return summary([])  # not a measure of this system (central HTTP has no CPU figure)
        return summary([r[key] / scale if "error" not in r and key in r else None for r in runs])

    return {
        "time_s": pick("time_s"),
        "egress_x": pick("egress_bytes", size),
        "thin_link_x": pick("thin_link_bytes", size),
        "publish_s": pick("publish_s"),
        "cpu_s": pick("cpu_s"),
        "byte_exact": all(r.get("ok") for r in runs if "error" not in r),
        "errors": [r["error"] for r in runs if "error" in r],
    }


def main() -> int:
    # SIGTERM (timeout, kill) unwinds like Ctrl-C: every run's processes, mount and image go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", type=parse_config, action="append",
        help=f"SITESxHOSTS client hosts, repeatable (default {' '.join(DEFAULT_CONFIGS)})",
    )  # fmt: skip
    ap.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="repetitions per figure (default 5)")
    ap.add_argument("--size-mb", type=float, default=40.0, help="release size in MB (10^6 bytes; default 40)")
    ap.add_argument("--rate", default="100mbit", help="origin uplink limit (tc tbf rate)")
    ap.add_argument("--site-rate", default="20mbit", help="the thin link into each other site (tc tbf)")
    ap.add_argument("--profile", choices=("lan", "wan", "local"), default="lan", help="meshd's preset")
    ap.add_argument("--only", choices=(*SYSTEMS, "delta"), action="append")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the .md; raw runs go beside it as .json")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs: at least 1")
    configs: list[Config] = args.config or [parse_config(c) for c in DEFAULT_CONFIGS]
    only = set(args.only or (*SYSTEMS, "delta"))
    systems = [s for s in SYSTEMS if s in only]
    lm = load_lab()
    ok, why = lm.available()
    size = int(args.size_mb * 1_000_000)
    doc: dict[str, Any] = {
        "bench": "distribution",
        "env": environment(),
        "conditions": {
            "size_bytes": size,
            "origin_rate": args.rate,
            "site_rate": args.site_rate,
            "meshd_profile": args.profile,
            "runs": args.runs,
            "clocks": {s: CLOCKS[s] for s in systems},
            "storage": "host data on a fresh ext4 per run (loop device, direct I/O)",
        },
        "configs": [],
    }
    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    src = work / "src" / "release.bin"
    src.parent.mkdir(parents=True)
    src.write_bytes(random.Random(1).randbytes(size))  # incompressible: no help from lz4
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    try:
        if systems:
            if not ok:
                raise SystemExit(f"lab unavailable: {why}")
            for config in configs:
                doc["configs"].append(run_config(lm, config, systems, args, src, digest, size))
                write_all(doc, args.out, size)  # a long run keeps what it has measured so far
        if "delta" in only:
            v1, v2 = delta_pair(src, work / "delta")
            doc["delta"] = {"meshd": meshd_delta(v1, v2), "casync": casync_delta(v1, v2, work / "delta")}
            print(f"delta: {doc['delta']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_all(doc, args.out, size)
    print(f"wrote {args.out} and {json_path(args.out)}")
    return 0


# Host data on a file system of its own, made fresh for every run of every system. The VM's
# root file system charged file creation several times what a new ext4 does (thousands of
# files created and deleted there by earlier runs and sessions), and meshd's store created a
# file per chunk until issue 11, part 7 (packs: one file per piece), so the root file system's
# history weighed on one side only, and differently from run to run.
FS_SIZE = "16G"  # sparse: blocks are taken as written (a 64-host run writes about 6 GB)
FS_INODES = "262144"  # a 64-host run of the per-chunk store made about 45,000 files and folders


@contextlib.contextmanager
def fresh_fs(mountpoint: Path) -> Iterator[Path]:
    """A new ext4 (loop device, direct I/O: its writes reach the disk, not a second page cache)
    mounted at `mountpoint` for one run; unmounted and deleted after. Inode tables and journal
    are written by mkfs, not lazily by a kernel thread during the run."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    # One left mounted by a bench that was killed: the new one must not stack on it.
    while os.path.ismount(mountpoint):
        if subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True).returncode:
            break
    image = mountpoint.parent / f"{mountpoint.name}.img"
    stale = subprocess.run(["losetup", "-j", str(image)], check=False, capture_output=True, text=True).stdout
    for line in stale.splitlines():  # loop devices still on that image (ours only)
        subprocess.run(["losetup", "-d", line.split(":")[0]], check=False, capture_output=True)
    image.unlink(missing_ok=True)
    loop = ""
    try:
        subprocess.run(["truncate", "-s", FS_SIZE, str(image)], check=True, timeout=30)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-N", FS_INODES, "-E", "lazy_itable_init=0,lazy_journal_init=0",
             str(image)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        loop = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", str(image)],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        subprocess.run(["mount", loop, str(mountpoint)], check=True, capture_output=True, timeout=30)
        try:
            yield mountpoint
        finally:
            # -l: a process of the run that is still dying must not keep the image mounted.
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True, timeout=60)
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False, capture_output=True, timeout=30)
        image.unlink(missing_ok=True)


def run_config(
    lm: ModuleType, config: Config, systems: list[str], args: argparse.Namespace, src: Path, digest: str,
    size: int,
) -> dict[str, Any]:  # fmt: skip
    lab = lm.Lab(PREFIX)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    try:
        topo = lay_out(lab, config, args.rate, args.site_rate)
        from meshd.crypto import generate_publisher_keypair

        pub_key = lab.workdir / "publisher.key"
        if not pub_key.exists():
            generate_publisher_keypair(pub_key)
        fns = {
            "http": lambda: run_http(lab, topo, src, digest),
            "torrent": lambda: run_torrent(lab, topo, src, digest),
            "meshd": lambda: run_meshd(lab, lm, topo, src, digest, pub_key, args.profile),
        }
        for i in range(args.runs):
            order = systems[i % len(systems) :] + systems[: i % len(systems)]  # no system always first
            for name in order:
                print(f"{config.name} run {i + 1}/{args.runs} {name}: {size / 1e6:.0f} MB to "
                      f"{len(topo.clients)} hosts ...", flush=True)  # fmt: skip
                try:
                    with fresh_fs(lab.workdir / "fs") as lab.hosts_root:
                        r = fns[name]()
                except Exception as e:  # one failure must not hide the rest; it is counted
                    r = {"error": str(e)}
                finally:
                    lab.hosts_root = lab.workdir
                runs[name].append(r)
                shown = {k: v for k, v in r.items() if k != "per_host_s"}
                print(f"  {shown}", flush=True)
    finally:
        lab.down()
    return {
        "name": config.name,
        "sites": config.sites,
        "clients": config.clients,
        "clients_per_site": config.clients_per_site,
        "runs": runs,
        "summary": {s: summarize_runs(runs[s], size) for s in systems},
    }


def write_all(doc: dict[str, Any], out: Path, size: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(doc))
    write_json(json_path(out), doc)


def xfmt(x: float) -> str:
    return f"{x:.2f}x"


def render(doc: dict[str, Any]) -> str:
    """The Markdown result file, from the raw document alone (bench/report.py reuses it)."""
    c, env = doc["conditions"], doc["env"]
    lines = [
        "# Release distribution: meshd vs central HTTP vs BitTorrent",
        "",
        f"`{env['command']}` at commit {env.get('commit') or '?'}, "
        f"{env['date']} on {env['host']} ({env['cpus']} CPUs, load "
        f"{env['load_1m_at_start']} at start); every host is a network namespace of this one machine "
        "(CPU is shared). "
        f"Release {c['size_bytes'] / 1e6:.0f} MB of incompressible data; origin uplink {c['origin_rate']} "
        f"(tc tbf on its eth0); in multi-site configs each other site sits behind a {c['site_rate']} "
        f"link (tc tbf both ways). meshd profile `{c['meshd_profile']}`. Each cell: median (min-max) "
        f"over {c['runs']} run(s), n = runs that finished. "
        f"Storage: {c.get('storage', 'host data on the machine root file system')}.",
        "",
        "Clocks:",
        "",
        *[f"- {LABELS[s]}: {how}." for s, how in c["clocks"].items()],
        "",
    ]
    for cfg in doc["configs"]:
        where = (
            f"1 site: origin + {cfg['clients']} clients"
            if cfg["sites"] == 1
            else f"{cfg['sites']} sites x {cfg['clients_per_site']} clients, origin in site 1, "
            f"{c['site_rate']} between sites"
        )
        lines += [
            f"## {cfg['name']}: {where}",
            "",
            "| system | time until the last host has it | origin egress (x release) "
            + ("| bytes over the thin link (x release) " if cfg["sites"] > 1 else "")
            + "| CPU s, every host's processes | byte-exact |",
            "|---|---|---|" + ("---|" if cfg["sites"] > 1 else "") + "---|---|",
        ]
        for s, sm in cfg["summary"].items():
            t = cell(sm["time_s"])
            if s == "meshd" and sm["publish_s"]["median"] is not None:
                t += f"; publish call returned at {cell(sm['publish_s'])}"
            row = f"| {LABELS[s]} | {t} | {cell(sm['egress_x'], xfmt)} "
            if cfg["sites"] > 1:
                row += f"| {cell(sm['thin_link_x'], xfmt)} "
            cpu = sm.get("cpu_s")
            row += f"| {cell(cpu) if cpu else '-'} | {'yes' if sm['byte_exact'] else 'NO'} |"
            lines.append(row)
            for e in sorted(set(sm["errors"])):
                lines.append(f"|  | failed run: {e} | | {'| ' if cfg['sites'] > 1 else ''}| |")
        lines.append("")
    d = doc.get("delta")
    if d:
        m, cs = d["meshd"], d["casync"]
        lines += [
            "## Delta: a version with 2% changed (4 spots of 0.5%)",
            "",
            "| tool | bytes to move | new chunks / chunks | ratio to casync |",
            "|---|---|---|---|",
            f"| meshd (FastCDC, lz4, manifest incl.) | {m['bytes']} | {m['chunks']} / {m['total_chunks']} | "
            f"{m['bytes'] / cs['bytes']:.2f} |",
            f"| casync (defaults, index incl.) | {cs['bytes']} | {cs['chunks']} / {cs['total_chunks']} "
            "| 1.00 |",
            "",
            "Deterministic (same files every run): one measurement.",
            "",
        ]
    lines += [
        "Goals (issues 5 and 11): origin egress <= 1.1x the release; time no worse than the swarm's at "
        "every host count; delta <= 1.5x casync's.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
