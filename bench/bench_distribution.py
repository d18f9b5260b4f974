#!/usr/bin/env python3
"""Release distribution, side by side in the lab: meshd vs a central HTTP server vs BitTorrent.

Topology (scripts/lab.py, prefix `mdb-`): one site, 1 origin host + N client hosts (default 8)
on a bridge; the origin's uplink (its eth0 egress) limited by tc tbf (default 100mbit).
The same incompressible release (default 32 MiB) goes to every client three ways:

  http     `python -m http.server` on the origin; every client downloads it with curl at once
  torrent  opentracker + an aria2c seeder on the origin (mktorrent); every client runs aria2c
  meshd    `meshd run` on every host; `meshctl publish` at the origin; clients fetch from peers

Reported: time until the last client has the release, and origin egress (tx bytes of the
origin's eth0, all traffic included) as a multiple of the release size. Then delta efficiency:
bytes a node must move for a version with 2% changed (4 spots of 0.5%), meshd (new chunks'
stored bytes + manifest) against casync (new .cacnk chunk files, default settings), on the
same pair of files. Writes bench/results/distribution.md.

Needs root (ip netns, tc), opentracker, mktorrent, aria2c, curl, casync. Bounded: a few minutes.
Usage: bench/bench_distribution.py [--hosts 8] [--size-mib 32] [--rate 100mbit]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PREFIX = "mdb-"
RESULTS = REPO / "bench" / "results" / "distribution.md"
TRACKER_PORT = 6969
HTTP_PORT = 8080
STEP_TIMEOUT = 180.0


@functools.cache
def load_lab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("meshd_lab", REPO / "scripts" / "lab.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["meshd_lab"] = module
    spec.loader.exec_module(module)
    return module


def tx_bytes(ns: str, dev: str = "eth0") -> int:
    return int(load_lab().iface_bytes(ns, dev, "tx_bytes"))


def wait(what: str, pred: Any, timeout: float = STEP_TIMEOUT, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every)


def has_file(path: Path, size: int, digest: str) -> bool:
    try:
        if path.stat().st_size != size:
            return False
    except OSError:
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == digest


# --- the three systems -----------------------------------------------------------------------


def run_http(lab: Any, origin: Any, clients: list[Any], src: Path, digest: str) -> dict[str, Any]:
    server = lab.popen(
        origin,
        [
            sys.executable,
            "-m",
            "http.server",
            str(HTTP_PORT),
            "--bind",
            origin.ip,
            "--directory",
            str(src.parent),
        ],
        log=lab.host_dir(origin) / "http.log",
    )
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
        before = tx_bytes(origin.ns)
        t0 = time.monotonic()
        procs = []
        for c in clients:
            out = lab.host_dir(c) / "http" / src.name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.unlink(missing_ok=True)
            procs.append(
                lab.popen(c, ["curl", "-sf", "-o", str(out), f"http://{origin.ip}:{HTTP_PORT}/{src.name}"])
            )
        for p in procs:
            p.wait(timeout=STEP_TIMEOUT)
        took = time.monotonic() - t0
        egress = tx_bytes(origin.ns) - before
        ok = all(has_file(lab.host_dir(c) / "http" / src.name, src.stat().st_size, digest) for c in clients)
    finally:
        lab.kill(server)
    return {"time_s": took, "egress": egress, "ok": ok}


def run_torrent(lab: Any, origin: Any, clients: list[Any], src: Path, digest: str) -> dict[str, Any]:
    work = lab.host_dir(origin) / "bt"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    seed_dir = work / "seed"
    seed_dir.mkdir()
    shutil.copy(src, seed_dir / src.name)
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
        "--seed-ratio=0.0",
        "--bt-tracker-connect-timeout=5",
        "--bt-tracker-timeout=5",
        "--follow-torrent=mem",
    ]
    shown = subprocess.run(["aria2c", "-S", str(torrent)], capture_output=True, text=True, timeout=60)
    info_hash = next(line.split()[-1] for line in shown.stdout.splitlines() if "Info Hash" in line)
    (work / "whitelist").write_text(info_hash + "\n")
    procs = [
        lab.popen(
            origin,
            [
                "opentracker",
                "-i",
                origin.ip,
                "-p",
                str(TRACKER_PORT),
                "-P",
                str(TRACKER_PORT),
                "-d",
                str(work),
                "-w",
                "whitelist",  # Debian's opentracker serves only listed info hashes
            ],
            log=work / "tracker.log",
        )
    ]
    try:
        time.sleep(0.5)
        procs.append(
            lab.popen(origin, [*common, "-V", f"--dir={seed_dir}", str(torrent)], log=work / "seeder.log")
        )
        time.sleep(2.0)  # the seeder has checked the file and announced
        before = tx_bytes(origin.ns)
        t0 = time.monotonic()
        outs = []
        for c in clients:
            d = lab.host_dir(c) / "bt"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            outs.append(d / src.name)
            procs.append(
                lab.popen(c, [*common, f"--dir={d}", str(torrent)], log=lab.host_dir(c) / "aria2.log")
            )
        size = src.stat().st_size

        def done(p: Path) -> bool:
            return not p.with_name(p.name + ".aria2").exists() and p.exists() and p.stat().st_size == size

        wait("torrent clients", lambda: all(done(p) for p in outs), every=0.1)
        took = time.monotonic() - t0
        egress = tx_bytes(origin.ns) - before
        ok = all(has_file(p, size, digest) for p in outs)
    finally:
        for p in reversed(procs):
            lab.kill(p)
    return {"time_s": took, "egress": egress, "ok": ok}


def run_meshd(
    lab: Any, lm: ModuleType, origin: Any, clients: list[Any], src: Path, digest: str, pub_key: Path
) -> dict[str, Any]:
    hosts = [origin, *clients]
    seed = f"{origin.ip}:{lm.MESHD_PORT}"
    procs = []
    try:
        for h in hosts:
            procs.append(
                lab.start_meshd(
                    h,
                    cluster="bench-dist",
                    mdns=False,
                    fresh=True,
                    joins=[] if h is origin else [seed],
                    extra=["--trust-publisher", f"{pub_key}.pub", "--log-level", "info"],
                )
            )
        wait(
            "meshd mesh",
            lambda: all(
                sum(1 for s in (lab.member_states(h) or {}).values() if s == "alive") == len(hosts)
                for h in hosts
            ),
            every=0.5,
        )
        before = tx_bytes(origin.ns)
        t_pub = time.monotonic()
        out = lab.exec(
            origin,
            [
                sys.executable,
                "-m",
                "meshd.cli.meshctl",
                "publish",
                str(src),
                "--name",
                "rel",
                "--version",
                "1",
                "--key",
                str(pub_key),
                "--json",
                "--token-file",
                str(lab.host_dir(origin) / "meshd" / "api-token"),
            ],
            timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"meshctl publish: {out.stderr}")
        rid = json.loads(out.stdout)["id"]
        t0 = time.monotonic()

        def all_active() -> bool:
            paths = [lab.host_dir(c) / "meshd" / "releases" / "rel" / "current" / src.name for c in clients]
            if not all(p.exists() for p in paths):
                return False
            for c in clients:
                doc = lab.api_get(c, "/v1/releases") or {}
                if not any(r["id"] == rid and r["state"] == "active" for r in doc.get("releases", [])):
                    return False
            return True

        wait("meshd clients", all_active, every=0.25)
        took = time.monotonic() - t0
        egress = tx_bytes(origin.ns) - before
        ok = all(
            has_file(
                lab.host_dir(c) / "meshd" / "releases" / "rel" / "current" / src.name,
                src.stat().st_size,
                digest,
            )
            for c in clients
        )
    finally:
        for p in procs:
            lab.kill(p)
    return {"time_s": took, "publish_s": t0 - t_pub, "egress": egress, "ok": ok}


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=8, help="client hosts (default 8)")
    ap.add_argument("--size-mib", type=int, default=32, help="release size in MiB (default 32)")
    ap.add_argument("--rate", default="100mbit", help="origin uplink limit (tc tbf rate)")
    ap.add_argument("--only", choices=("http", "torrent", "meshd", "delta"), action="append")
    args = ap.parse_args()
    only = set(args.only or ("http", "torrent", "meshd", "delta"))
    lm = load_lab()
    ok, why = lm.available()
    results: dict[str, Any] = {}
    size = args.size_mib * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    src = work / "src" / "release.bin"
    src.parent.mkdir(parents=True)
    src.write_bytes(random.Random(1).randbytes(size))  # incompressible: no help from lz4
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    try:
        if only - {"delta"}:
            if not ok:
                raise SystemExit(f"lab unavailable: {why}")
            lab = lm.Lab(PREFIX)
            lab.up(sites=1, hosts=args.hosts + 1)
            try:
                hosts = lab.hosts()
                origin, clients = hosts[0], hosts[1:]
                lab._limit(origin.ns, "eth0", args.rate)
                from meshd.crypto import generate_publisher_keypair

                pub_key = lab.workdir / "publisher.key"
                if not pub_key.exists():
                    generate_publisher_keypair(pub_key)
                for name, fn in (
                    ("http", lambda: run_http(lab, origin, clients, src, digest)),
                    ("torrent", lambda: run_torrent(lab, origin, clients, src, digest)),
                    ("meshd", lambda: run_meshd(lab, lm, origin, clients, src, digest, pub_key)),
                ):
                    if name not in only:
                        continue
                    print(f"{name}: distributing {args.size_mib} MiB to {len(clients)} hosts ...", flush=True)
                    try:
                        results[name] = fn()
                    except Exception as e:  # report what ran; one failure must not hide the rest
                        results[name] = {"error": str(e)}
                    print(f"  {results[name]}", flush=True)
            finally:
                lab.down()
        if "delta" in only:
            v1, v2 = delta_pair(src, work / "delta")
            results["delta"] = {"meshd": meshd_delta(v1, v2), "casync": casync_delta(v1, v2, work / "delta")}
            print(f"delta: {results['delta']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(results, args, size)
    print(f"wrote {RESULTS}")
    return 0


def write_report(results: dict[str, Any], args: argparse.Namespace, size: int) -> None:
    lines = [
        "# Release distribution: meshd vs central HTTP vs BitTorrent",
        "",
        f"Lab (scripts/lab.py): one site, 1 origin + {args.hosts} client hosts on a bridge, origin "
        f"uplink limited to {args.rate} (tc tbf); release {args.size_mib} MiB of incompressible data. "
        f"Run {time.strftime('%Y-%m-%d %H:%M')} by bench/bench_distribution.py on one 2-core machine "
        "(every host is a namespace of it: CPU is shared).",
        "",
        "| system | time until the last host has it | origin egress (x release) | byte-exact |",
        "|---|---|---|---|",
    ]
    labels = {
        "http": "central HTTP (http.server + curl)",
        "torrent": "BitTorrent (opentracker + aria2c)",
        "meshd": "meshd (publish at the origin)",
    }
    for key in ("http", "torrent", "meshd"):
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {labels[key]} | failed: {r['error']} | | |")
            continue
        extra = f" (+{r['publish_s']:.1f} s chunking at publish)" if "publish_s" in r else ""
        lines.append(
            f"| {labels[key]} | {r['time_s']:.1f} s{extra} | {r['egress'] / size:.2f} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    d = results.get("delta")
    if d:
        m, c = d["meshd"], d["casync"]
        lines += [
            "",
            "## Delta: a version with 2% changed (4 spots of 0.5%)",
            "",
            "| tool | bytes to move | new chunks / chunks | ratio to casync |",
            "|---|---|---|---|",
            f"| meshd (FastCDC, lz4, manifest incl.) | {m['bytes']} | {m['chunks']} / {m['total_chunks']} | "
            f"{m['bytes'] / c['bytes']:.2f} |",
            f"| casync (defaults, index incl.) | {c['bytes']} | {c['chunks']} / {c['total_chunks']} | 1.00 |",
        ]
    lines += [
        "",
        "Goals (issue 5): origin egress <= 1.5x the release; time no worse than the swarm; "
        "delta <= 1.5x casync's.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
