#!/usr/bin/env python3
"""Container images to a site, in the lab: containerd pulling directly from the upstream registry,
through meshd's pull-through site cache, and from a meshd-published image release.

Topology (scripts/lab.py, prefix `mdg-`): one site of `--hosts` client hosts (default 8) plus the
upstream host, whose eth0 egress is limited by tc tbf (`--rate`, default 100mbit): the site's
uplink as the upstream sees it. The upstream host runs Debian's docker-registry (loaded once by
skopeo with an image this script writes: `--layers` gzipped layers of random, incompressible
data, `--size-mb` in all). Every client host runs its own containerd 1.6 (own root, state and
socket, CRI off, a fresh content store for every pull) and, for the meshd ways, its own meshd with
`--registry 127.0.0.1:5000` on the host's loopback and a hosts.toml that puts it first. Ways:

  alone    one client alone: `ctr image pull` straight from the upstream (the 1.5x goal's reference)
  direct   every client at once, straight from the upstream
  pull     every client at once through its own meshd (`--registry-upstream` = the upstream); the
           tag resolves at the upstream, every blob comes by digest through the site cache
  release  `meshctl publish-image` at the upstream host (a meshd there too, same site; the
           docker-registry is not running); every client pulls the tag through its meshd as soon
           as its mirror answers it (a curl HEAD every 0.2 s on the host, then ctr)

Clocks (the result file repeats them):
  alone, direct, pull  start: the ctr pulls are launched (containerd and, for pull, every meshd up
                       and every member alive everywhere); stop: the last `ctr image pull` exited 0.
  release              start: `meshctl publish-image` is launched at the upstream host (staging,
                       chunking and signing included; every daemon up, every member alive);
                       stop: the last client's `ctr image pull` exited 0.
Upstream egress: tx bytes of the upstream host's eth0 between start and stop, as a multiple of
the image (manifest + config + layers). CPU: user + system seconds of the lab's processes between
start and stop (containerd, meshd, docker-registry at the two instants from /proc; ctr, curl and
meshctl when reaped).

`--runs N` (default 5) rotates the order of the ways per run; figures are median (min-max).
Results: bench/results/registry.md and registry.json (`--out`). Needs root (ip netns, tc),
containerd, ctr, skopeo, docker-registry, curl. Every step has a deadline, every lab process is
killed after each way, and the lab is torn down at the end.
Usage: bench/bench_registry.py [--runs 5] [--size-mb 200] [--layers 5] [--hosts 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.benchstats import DEFAULT_RUNS, cell, environment, json_path, secs, summary, write_json  # noqa: E402
from bench.lab_module import load_lab  # noqa: E402
from tests.oci_images import OCI_MANIFEST, make_image, write_layout  # noqa: E402

PREFIX = "mdg-"
RESULTS = REPO / "bench" / "results" / "registry.md"
UPSTREAM_PORT = 5000
MIRROR = "http://127.0.0.1:5000"  # each client's meshd, on the client's own loopback
REPOSITORY = "bench/app"
TAG = "v1"
STEP_TIMEOUT = 420.0
WAYS = ("alone", "direct", "pull", "release")
TOOLS = ("containerd", "ctr", "skopeo", "docker-registry", "curl", "tc")
LABELS = {
    "alone": "one host alone, direct",
    "direct": "every host direct from the upstream",
    "pull": "meshd pull-through (site cache)",
    "release": "meshd-published image release",
}
CLOCKS = {
    "alone": "from launching the one `ctr image pull` to its exit 0",
    "direct": "from launching the ctr pulls (every containerd up) to the last one's exit 0",
    "pull": "from launching the ctr pulls (every containerd and meshd up, every member alive "
    "everywhere) to the last one's exit 0",
    "release": "from launching `meshctl publish-image` at the upstream host (staging, chunking and "
    "signing included; every daemon up, every member alive everywhere) to the last client's "
    "`ctr image pull` exit 0 (each client starts its pull as soon as its mirror answers the tag)",
}


# --- the image ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    layout: Path
    manifest_digest: str
    size: int  # manifest + config + layers, as stored


def write_image(root: Path, size: int, layers: int, seed: int = 1) -> Image:
    """An OCI layout of `layers` gzipped layer tars of one random file each (`size` bytes of blobs
    in all, about): incompressible data, so gzip stores it (level 1: cheap to write and to unpack).
    Gzipped, because skopeo would compress plain tars on the way into a registry (new digests)."""
    per_layer = max(1, size // layers - 3 * 1024)  # tar headers, end blocks, gzip framing
    image = make_image(seed, (per_layer,) * layers, TAG, compresslevel=1)
    write_layout(root, image)
    return Image(root, image.manifest_digest, sum(len(b) for b in image.blobs().values()))


# --- measuring ----------------------------------------------------------------------------------


def proc_cpu_s(procs: list[subprocess.Popen[Any]]) -> float:
    """CPU seconds (user + system, every thread) that running processes used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in procs:
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def reaped_cpu_s() -> float:
    """CPU seconds of every child this process has reaped (ctr, curl, meshctl, ip)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def deadline_wait(what: str, pred: Any, timeout: float = STEP_TIMEOUT, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Bench:
    """The lab laid out once; one method per way, each leaving no process behind."""

    def __init__(self, lm: ModuleType, args: argparse.Namespace, image: Image, pub_key: Path) -> None:
        self.lm = lm
        self.lab = lm.Lab(PREFIX)
        self.args = args
        self.image = image
        self.pub_key = pub_key
        self.lab.up(sites=1, hosts=args.hosts + 1)
        self.upstream_host = self.lab.hosts(1)[0]
        self.clients = self.lab.hosts(1)[1:]
        self.upstream = f"{self.upstream_host.ip}:{UPSTREAM_PORT}"
        self.lab._limit(self.upstream_host.ns, "eth0", args.rate)
        self.procs: list[subprocess.Popen[Any]] = []

    def tx(self) -> int:
        return int(self.lm.iface_bytes(self.upstream_host.ns, "eth0", "tx_bytes"))

    def load_upstream(self) -> None:
        """The docker-registry's storage gets the image once (it survives restarts)."""
        self.start_registry()
        push = self.lab.exec(
            self.upstream_host,
            ["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false",
             f"oci:{self.image.layout}:{TAG}", f"docker://{self.upstream}/{REPOSITORY}:{TAG}"],
            timeout=600,
        )  # fmt: skip
        self.stop_all()
        if push.returncode != 0:
            raise RuntimeError(f"skopeo copy: {push.stderr}")

    def start_registry(self) -> None:
        proc, _ = self.lab.start_docker_registry(self.upstream_host, UPSTREAM_PORT)
        self.procs.append(proc)

    def start_containerds(self, hosts: list[Any]) -> list[Any]:
        out = []
        for h in hosts:
            c = self.lab.start_containerd(h)
            self.procs.append(c.proc)
            out.append(c)
        return out

    def start_meshds(self, hosts: list[Any], upstream: bool) -> None:
        seed = f"{hosts[0].ip}:{self.lm.MESHD_PORT}"
        extra = ["--registry", "127.0.0.1:5000", "--trust-publisher", f"{self.pub_key}.pub"]
        if upstream:
            extra += ["--registry-upstream", f"http://{self.upstream}"]
        for h in hosts:
            self.procs.append(
                self.lab.start_meshd(
                    h, cluster="bench-registry", mdns=False, fresh=True, profile=self.args.profile,
                    joins=[] if h is hosts[0] else [seed], extra=extra,
                )
            )  # fmt: skip

        def meshed() -> bool:
            views = [self.lab.member_states(h) or {} for h in hosts]
            return all(sum(s == "alive" for s in v.values()) == len(hosts) for v in views)

        deadline_wait("every meshd member alive everywhere", meshed, timeout=90, every=0.5)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.lab.kill(p)
        self.procs = []
        self.lab.kill_all()

    def pull_argv(self, c: Any, mirror: bool) -> list[str]:
        hosts_dir = c.hosts_dir(self.upstream, MIRROR if mirror else None)
        ref = f"{self.upstream}/{REPOSITORY}:{TAG}"
        return c.ctr_argv("image", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native", ref)

    def has_image(self, c: Any) -> bool:
        out = subprocess.run(c.ctr_argv("image", "ls"), capture_output=True, text=True, timeout=60)
        return out.returncode == 0 and self.image.manifest_digest in out.stdout

    # --- the ways ---------------------------------------------------------------------------

    def run(self, way: str) -> dict[str, Any]:
        try:
            if way == "release":
                return self.run_release()
            return self.run_pulls(way)
        finally:
            self.stop_all()
            for h in [self.upstream_host, *self.clients]:  # a few GB per way otherwise
                shutil.rmtree(self.lab.host_dir(h) / "containerd", ignore_errors=True)
                shutil.rmtree(self.lab.host_dir(h) / "meshd", ignore_errors=True)

    def run_pulls(self, way: str) -> dict[str, Any]:
        hosts = self.clients[:1] if way == "alone" else self.clients
        self.start_registry()
        if way == "pull":
            self.start_meshds(hosts, upstream=True)
        containerds = self.start_containerds(hosts)
        tx0, cpu0, reaped0 = self.tx(), proc_cpu_s(self.procs), reaped_cpu_s()
        t0 = time.monotonic()  # clock start: the pulls are launched
        pulls = {
            c.host.name: self.lab.popen(
                c.host, self.pull_argv(c, mirror=way == "pull"), log=c.dir / "pull.log"
            )
            for c in containerds
        }
        seen = self.wait_pulls(pulls, t0, containerds)
        took = max(seen.values()) - t0  # clock stop: the last ctr pull exited 0
        return self.figures(took, seen, t0, tx0, cpu0, reaped0, containerds)

    def wait_pulls(
        self, pulls: dict[str, subprocess.Popen[Any]], t0: float, containerds: list[Any]
    ) -> dict[str, float]:
        seen: dict[str, float] = {}
        deadline = t0 + STEP_TIMEOUT
        while len(seen) < len(pulls):
            if time.monotonic() > deadline:
                for p in pulls.values():
                    self.lab.kill(p)
                raise RuntimeError(f"timed out: {len(seen)} of {len(pulls)} hosts have the image")
            for name, p in pulls.items():
                if name not in seen and p.poll() is not None:
                    if p.returncode != 0:
                        log = next(c.dir / "pull.log" for c in containerds if c.host.name == name)
                        raise RuntimeError(
                            f"ctr pull on {name} exited {p.returncode}: {log.read_text()[-300:]}"
                        )
                    seen[name] = time.monotonic()
            time.sleep(0.02)
        return seen

    def figures(
        self, took: float, seen: dict[str, float], t0: float, tx0: int, cpu0: float, reaped0: float,
        containerds: list[Any],
    ) -> dict[str, Any]:  # fmt: skip
        egress = self.tx() - tx0
        cpu = proc_cpu_s(self.procs) - cpu0 + reaped_cpu_s() - reaped0
        ok = all(self.has_image(c) for c in containerds)
        return {
            "time_s": took,
            "egress_bytes": egress,
            "cpu_s": round(cpu, 2),
            "ok": ok,
            "per_host_s": {h: round(t - t0, 3) for h, t in sorted(seen.items())},
        }

    def run_release(self) -> dict[str, Any]:
        hosts = [self.upstream_host, *self.clients]
        self.start_meshds(hosts, upstream=False)
        containerds = self.start_containerds(self.clients)
        token = self.lab.host_dir(self.upstream_host) / "meshd" / "api-token"
        publish = [
            self.lab.python, "-m", "meshd.cli.meshctl", "publish-image", str(self.image.layout),
            "--name", "bench-image", "--version", "1", "--repo", REPOSITORY, "--image-tag", TAG,
            "--key", str(self.pub_key), "--json", "--token-file", str(token),
            "--stage-dir", str(self.lab.host_dir(self.upstream_host)),
        ]  # fmt: skip
        tx0, cpu0, reaped0 = self.tx(), proc_cpu_s(self.procs), reaped_cpu_s()
        t0 = time.monotonic()  # clock start: meshctl publish-image is launched at the upstream host
        pub = self.lab.popen(
            self.upstream_host, publish, log=self.lab.host_dir(self.upstream_host) / "pub.log"
        )
        self.procs.append(pub)
        head = (
            f"until curl -sf -o /dev/null -I -H 'Accept: {OCI_MANIFEST}' "
            f"{MIRROR}/v2/{REPOSITORY}/manifests/{TAG}; do sleep 0.2; done; exec "
        )
        pulls = {
            c.host.name: self.lab.popen(
                c.host,
                ["sh", "-c", head + " ".join(self.pull_argv(c, mirror=True))],
                log=c.dir / "pull.log",
            )
            for c in containerds
        }
        seen = self.wait_pulls(pulls, t0, containerds)
        took = max(seen.values()) - t0  # clock stop: the last ctr pull exited 0
        if pub.wait(timeout=60) != 0:
            raise RuntimeError(f"meshctl publish-image exited {pub.returncode}")
        return self.figures(took, seen, t0, tx0, cpu0, reaped0, containerds)


# --- results ------------------------------------------------------------------------------------


def summarize_runs(runs: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """median/min/max of time, upstream egress (x image) and CPU over the runs of one way."""

    def pick(key: str, scale: float = 1.0) -> dict[str, Any]:
        return summary([r[key] / scale if "error" not in r and key in r else None for r in runs])

    return {
        "time_s": pick("time_s"),
        "egress_x": pick("egress_bytes", size),
        "cpu_s": pick("cpu_s"),
        "byte_exact": all(r.get("ok") for r in runs if "error" not in r),
        "errors": [r["error"] for r in runs if "error" in r],
    }


def xfmt(x: float) -> str:
    return f"{x:.2f}x"


def render(doc: dict[str, Any]) -> str:
    """The Markdown result file, from the raw document alone."""
    c, env = doc["conditions"], doc["env"]
    sm = doc.get("summary", {})
    lines = [
        "# Container images to a site: direct vs meshd pull-through vs a meshd image release",
        "",
        f"`{env['command']}` at commit {env.get('commit') or '?'}, "
        f"{env['date']} on {env['host']} ({env['cpus']} CPUs, load "
        f"{env['load_1m_at_start']} at start); every host is a network namespace of this one machine "
        f"(CPU is shared). {c['hosts']} client hosts in one site, each with its own containerd "
        f"{c.get('containerd', '1.6')} (`ctr image pull`, native snapshotter, fresh content store); "
        f"the upstream host's egress (its uplink) limited to {c['rate']} by tc tbf; Debian's "
        f"docker-registry there. Image: {c['image_bytes'] / 1e6:.0f} MB, {c['layers']} layers of "
        f"random data (gzip stores it as is). meshd profile `{c['meshd_profile']}`. Each cell: "
        f"median (min-max) over {c['runs']} run(s) (the order of the ways rotates per run), n = runs "
        "that finished.",
        "",
        "Clocks:",
        "",
        *[f"- {LABELS[w]}: {how}." for w, how in c["clocks"].items()],
        "",
        "Upstream egress: tx bytes of the upstream host's eth0 between the clock's start and stop, "
        "as a multiple of the image. CPU: user + system seconds of containerd, meshd and "
        "docker-registry (from /proc at start and stop) and of ctr, curl and meshctl (when reaped).",
        "",
        "| way | time until the last host has the image | upstream egress (x image) | CPU s | byte-exact |",
        "|---|---|---|---|---|",
    ]
    for w in WAYS:
        if w not in sm:
            continue
        s = sm[w]
        lines.append(
            f"| {LABELS[w]} | {cell(s['time_s'])} | {cell(s['egress_x'], xfmt)} | {cell(s['cpu_s'])} | "
            f"{'yes' if s['byte_exact'] else 'NO'} |"
        )
        for e in sorted(set(s["errors"])):
            lines.append(f"|  | failed run: {e} | | | |")
    alone = sm.get("alone", {}).get("time_s", {}).get("median")
    if alone:
        lines += ["", "Last host's time as a multiple of one host alone (medians): " + ", ".join(
            f"{LABELS[w]} {sm[w]['time_s']['median'] / alone:.2f}x"
            for w in ("direct", "pull", "release")
            if w in sm and sm[w]["time_s"]["median"] is not None
        ) + "."]  # fmt: skip
    alone_cpu = sm.get("alone", {}).get("cpu_s", {}).get("median")
    if alone and alone_cpu and env.get("cpus"):
        floor = alone_cpu * c["hosts"] / env["cpus"]
        note = (
            f"This machine's floor for {c['hosts']} pulls at once, whatever the transport: "
            f"{c['hosts']} x one pull's CPU ({secs(alone_cpu)}) over {env['cpus']} CPUs = "
            f"{secs(floor)} ({floor / alone:.2f}x one host alone): every host shares the same CPUs."
        )
        lines += ["", note]
    lines += [
        "",
        "Goal (issue 13): upstream egress close to 1x the image, the last host no later than 1.5x the "
        "time one host needs alone.",
        "",
    ]
    return "\n".join(lines)


def write_all(doc: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(doc))
    write_json(json_path(out), doc)


def containerd_version() -> str:
    try:
        out = subprocess.run(["containerd", "--version"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    parts = out.stdout.split()
    return parts[2] if len(parts) >= 3 else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="repetitions per way (default 5)")
    ap.add_argument("--size-mb", type=float, default=200.0, help="image size in MB (10^6 bytes; default 200)")
    ap.add_argument("--layers", type=int, default=5, help="layers in the image (default 5)")
    ap.add_argument("--hosts", type=int, default=8, help="client hosts in the site (default 8)")
    ap.add_argument("--rate", default="100mbit", help="the upstream host's uplink (tc tbf rate)")
    ap.add_argument("--profile", choices=("lan", "wan", "local"), default="lan", help="meshd's preset")
    ap.add_argument("--only", choices=WAYS, action="append", help="only these ways (repeatable)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the .md; raw runs go beside it as .json")
    args = ap.parse_args()
    if args.runs < 1 or args.layers < 1 or not 1 <= args.hosts <= 64:
        ap.error("--runs and --layers: at least 1; --hosts: 1..64")
    lm = load_lab()
    ok, why = lm.available()
    if not ok:
        raise SystemExit(f"lab unavailable: {why}")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)} (Debian packages: see .ci/run)")
    ways = [w for w in WAYS if w in set(args.only or WAYS)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` tears the lab down
    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    bench: Bench | None = None
    try:
        image = write_image(work / "layout", int(args.size_mb * 1_000_000), args.layers)
        from meshd.crypto import generate_publisher_keypair

        pub_key = work / "publisher.key"
        generate_publisher_keypair(pub_key)
        doc: dict[str, Any] = {
            "bench": "registry",
            "env": environment(),
            "conditions": {
                "hosts": args.hosts,
                "rate": args.rate,
                "image_bytes": image.size,
                "layers": args.layers,
                "meshd_profile": args.profile,
                "containerd": containerd_version(),
                "runs": args.runs,
                "clocks": {w: CLOCKS[w] for w in ways},
            },
            "runs": {w: [] for w in ways},
        }
        bench = Bench(lm, args, image, pub_key)
        bench.load_upstream()
        for i in range(args.runs):
            order = ways[i % len(ways) :] + ways[: i % len(ways)]  # no way always first
            for way in order:
                print(f"run {i + 1}/{args.runs} {way}: {image.size / 1e6:.0f} MB ...", flush=True)
                t = time.monotonic()
                try:
                    r = bench.run(way)
                except Exception as e:  # one failure must not hide the rest; it is counted
                    r = {"error": str(e)[:300]}
                doc["runs"][way].append(r)
                shown = {k: v for k, v in r.items() if k != "per_host_s"}
                print(f"  {shown} ({time.monotonic() - t:.0f} s with setup)", flush=True)
            doc["summary"] = {w: summarize_runs(doc["runs"][w], image.size) for w in ways}
            write_all(doc, args.out)  # a long run keeps what it has measured so far
    finally:
        if bench is not None:
            bench.lab.down()
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} and {json_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
