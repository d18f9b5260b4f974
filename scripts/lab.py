#!/usr/bin/env python3
"""A multi-site lab on one machine: network namespaces as hosts, a bridge per site, one router.

    lab.py up --sites 2 --hosts 3 [--site-rate 10mbit]
    lab.py status | down | exec HOST CMD... | cut SITE | restore SITE | sniff [NS] --seconds N

Topology (site n = 1..N, host i = 1..H; every name starts with the prefix, default `mdl-`):

    mdl-s<n>h<i>  eth0 198.18.n.(10+i)/24, default via 198.18.n.1, mDNS (224.0.0.251) on eth0
    mdl-s<n>sw    bridge br0 with ports h<i> (to the hosts) and `uplink` (to the router)
    mdl-router    s<n> 198.18.n.1/24, ip_forward=1

Nothing is created in the root namespace: every veth is born inside the lab namespaces, so
deleting the namespaces removes everything. Addresses are in 198.18.0.0/15 (benchmarking range)
only, IPv6 is disabled (no DAD delays before mDNS starts), and link-local multicast (mDNS) stays
inside a site because a router never forwards link-local multicast. `down` kills every process in the
lab namespaces and deletes them; it works without the state file and after any failure.

Needs root and iproute2 (tc for --site-rate). Importable: `Lab` is the Python API used by
tests/lab and bench/ (load this file by path).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

DEFAULT_PREFIX = "mdl-"
REPO = Path(__file__).resolve().parents[1]
MDNS_PORT = 5353
MDNS_GROUP = "224.0.0.251"
MESHD_PORT = 7788
API_PORT = 7789


def _run(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


class LabError(RuntimeError):
    """A lab command failed."""


@dataclass(frozen=True)
class Host:
    """One lab host: a network namespace with one interface on its site's bridge."""

    name: str  # e.g. s1h2
    site: int
    index: int
    ns: str
    ip: str
    ifname: str = "eth0"

    @property
    def site_name(self) -> str:
        return f"s{self.site}"


def available() -> tuple[bool, str]:
    """Whether a lab can be built here, and why not."""
    if sys.platform != "linux":
        return False, "the lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return False, "the lab needs root (ip netns)"
    if shutil.which("ip") is None:
        return False, "iproute2 (`ip`) is not installed"
    probe = f"mdl-probe-{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
    except (LabError, OSError) as exc:
        return False, f"cannot create a network namespace: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return True, ""


def lab_mac(ip: str) -> str:
    """A lab interface's MAC, from its IPv4 address (locally administered, unicast)."""
    return "02:00:" + ":".join(f"{int(b):02x}" for b in ip.split("."))


def _neigh_batch(ns: str, pins: Sequence[tuple[str, str]]) -> None:
    """Permanent neighbour entries (ip, device) in a namespace, in one `ip -batch`."""
    lines = "".join(f"neigh replace {ip} lladdr {lab_mac(ip)} dev {dev} nud permanent\n" for ip, dev in pins)
    proc = subprocess.run(["ip", "-n", ns, "-batch", "-"], input=lines, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"ip -n {ns} -batch (neighbours): {proc.stderr.strip()}")


class Lab:
    """Build, drive and tear down the lab. Every method is synchronous and needs root."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, workdir: Path | None = None) -> None:
        if not prefix or not prefix.replace("-", "").isalnum() or len(prefix) > 8:
            raise LabError(f"bad prefix {prefix!r}")
        self.prefix = prefix
        self.workdir = workdir or Path("/tmp") / f"meshd-lab-{prefix.strip('-')}"
        self.state_file = self.workdir / "state.json"
        # Where host dirs live: the workdir, or a file system of their own that a benchmark
        # mounts (bench/bench_distribution.py: a fresh one per run).
        self.hosts_root = self.workdir
        self.sites = 0
        self.hosts_per_site = 0
        self.site_rate: str | None = None
        self.ipv6 = False
        self.cut_sites: set[int] = set()
        self.python = sys.executable  # lab processes import meshd from REPO with this interpreter
        self._load()

    # ---- names and addresses ---------------------------------------------------------------

    @property
    def router_ns(self) -> str:
        return f"{self.prefix}router"

    def switch_ns(self, site: int) -> str:
        return f"{self.prefix}s{site}sw"

    def hosts(self, site: int | None = None) -> list[Host]:
        sites = [site] if site is not None else range(1, self.sites + 1)
        return [self._host(s, i) for s in sites for i in range(1, self.hosts_per_site + 1)]

    def host(self, name: str) -> Host:
        for h in self.hosts():
            if name in (h.name, h.ns):
                return h
        raise LabError(f"no host {name!r} in the lab (hosts: {[h.name for h in self.hosts()]})")

    def _host(self, site: int, index: int) -> Host:
        name = f"s{site}h{index}"
        return Host(name, site, index, f"{self.prefix}{name}", f"198.18.{site}.{10 + index}")

    @staticmethod
    def router_ip(site: int) -> str:
        return f"198.18.{site}.1"

    def resolve_ns(self, name: str) -> str:
        """Namespace for a host name, `router`, `s<n>sw`, or a full namespace name."""
        if name.startswith(self.prefix):
            return name
        if name == "router" or re.fullmatch(r"s\d+sw", name):
            return f"{self.prefix}{name}"
        return self.host(name).ns

    def namespaces(self) -> list[str]:
        """Lab namespaces that exist now (by prefix, not by state: cleanup must not trust it)."""
        out = _run(["ip", "netns", "list"], check=False)
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(self.prefix)]

    # ---- state -----------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return
        self.sites = int(state.get("sites", 0))
        self.hosts_per_site = int(state.get("hosts", 0))
        self.site_rate = state.get("site_rate")
        self.ipv6 = bool(state.get("ipv6", False))
        self.cut_sites = set(state.get("cut", []))

    def _save(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = {
            "prefix": self.prefix,
            "sites": self.sites,
            "hosts": self.hosts_per_site,
            "site_rate": self.site_rate,
            "ipv6": self.ipv6,
            "cut": sorted(self.cut_sites),
            "hosts_detail": [asdict(h) for h in self.hosts()],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    # ---- build / tear down -----------------------------------------------------------------

    def up(self, sites: int = 2, hosts: int = 3, site_rate: str | None = None, ipv6: bool = False) -> None:
        """Build the lab (after tearing down any previous one with this prefix).

        ipv6=True keeps link-local IPv6 (DAD off, so addresses are usable at once, never routed):
        serf's mDNS client gives up without it.
        """
        if not 1 <= sites <= 250 or not 1 <= hosts <= 200:
            raise LabError("sites must be 1..250 and hosts 1..200")
        self.down()
        self.sites, self.hosts_per_site, self.site_rate = sites, hosts, site_rate
        self.ipv6 = ipv6
        self.cut_sites = set()
        self._save()  # first, so a failure half-way is still cleaned up by `down`
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        router = self.router_ns
        self._add_ns(router)
        self._sysctl(router, "net.ipv4.ip_forward", "1")
        for site in range(1, self.sites + 1):
            sw = self.switch_ns(site)
            self._add_ns(sw)
            ip_sw = ["ip", "-n", sw]
            _run([*ip_sw, "link", "add", "br0", "type", "bridge", "stp_state", "0",
                  "forward_delay", "0", "mcast_snooping", "0"])  # fmt: skip
            # Uplink: created inside the router namespace, its peer inside the switch.
            _run(["ip", "-n", router, "link", "add", f"s{site}", "address", lab_mac(self.router_ip(site)),
                  "type", "veth", "peer", "name", "uplink", "netns", sw])  # fmt: skip
            _run([*ip_sw, "link", "set", "dev", "uplink", "master", "br0", "up"])
            _run([*ip_sw, "link", "set", "br0", "up"])
            _run(["ip", "-n", router, "addr", "add", f"{self.router_ip(site)}/24", "dev", f"s{site}"])
            _run(["ip", "-n", router, "link", "set", f"s{site}", "up"])
            if self.site_rate:
                self._limit(router, f"s{site}", self.site_rate)
                self._limit(sw, "uplink", self.site_rate)
            for h in self.hosts(site):
                self._add_ns(h.ns)
                _run(["ip", "-n", h.ns, "link", "add", h.ifname, "address", lab_mac(h.ip), "type", "veth",
                      "peer", "name", f"h{h.index}", "netns", sw])  # fmt: skip
                _run([*ip_sw, "link", "set", f"h{h.index}", "master", "br0", "up"])
                self._sysctl(h.ns, f"net.ipv6.conf.{h.ifname}.disable_ipv6", "0" if self.ipv6 else "1")
                self._sysctl(h.ns, f"net.ipv6.conf.{h.ifname}.accept_dad", "0")
                _run(["ip", "-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", h.ifname])
                _run(["ip", "-n", h.ns, "link", "set", h.ifname, "up", "multicast", "on"])
                _run(["ip", "-n", h.ns, "route", "add", "default", "via", self.router_ip(site)])
                # mDNS leaves through the lab interface (explicit, not via the default route).
                _run(["ip", "-n", h.ns, "route", "add", "224.0.0.251/32", "dev", h.ifname])
        self._pin_neighbours()
        self._save()

    def _pin_neighbours(self) -> None:
        """Every lab address a namespace talks to, resolved once for good (permanent entries).

        The kernel's ARP table is one for all namespaces, capped by the root namespace's
        gc_thresh3 (1024 by default); permanent entries are not counted. 33 hosts that each talk
        to 32 others need 1,056 learned entries: past the cap, a new neighbour fails to be made
        and the packet is dropped (NEIGH_CREATEFAIL), so one connection in forty waited for SYN
        retries for seconds. Real gateways each have their own table; pinned entries give the
        lab that, without touching the machine's settings."""
        for site in range(1, self.sites + 1):
            hosts = self.hosts(site)
            router = self.router_ip(site)
            for h in hosts:
                pins = [(o.ip, h.ifname) for o in hosts if o is not h] + [(router, h.ifname)]
                _neigh_batch(h.ns, pins)
            _neigh_batch(self.router_ns, [(h.ip, f"s{site}") for h in hosts])

    def neighbours(self, host: Host | str) -> dict[str, str]:
        """ip -> neighbour state (PERMANENT, REACHABLE, ...) as a host's kernel has them."""
        h = host if isinstance(host, Host) else self.host(host)
        out = _run(["ip", "-n", h.ns, "-j", "neigh", "show", "dev", h.ifname])
        return {e["dst"]: ",".join(e.get("state", [])) for e in json.loads(out or "[]")}

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        # Default: no IPv6 at all, so no DAD delay before mDNS starts. With ipv6: no DAD either.
        off = "0" if self.ipv6 else "1"
        for scope in ("all", "default"):
            self._sysctl(ns, f"net.ipv6.conf.{scope}.disable_ipv6", off)
            self._sysctl(ns, f"net.ipv6.conf.{scope}.accept_dad", "0")
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    @staticmethod
    def _sysctl(ns: str, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"])

    @staticmethod
    def _limit(ns: str, dev: str, rate: str) -> None:
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
              "tbf", "rate", rate, "burst", "32kb", "latency", "100ms"])  # fmt: skip

    def down(self) -> None:
        """Kill every process in the lab namespaces and delete them. Idempotent."""
        self.kill_all()
        for ns in self.namespaces():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        left = self.namespaces()
        if left:
            raise LabError(f"could not delete namespaces: {left}")
        self.sites = self.hosts_per_site = 0
        self.cut_sites = set()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    def kill_all(self) -> None:
        """Kill every process in the lab namespaces (the lab itself stays up)."""
        namespaces = self.namespaces()
        for ns in namespaces:
            self._kill_ns(ns, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(self._ns_pids(ns) for ns in namespaces):
            time.sleep(0.05)
        for ns in namespaces:
            self._kill_ns(ns, signal.SIGKILL)

    @staticmethod
    def _ns_pids(ns: str) -> list[int]:
        out = _run(["ip", "netns", "pids", ns], check=False)
        return [int(p) for p in out.split() if p.isdigit()]

    def _kill_ns(self, ns: str, sig: signal.Signals) -> None:
        for pid in self._ns_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    # ---- links -----------------------------------------------------------------------------

    def _site(self, site: int | str) -> int:
        n = int(str(site).removeprefix("s"))
        if not 1 <= n <= self.sites:
            raise LabError(f"no site {site!r} (sites 1..{self.sites})")
        return n

    def cut(self, site: int | str) -> None:
        """Cut a site off the router (its hosts still see each other)."""
        n = self._site(site)
        _run(["ip", "-n", self.router_ns, "link", "set", f"s{n}", "down"])
        self.cut_sites.add(n)
        self._save()

    def restore(self, site: int | str) -> None:
        """Reconnect a site to the router."""
        n = self._site(site)
        _run(["ip", "-n", self.router_ns, "link", "set", f"s{n}", "up"])
        # A link taken down loses its neighbours, permanent ones too: pin them again.
        _neigh_batch(self.router_ns, [(h.ip, f"s{n}") for h in self.hosts(n)])
        self.cut_sites.discard(n)
        self._save()

    # ---- processes -------------------------------------------------------------------------

    def _argv(self, host: Host | str, argv: Sequence[str]) -> list[str]:
        h = host if isinstance(host, Host) else self.host(host)
        return ["ip", "netns", "exec", h.ns, *argv]

    def exec(
        self, host: Host | str, argv: Sequence[str], timeout: float = 30.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in a host and wait for it."""
        proc = subprocess.run(self._argv(host, argv), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise LabError(f"{host}: {' '.join(argv)}: {proc.stderr.strip()}")
        return proc

    def popen(
        self,
        host: Host | str,
        argv: Sequence[str],
        log: Path | None = None,
        env: dict[str, str] | None = None,
        stdout: int | IO[Any] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in a host (stdout+stderr to `log` when given)."""
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        out: int | IO[Any] | None = stdout
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = log.open("ab")
        try:
            return subprocess.Popen(
                self._argv(host, argv),
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                env=full_env,
                cwd=str(REPO),
                start_new_session=True,  # so kill() reaches the whole group
            )
        finally:
            if log is not None and out is not None and not isinstance(out, int):
                out.close()

    @staticmethod
    def kill(proc: subprocess.Popen[Any], sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal a process started by popen (its process group) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def host_dir(self, host: Host | str) -> Path:
        h = host if isinstance(host, Host) else self.host(host)
        d = self.hosts_root / h.name
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ---- meshd on lab hosts (the `meshd run` contract of DESIGN.md) ---------------------------

    def cluster_key_file(self) -> Path:
        """A cluster key shared by the lab's nodes (base64 of 32 bytes, mode 0600)."""
        path = self.workdir / "cluster.key"
        if not path.exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
        return path

    def meshd_argv(
        self,
        host: Host | str,
        cluster: str = "lab",
        mdns: bool = True,
        joins: Sequence[str] = (),
        profile: str = "local",
        extra: Sequence[str] = (),
        data_dir: Path | None = None,
    ) -> list[str]:
        """`meshd run` for a host: bound to its lab address, API on the host's own loopback.

        data_dir defaults to <host dir>/meshd."""
        h = host if isinstance(host, Host) else self.host(host)
        data_dir = data_dir or self.host_dir(h) / "meshd"
        argv = [
            self.python, "-c", "import sys; from meshd.cli.meshd import main; sys.exit(main())",
            "run", "--name", h.name, "--cluster", cluster, "--site", h.site_name,
            "--bind", f"{h.ip}:{MESHD_PORT}", "--api", f"127.0.0.1:{API_PORT}",
            "--data-dir", str(data_dir), "--profile", profile,
            "--cluster-key-file", str(self.cluster_key_file()),
        ]  # fmt: skip
        argv += ["--mdns-interface", h.ip] if mdns else ["--no-mdns"]
        for seed in joins:
            argv += ["--join", seed]
        return [*argv, *extra]

    def start_meshd(
        self,
        host: Host | str,
        cluster: str = "lab",
        mdns: bool = True,
        joins: Sequence[str] = (),
        profile: str = "local",
        extra: Sequence[str] = (),
        fresh: bool = False,
        data_dir: Path | None = None,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `meshd run` in a host; `fresh` wipes its data dir (identity, snapshot) first.

        data_dir defaults to <host dir>/meshd and log to <host dir>/meshd.log (appended to);
        env is added to the daemon's environment (e.g. LD_PRELOAD for libfaketime)."""
        h = host if isinstance(host, Host) else self.host(host)
        data = data_dir or self.host_dir(h) / "meshd"
        if fresh:
            shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True, exist_ok=True)
        argv = self.meshd_argv(h, cluster, mdns, joins, profile, extra, data_dir=data)
        return self.popen(h, argv, log=log or self.host_dir(h) / "meshd.log", env=env)

    def api_get(self, host: Host | str, path: str, port: int = API_PORT, timeout: float = 3.0) -> Any:
        """GET a JSON document from the operator API of a host (None when it does not answer)."""
        code = (
            "import sys, urllib.request\n"
            "try:\n"
            f"    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout={timeout})\n"
            "    sys.stdout.write(r.read().decode())\n"
            "except Exception as e:\n"
            "    sys.exit(1)\n"
        )
        try:
            proc = self.exec(host, [self.python, "-c", code], timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0:
            return None
        try:
            return json.loads(proc.stdout)
        except ValueError:
            return None

    def member_states(self, host: Host | str) -> dict[str, str] | None:
        """name -> state as a host sees the mesh (None when its API does not answer)."""
        doc = self.api_get(host, "/v1/members")
        if not isinstance(doc, dict):
            return None
        return {m["name"]: m["state"] for m in doc.get("members", [])}

    # ---- OCI tools inside a host: containerd 1.6 and Debian's docker-registry -------------------

    def start_containerd(self, host: Host | str, name: str = "containerd") -> LabContainerd:
        """containerd in a host with its own root, state and socket under <host dir>/<name> (wiped
        first: an empty content store), CRI off. Pulls go through `ctr_argv` run in the host."""
        h = host if isinstance(host, Host) else self.host(host)
        d = self.host_dir(h) / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        sock = d / "c.sock"  # a Unix socket path has at most 107 bytes: the lab's paths are short
        config = d / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{d / "root"}"\n'
            f'state = "{d / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{sock}"\n'
            f'[ttrpc]\n  address = "{sock}.ttrpc"\n'
            '[metrics]\n  address = ""\n'
        )
        proc = self.popen(h, ["containerd", "--config", str(config), "--address", str(sock)], log=d / "log")
        c = LabContainerd(h, d, sock, proc)
        deadline = time.monotonic() + 30
        while self.exec(h, c.ctr_argv("version"), timeout=10).returncode != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                self.kill(proc)
                raise LabError(f"{h.name}: containerd did not start ({d / 'log'})")
            time.sleep(0.2)
        return c

    def start_docker_registry(
        self, host: Host | str, port: int = 5000
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Debian's docker-registry on a host's lab address (storage under <host dir>/registry,
        kept); returns the process and its log, which has an access-log line per request."""
        h = host if isinstance(host, Host) else self.host(host)
        d = self.host_dir(h) / "registry"
        d.mkdir(parents=True, exist_ok=True)
        config = d / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {d / 'storage'}\n"
            f"http:\n  addr: {h.ip}:{port}\n"
        )
        log = d / "registry.log"
        proc = self.popen(h, ["docker-registry", "serve", str(config)], log=log)
        probe = f"import urllib.request; urllib.request.urlopen('http://{h.ip}:{port}/v2/', timeout=2)"
        deadline = time.monotonic() + 30
        while self.exec(h, [self.python, "-c", probe], timeout=10).returncode != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                self.kill(proc)
                raise LabError(f"{h.name}: docker-registry did not start ({log})")
            time.sleep(0.2)
        return proc, log

    # ---- an independent mDNS stack (avahi) inside a host -------------------------------------

    def start_avahi(self, host: Host | str) -> tuple[list[subprocess.Popen[bytes]], dict[str, str]]:
        """Start a private D-Bus and avahi-daemon in a host.

        Returns the processes and the environment `avahi-browse` needs (it talks D-Bus). The
        bus is a private one (DBUS_SYSTEM_BUS_ADDRESS), and avahi gets a private /run (its pid
        file path is fixed) in the mount namespace `ip netns exec` creates.
        """
        h = host if isinstance(host, Host) else self.host(host)
        d = self.host_dir(h) / "avahi"
        d.mkdir(parents=True, exist_ok=True)
        bus = d / "bus"
        with contextlib.suppress(FileNotFoundError):
            bus.unlink()
        (d / "dbus.conf").write_text(
            '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
            "<busconfig><type>system</type>\n"
            f"<listen>unix:path={bus}</listen><auth>EXTERNAL</auth>\n"
            '<policy context="default"><allow user="*"/><allow own="*"/>'
            '<allow send_destination="*"/><allow receive_sender="*"/></policy>\n'
            "</busconfig>\n"
        )
        (d / "avahi-daemon.conf").write_text(
            "[server]\n"
            f"host-name={self.prefix.strip('-')}-{h.name}\n"
            "use-ipv4=yes\nuse-ipv6=no\n"
            f"allow-interfaces={h.ifname}\n"
            "enable-dbus=yes\n"
            "disallow-other-stacks=no\n"
            "ratelimit-interval-usec=0\n"
            "[publish]\npublish-workstation=no\npublish-hinfo=no\n"
            "[reflector]\nenable-reflector=no\n"
        )
        env = {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={bus}"}
        procs = [
            self.popen(
                h,
                ["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={d / 'dbus.conf'}"],
                log=d / "dbus.log",
            )
        ]
        deadline = time.monotonic() + 5
        while not bus.exists():
            if time.monotonic() > deadline:
                raise LabError(f"{h.name}: private dbus-daemon did not start ({d / 'dbus.log'})")
            time.sleep(0.02)
        script = (
            "mount -t tmpfs lab-avahi-run /run && "
            f"exec avahi-daemon --no-chroot --no-drop-root --no-rlimits -f {d / 'avahi-daemon.conf'}"
        )
        procs.append(self.popen(h, ["sh", "-c", script], log=d / "avahi.log", env=env))
        return procs, env

    # ---- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        existing = set(self.namespaces())
        return {
            "prefix": self.prefix,
            "up": bool(existing),
            "sites": self.sites,
            "hosts_per_site": self.hosts_per_site,
            "site_rate": self.site_rate,
            "cut": sorted(self.cut_sites),
            "namespaces": sorted(existing),
            "hosts": [
                {
                    "name": h.name,
                    "ip": h.ip,
                    "ns": h.ns,
                    "exists": h.ns in existing,
                    "procs": len(self._ns_pids(h.ns)) if h.ns in existing else 0,
                }
                for h in self.hosts()
            ],
        }


# ---- helpers for tests and benchmarks -----------------------------------------------------------


@dataclass
class LabContainerd:
    """containerd started by Lab.start_containerd: run `ctr_argv(...)` in its host."""

    host: Host
    dir: Path
    sock: Path
    proc: subprocess.Popen[bytes]
    namespace: str = "meshd-lab"

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.sock), "--namespace", self.namespace, *args]

    def hosts_dir(self, registry: str, mirror: str | None) -> Path:
        """A containerd hosts dir for `registry` (host:port, plain HTTP), with `mirror` (a URL)
        first when given; the registry itself is the server (listed as a host too when alone:
        containerd 1.6 would otherwise speak HTTPS to a bare `server`)."""
        d = self.dir / ("certs.d-mirror" if mirror else "certs.d-direct")
        (d / registry).mkdir(parents=True, exist_ok=True)
        text = f'server = "http://{registry}"\n'
        host = mirror or f"http://{registry}"
        text += f'\n[host."{host}"]\n  capabilities = ["pull", "resolve"]\n'
        (d / registry / "hosts.toml").write_text(text)
        return d


def iface_bytes(ns: str, dev: str, *counters: str) -> int:
    """The sum of an interface's byte counters in a namespace (e.g. "tx_bytes", "rx_bytes")."""
    total = 0
    for counter in counters:
        out = _run(
            ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/{counter}"], timeout=10
        )
        total += int(out.strip())
    return total


def wait_until(cond: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = "") -> Any:
    """Poll `cond` until it returns something truthy; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what or cond}")
        time.sleep(interval)


class DiscoveryAgent:
    """`python -m meshd.discovery` (mDNS only, no membership) in a host; collects its JSON events."""

    def __init__(self, lab: Lab, host: Host | str, cluster: str, site: str | None = None) -> None:
        self.lab = lab
        self.host = host if isinstance(host, Host) else lab.host(host)
        self.name = self.host.name
        argv = [
            lab.python, "-m", "meshd.discovery", "--name", self.name, "--id", f"id-{self.name}",
            "--cluster", cluster, "--site", site or self.host.site_name,
            "--address", self.host.ip, "--interface", self.host.ip, "--port", str(MESHD_PORT),
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = lab.popen(self.host, argv, stdout=subprocess.PIPE)
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["t"] = time.monotonic() - self.started
            self.events.append(event)

    def peers(self) -> set[str]:
        return {e["name"] for e in list(self.events) if e["event"] == "peer"}

    def gone(self) -> set[str]:
        return {e["name"] for e in list(self.events) if e["event"] == "gone"}

    def stop(self) -> dict[str, int]:
        """Stop gracefully (mDNS goodbye) and return the agent's counters."""
        if self.proc.poll() is None:
            self.lab.kill(self.proc, signal.SIGTERM)
        self._reader.join(timeout=5)
        for e in reversed(self.events):
            if e["event"] == "stopped":
                return dict(e["counters"])
        return {}


# ---- mDNS packet capture (passive, AF_PACKET) --------------------------------------------------


@dataclass
class MdnsSeen:
    """mDNS packets seen per interface, with their IPv4 sources."""

    by_ifname: dict[str, int]
    sources: dict[str, list[str]]
    total_packets: int

    @property
    def mdns_total(self) -> int:
        return sum(self.by_ifname.values())


class MdnsSniffer:
    """Count mDNS (UDP 5353 or to 224.0.0.251) on every interface of the current namespace.

    Passive: a raw AF_PACKET socket that sends nothing. `lo` is skipped unless include_lo.
    """

    def __init__(self, include_lo: bool = False) -> None:
        self.include_lo = include_lo
        self._stop = threading.Event()
        self._counts: dict[str, int] = {}
        self._sources: dict[str, set[str]] = {}
        self._total = 0
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MdnsSniffer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> MdnsSeen:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self._sock.close()
        return self.result()

    def result(self) -> MdnsSeen:
        return MdnsSeen(dict(self._counts), {k: sorted(v) for k, v in self._sources.items()}, self._total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            ifname = addr[0]
            if ifname == "lo" and not self.include_lo:
                continue
            self._total += 1
            src = _mdns_source(data)
            if src is not None:
                self._counts[ifname] = self._counts.get(ifname, 0) + 1
                self._sources.setdefault(ifname, set()).add(src)


def _mdns_source(frame: bytes) -> str | None:
    """IPv4 source of an mDNS frame (Ethernet), else None. IPv6 mDNS counts as source 'v6'."""
    if len(frame) < 14:
        return None
    ethertype = frame[12:14]
    if ethertype == b"\x86\xdd" and len(frame) >= 14 + 40 + 4:
        if frame[20] == 17:
            sport, dport = struct.unpack("!HH", frame[54:58])
            if MDNS_PORT in (sport, dport):
                return "v6"
        return None
    if ethertype != b"\x08\x00" or len(frame) < 14 + 20 + 8:
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[23] != 17 or len(frame) < 14 + ihl + 4:
        return None
    sport, dport = struct.unpack("!HH", frame[14 + ihl : 14 + ihl + 4])
    dst = socket.inet_ntoa(frame[30:34])
    if MDNS_PORT in (sport, dport) or dst == MDNS_GROUP:
        return socket.inet_ntoa(frame[26:30])
    return None


@contextlib.contextmanager
def sniff_in(lab: Lab, ns: str | None, seconds_hint: float = 0) -> Iterator[list[MdnsSeen]]:
    """Sniff mDNS in a namespace (None = the current one) while the block runs."""
    box: list[MdnsSeen] = []
    if ns is None:
        sniffer = MdnsSniffer()
        with sniffer:
            yield box
        box.append(sniffer.result())
        return
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve()), "sniff",
         "--here", "--seconds", str(max(seconds_hint, 3600))],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.3)  # let it open the socket before traffic starts
        yield box
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        if out.strip():
            data = json.loads(out.strip().splitlines()[-1])
            box.append(MdnsSeen(data["by_ifname"], data["sources"], data["total_packets"]))


# ---- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default=os.environ.get("MESHD_LAB_PREFIX", DEFAULT_PREFIX))
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="build the lab (tears down an old one first)")
    p_up.add_argument("--sites", type=int, default=2)
    p_up.add_argument("--hosts", type=int, default=3)
    p_up.add_argument("--site-rate", default=None, help="tc tbf rate on each site uplink, e.g. 10mbit")
    p_up.add_argument("--ipv6", action="store_true", help="keep link-local IPv6 (DAD off)")
    sub.add_parser("down", help="kill lab processes, delete every lab namespace")
    sub.add_parser("status", help="print the lab as JSON")
    p_exec = sub.add_parser("exec", help="run a command in a host (s1h2 or its namespace)")
    p_exec.add_argument("host")
    p_exec.add_argument("command", nargs=argparse.REMAINDER)
    for name in ("cut", "restore"):
        p = sub.add_parser(name, help=f"{name} a site's link to the router")
        p.add_argument("site", help="1 or s1")
    p_sniff = sub.add_parser("sniff", help="count mDNS packets per interface (JSON)")
    p_sniff.add_argument("ns", nargs="?", help="namespace or host; default: the current one")
    p_sniff.add_argument("--seconds", type=float, default=10.0)
    p_sniff.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        print("lab.py needs root", file=sys.stderr)
        return 1
    lab = Lab(args.prefix)
    try:
        if args.cmd == "up":
            lab.up(args.sites, args.hosts, args.site_rate, args.ipv6)
            for h in lab.hosts():
                print(f"{h.name:8} {h.ns:14} {h.ip}")
        elif args.cmd == "down":
            lab.down()
        elif args.cmd == "status":
            print(json.dumps(lab.status(), indent=2))
        elif args.cmd == "exec":
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not cmd:
                parser.error("exec needs a command")
            h = lab.host(args.host)
            os.execvp("ip", ["ip", "netns", "exec", h.ns, *cmd])
        elif args.cmd == "cut":
            lab.cut(args.site)
        elif args.cmd == "restore":
            lab.restore(args.site)
        elif args.cmd == "sniff":
            if args.ns and not args.here:
                ns = lab.resolve_ns(args.ns)
                os.execvp("ip", ["ip", "netns", "exec", ns, sys.executable, __file__, "sniff",
                                 "--here", "--seconds", str(args.seconds)])  # fmt: skip
            sniffer = MdnsSniffer()
            with sniffer, contextlib.suppress(KeyboardInterrupt):
                time.sleep(args.seconds)
            print(json.dumps(asdict(sniffer.result())))
    except LabError as exc:
        print(f"lab.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
