"""`make run`: a three-node meshd mesh on loopback, for trying meshctl, the API and the dashboard.

Nodes bind 127.0.0.1:7788/7790/7792 (APIs on the next port up; the first one's on
127.0.0.1:7789, meshctl's default). State lives in .demo/ (a generated cluster key, one data
dir per node, logs). The nodes find each other by mDNS confined to 127.0.0.1 (no --join), so
nothing leaves loopback. Ctrl-C makes every node leave
the mesh gracefully, then stops them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
BIN = Path(sys.executable).parent
NODES = [
    # name, gossip port, api port, site, tags
    ("gw-factory-1", 7788, 7789, "factory", ["role=gateway", "release=4.2"]),
    ("gw-factory-2", 7790, 7791, "factory", ["role=gateway", "release=4.1"]),
    ("gw-shop-1", 7792, 7793, "shop", ["role=gateway", "release=4.2"]),
]
READY_TIMEOUT = 20.0
REGISTRY_PORT = {name: api + 1000 for name, _, api, _, _ in NODES}  # each node's OCI registry mirror


def busy_ports() -> list[int]:
    """Demo ports something already listens on (another demo still running, say)."""
    busy = []
    for name, port, api, _, _ in NODES:
        for p in (port, api, REGISTRY_PORT[name]):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", p)) == 0:
                    busy.append(p)
    return busy


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM/SIGHUP stop the demo as Ctrl-C does: nodes leave


def meshd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshd.cli.meshd", *args]


def wait_api(api_port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the node's API answers (not /readyz: a node restarting from its peer snapshot is
    not ready until one of those peers is back, and they start after it)."""
    deadline = time.monotonic() + READY_TIMEOUT
    url = f"http://127.0.0.1:{api_port}/healthz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise SystemExit("a node failed to start:\n  " + "\n  ".join(tail))
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"node with API port {api_port} did not start in {READY_TIMEOUT:.0f}s; see {log}")


def wait_converged(api_port: int, names: set[str]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    url = f"http://127.0.0.1:{api_port}/v1/members?state=alive"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                doc = json.loads(resp.read())
            if {m["name"] for m in doc["members"]} >= names:
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    return False


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # one signal: graceful leave
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> int:
    busy = busy_ports()
    if busy:
        raise SystemExit(
            f"port(s) {', '.join(map(str, busy))} on 127.0.0.1 already in use: is "
            "another demo still running? (stop it, or `pkill -f 'meshd run'`)"
        )
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    DEMO.mkdir(exist_ok=True)
    key = DEMO / "cluster.key"
    if not key.exists():
        subprocess.run(meshd("keygen", "cluster", "--out", str(key)), check=True, stdout=subprocess.DEVNULL)
    publisher = DEMO / "publisher.key"  # every node trusts it: try `meshctl publish`
    if not publisher.exists():
        subprocess.run(
            meshd("keygen", "publisher", "--out", str(publisher)), check=True, stdout=subprocess.DEVNULL
        )
    procs: list[subprocess.Popen[bytes]] = []
    # The nodes run in their own sessions: Ctrl-C reaches only this script, which then sends
    # each node exactly one SIGTERM (a second signal would make a node skip its leave).
    try:
        for name, port, api, site, tags in NODES:
            args = [
                "run",
                "--name",
                name,
                "--bind",
                f"127.0.0.1:{port}",
                "--api",
                f"127.0.0.1:{api}",
                "--data-dir",
                str(DEMO / name),
                "--cluster",
                "demo",
                "--cluster-key-file",
                str(key),
                "--site",
                site,
                # The nodes find each other by mDNS, confined to loopback: no --join, and
                # nothing leaves this machine.
                "--profile",
                "local",
                "--mdns-interface",
                "127.0.0.1",
                "--trust-publisher",
                f"{publisher}.pub",
                "--registry",
                f"127.0.0.1:{REGISTRY_PORT[name]}",
            ]
            for t in tags:
                args += ["--tag", t]
            log = DEMO / f"{name}.log"
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    meshd(*args), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
                )
            procs.append(proc)
            wait_api(api, proc, log)
        if not wait_converged(NODES[0][2], {n[0] for n in NODES}):
            print("warning: the nodes have not all joined yet; see .demo/*.log", flush=True)
        meshctl = os.path.relpath(BIN / "meshctl", Path.cwd())
        token = os.path.relpath(DEMO / NODES[0][0] / "api-token", Path.cwd())
        print(f"""
meshd demo: {len(NODES)} nodes on loopback (cluster "demo", logs in {os.path.relpath(DEMO)}/)

  {"node":<14} {"gossip":<16} {"operator API"}""")
        for name, port, api, site, _ in NODES:
            mirror = f"127.0.0.1:{REGISTRY_PORT[name]}"
            print(f"  {name:<14} 127.0.0.1:{port:<6} http://127.0.0.1:{api}   site={site}  registry {mirror}")
        print(
            f"""
Try, in another terminal:
  {meshctl} members                     # the mesh as node 1 sees it
  {meshctl} members --site shop --json
  {meshctl} members --tag release=4.2
  {meshctl} status
  {meshctl} monitor                     # live member events
  {meshctl} --api http://127.0.0.1:7793 members
  kill -9 <pid of a node>   then watch it go suspect -> dead in `meshctl members`
  {meshctl} --token-file {token} join 127.0.0.1:7792   # changes need the token
  {meshctl} health                      # every node's checks, by gossip query
  {meshctl} --token-file {token} publish README.md --name docs --version 1 \\
      --key {os.path.relpath(publisher, Path.cwd())}        # then: {meshctl} releases
  {meshctl} --token-file {token} publish-image <OCI layout dir or docker save tar> \
      --name app-image --version 1 --repo demo/app --key {os.path.relpath(publisher, Path.cwd())}
  {meshctl} images                      # then pull through any node's mirror, e.g.
  skopeo inspect --tls-verify=false docker://127.0.0.1:{REGISTRY_PORT[NODES[2][0]]}/demo/app:1

Open: http://127.0.0.1:7789/  (dashboard)   http://127.0.0.1:7789/v1/members
      http://127.0.0.1:7789/metrics           http://127.0.0.1:7789/v1/status

Node pids: {" ".join(str(p.pid) for p in procs)}.  Ctrl-C stops the mesh (graceful leave).""",
            flush=True,
        )
        reported: set[int] = set()
        while True:
            for i, p in enumerate(procs):
                if p.poll() is not None and i not in reported:
                    print(f"note: {NODES[i][0]} exited with code {p.returncode}", flush=True)
                    reported.add(i)
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping: every node leaves the mesh ...", flush=True)
        return 0
    finally:
        stop_all(procs)
        if procs:
            print("demo stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
