"""A node under attack, against the same node at rest: meshd (any tree, before and after) and serf.

Issue 9 (hostile site network), Performance. A 3-node mesh with a cluster key on 127.0.0.1; the
target is node 0. Each scenario runs on a fresh mesh, --repeats times at rest and --slow-repeats
times per attack, each run bounded by --period seconds of attack plus --settle seconds of quiet
(defaults: about 7 minutes per tree; --before doubles that, serf adds 4 or 5):

- rest: no attack.
- idle_connections: --connections TCP connections to the peer port, opened and held.
- slow_bodies: --slow-clients clients POST /peer/v1/stream with Content-Length 16 MiB and send the
  body at --slow-rate bytes/s each (serf: the same slow writer, memberlist framing, on its TCP port).
- datagram_flood: random datagrams to the gossip port at --flood-rate per second, one thread.
- replay: one sealed POST /peer/v1/chunks (made by the tree's own client, see attack_helper.py,
  for every chunk of a published 4 MiB release) replayed --replays times by a client without the
  key; bytes served counted.
- rebinding: GET /v1/health (and /metrics) with `Host: evil.example:PORT`; the status is recorded.

Measured on the target during each run: probe round trip (direct Ping -> Ack with the tree's codec,
every 200 ms, from attack_helper.py), API latency (GET /v1/members every 100 ms on a new connection,
2 s timeout; serf: the `members` RPC), RSS (max during the attack, and --settle s after it stops),
open fds (/proc/PID/fd), and whether the other nodes see the target alive (polled every second).

    python bench/bench_attacks.py                                  # this tree; serf if installed
    python bench/bench_attacks.py --before main                    # before (git ref) and after
    python bench/bench_attacks.py --tree /work/main --repeats 1 --period 5 --scenarios rest,replay

--before REF checks REF out with `git worktree add --detach` under /tmp and removes it at the end.
Nodes start with an open-file limit of --node-nofile (1024, systemd's default; 0 = inherited).
Every process runs in its own session and its group is killed at the end, whatever happens. The
target's RSS is capped (--rss-cap-mb): a run that passes it stops its attack early and says so.
Writes bench/results/attacks.md (--out) and prints it.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import base64
import contextlib
import functools
import http.client
import json
import os
import platform
import random
import resource
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench import bench_queries as bq  # noqa: E402 - the shared mesh starters of the other benches
from bench import membership as mb  # noqa: E402

HOST = bq.HOST
HELPER = Path(__file__).resolve().parent / "attack_helper.py"
SCENARIOS = ("rest", "rebinding", "replay", "datagram_flood", "idle_connections", "slow_bodies")
FLOODS = ("datagram_flood", "idle_connections", "slow_bodies")
SERF_SCENARIOS = ("rest", *FLOODS)  # the others need meshd's HTTP API or chunk store
SLOW_BODY_LENGTH = 16 * 1024 * 1024
RELEASE_SIZE = 4 * 1024 * 1024
API_TIMEOUT = 2.0
MEMBERLIST_ENCRYPT_MSG = 10  # memberlist's messageType for an encrypted stream


def log(msg: str) -> None:
    bq.log(msg)


# --- pure helpers (tests/unit/test_bench_attacks.py) ----------------------------------------------


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None for no samples."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def spread(xs: Sequence[float | None], fmt: Callable[[float], str]) -> str:
    """'median (min-max)' over runs, or the single value; '-' when no run has one."""
    vals = [x for x in xs if x is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt(vals[0])
    return f"{fmt(statistics.median(vals))} ({fmt(min(vals))}-{fmt(max(vals))})"


def parse_nofile(limits_text: str) -> str:
    """'soft/hard' of 'Max open files' in a /proc/PID/limits text ('?' when absent)."""
    for line in limits_text.splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft}/{hard}"
    return "?"


def parse_probe_lines(text: str) -> tuple[list[float], int, str | None]:
    """attack_helper.py probe output: (round trips in ms, probes lost, error)."""
    rtts: list[float] = []
    lost = 0
    error = None
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if "rtt_ms" in doc:
            rtts.append(float(doc["rtt_ms"]))
        elif doc.get("lost"):
            lost += 1
        elif "error" in doc:
            error = str(doc["error"])
    return rtts, lost, error


@dataclass
class Run:
    """What one run of one scenario measured on the target."""

    probe_ms: list[float] = field(default_factory=list)
    probe_lost: int = 0
    probe_error: str | None = None
    api_ms: list[float] = field(default_factory=list)
    api_failed: int = 0
    rss_max_kb: int = 0
    rss_after_kb: int | None = None
    fds_max: int = 0
    fds_after: int | None = None
    alive_seen: int = 0
    alive_polls: int = 0
    outcome: str = ""
    target_died: bool = False


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _mb(kb: float) -> str:
    return f"{kb / 1024:.0f}"


def row_cells(runs: Sequence[Run]) -> list[str]:
    """The measured cells of one table row: probe rtt, API, RSS, fds, seen alive, attack outcome."""
    probes = [percentile(r.probe_ms, 0.5) for r in runs]
    lost = sum(r.probe_lost for r in runs)
    sent = lost + sum(len(r.probe_ms) for r in runs)
    errors = sorted({r.probe_error for r in runs if r.probe_error})
    probe = spread(probes, _ms) + " ms" if any(p is not None for p in probes) else "-"
    if lost:
        probe += f", {lost}/{sent} lost"
    if errors:
        probe += f" (error: {errors[0]})"
    api = spread([percentile(r.api_ms, 0.5) for r in runs], _ms)
    api += f" / p95 {spread([percentile(r.api_ms, 0.95) for r in runs], _ms)}"
    failed = sum(r.api_failed for r in runs)
    if failed:
        api += f", {failed}/{failed + sum(len(r.api_ms) for r in runs)} failed"
    rss = spread([r.rss_max_kb for r in runs], _mb) + " / " + spread([r.rss_after_kb for r in runs], _mb)
    fds = spread([r.fds_max for r in runs], lambda x: f"{x:.0f}")
    fds += " / " + spread([r.fds_after for r in runs], lambda x: f"{x:.0f}")
    seen, polls = sum(r.alive_seen for r in runs), sum(r.alive_polls for r in runs)
    alive = "yes" if polls and seen == polls else f"{seen}/{polls} polls"
    if any(r.target_died for r in runs):
        alive = "TARGET DIED; " + alive
    outcomes = list(dict.fromkeys(r.outcome for r in runs if r.outcome))
    return [probe, api, rss, fds, alive, "; ".join(outcomes[:2]) + (" ..." if len(outcomes) > 2 else "")]


TABLE_HEAD = [
    "| scenario | system/tree | runs | probe rtt median | API ms: median / p95 | RSS MiB max / after "
    "| fds max / after | seen alive by the others | attack |",
    "|---|---|---|---|---|---|---|---|---|",
]


def render(
    rows: Sequence[tuple[str, str, Sequence[Run]]], header: Sequence[str], notes: Sequence[str]
) -> str:
    lines = ["# A node under attack (issue 9)", "", *header, "", *TABLE_HEAD]
    for scenario, system, runs in rows:
        lines.append("| " + " | ".join([scenario, system, str(len(runs)), *row_cells(runs)]) + " |")
    lines += ["", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


# --- attacks (each runs in one thread until `stop` is set or it is done) ---------------------------


class Attack:
    name = "rest"

    def prepare(self, target: Target) -> None:
        """Work before the run that is not part of it (publishing, sealing)."""

    def run(self, target: Target, stop: threading.Event) -> None:
        stop.wait()

    def close(self) -> None:
        """Release what the attack holds (sockets)."""

    def outcome(self) -> str:
        return ""


class IdleConnections(Attack):
    name = "idle_connections"

    def __init__(self, n: int) -> None:
        self.n = n
        self.socks: list[socket.socket] = []
        self.failed: Counter[str] = Counter()
        self.closed_by_node = 0

    def run(self, target: Target, stop: threading.Event) -> None:
        self.socks, self.failed, self.closed_by_node = [], Counter(), 0
        for _ in range(self.n):
            if stop.is_set():
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(1.0)
            try:
                s.connect(target.peer_addr)
                s.setblocking(False)  # the peek below must not wait
                self.socks.append(s)
            except OSError as e:
                self.failed[type(e).__name__] += 1
                s.close()
        stop.wait()
        for s in self.socks:  # a connection the node closed reads as EOF (or a reset)
            try:
                if s.recv(1, socket.MSG_PEEK) == b"":
                    self.closed_by_node += 1
            except BlockingIOError:
                pass
            except OSError:
                self.closed_by_node += 1

    def close(self) -> None:
        for s in self.socks:
            s.close()

    def outcome(self) -> str:
        failed = ", ".join(f"{n} {k}" for k, n in self.failed.items())
        return (
            f"{len(self.socks)}/{self.n} opened" + (f" ({failed})" if failed else "")
            + f", {self.closed_by_node} closed by the node by the end"
        )  # fmt: skip


class SlowBodies(Attack):
    """Clients that announce a 16 MiB body and trickle it; a client the node drops reconnects."""

    name = "slow_bodies"
    TICK = 0.25

    def __init__(self, clients: int, rate: int, preamble: Callable[[Target], bytes]) -> None:
        self.clients, self.rate, self.preamble = clients, rate, preamble
        self.sent = self.dropped = self.refused = 0

    def _connect(self, target: Target) -> socket.socket | None:
        try:
            s = socket.create_connection(target.peer_addr, timeout=1.0)
            s.sendall(self.preamble(target))
            s.setblocking(False)
            return s
        except OSError:
            self.refused += 1
            return None

    def run(self, target: Target, stop: threading.Event) -> None:
        self.sent = self.dropped = self.refused = 0
        socks: list[socket.socket | None] = [self._connect(target) for _ in range(self.clients)]
        piece = bytes(int(self.rate * self.TICK))
        per_client = [0] * self.clients
        try:
            while not stop.wait(self.TICK):
                for i, s in enumerate(socks):
                    if s is None or per_client[i] >= SLOW_BODY_LENGTH:
                        socks[i] = s or self._connect(target)
                        continue
                    try:
                        n = s.send(piece)
                        self.sent += n
                        per_client[i] += n
                    except BlockingIOError:
                        pass  # the node is not reading: that is the point
                    except OSError:
                        self.dropped += 1
                        s.close()
                        socks[i], per_client[i] = None, 0
        finally:
            for s in socks:
                if s is not None:
                    s.close()

    def outcome(self) -> str:
        return (
            f"{self.sent / 2**20:.0f} MiB sent by {self.clients} clients, "
            f"{self.dropped} dropped by the node, {self.refused} connects failed"
        )


class DatagramFlood(Attack):
    name = "datagram_flood"
    BATCH_S = 0.01

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.sent = 0
        self.seconds = 0.0

    def run(self, target: Target, stop: threading.Event) -> None:
        rng = random.Random(9)
        pool = [rng.randbytes(rng.randint(16, 1400)) for _ in range(256)]
        per_batch = max(1, int(self.rate * self.BATCH_S))
        self.sent = 0
        started = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            nxt = started
            while not stop.is_set():
                for _ in range(per_batch):
                    with contextlib.suppress(OSError):
                        s.sendto(pool[rng.randrange(256)], target.peer_addr)
                        self.sent += 1
                nxt += self.BATCH_S
                time.sleep(max(0.0, nxt - time.monotonic()))
        self.seconds = time.monotonic() - started

    def outcome(self) -> str:
        return f"{self.sent} datagrams, {self.sent / max(self.seconds, 1e-9):.0f}/s"


class Replay(Attack):
    name = "replay"

    def __init__(self, count: int) -> None:
        self.count = count
        self.statuses: Counter[int | str] = Counter()
        self.served = 0
        self.seconds = 0.0

    def prepare(self, target: Target) -> None:
        target.sealed_chunk_request()

    def run(self, target: Target, stop: threading.Event) -> None:
        req = target.sealed_chunk_request()
        body = base64.b64decode(req["body_b64"])
        self.statuses, self.served = Counter(), 0
        started = time.monotonic()
        conn = http.client.HTTPConnection(*target.peer_addr, timeout=10)
        try:
            for _ in range(self.count):
                if stop.is_set():
                    break
                try:
                    conn.request("POST", req["path"], body=body, headers=req["headers"])
                    resp = conn.getresponse()
                    data = resp.read()
                    self.statuses[resp.status] += 1
                    if resp.status == 200:
                        self.served += len(data)
                except (OSError, http.client.HTTPException) as e:
                    self.statuses[type(e).__name__] += 1
                    conn.close()
                    conn = http.client.HTTPConnection(*target.peer_addr, timeout=10)
        finally:
            conn.close()
            self.seconds = time.monotonic() - started
        stop.wait()

    def outcome(self) -> str:
        codes = ", ".join(f"{k} x{n}" for k, n in sorted(self.statuses.items(), key=str))
        return f"{codes}: {self.served / 1e6:.0f} MB served in {self.seconds:.1f} s"


class Rebinding(Attack):
    name = "rebinding"

    def __init__(self) -> None:
        self.statuses: dict[str, int | str] = {}

    def run(self, target: Target, stop: threading.Event) -> None:
        for path in ("/v1/health", "/metrics"):
            conn = http.client.HTTPConnection(HOST, target.api_port, timeout=15)
            try:
                conn.request("GET", path, headers={"Host": f"evil.example:{target.api_port}"})
                resp = conn.getresponse()
                resp.read()
                self.statuses[path] = resp.status
            except (OSError, http.client.HTTPException) as e:
                self.statuses[path] = type(e).__name__
            finally:
                conn.close()
        stop.wait()

    def outcome(self) -> str:
        return ", ".join(f"{p} {s}" for p, s in self.statuses.items())


def make_attack(name: str, args: argparse.Namespace) -> Attack:
    if name == "idle_connections":
        return IdleConnections(args.connections)
    if name == "slow_bodies":
        return SlowBodies(args.slow_clients, args.slow_rate, lambda t: t.slow_preamble())
    if name == "datagram_flood":
        return DatagramFlood(args.flood_rate)
    if name == "replay":
        return Replay(args.replays)
    if name == "rebinding":
        return Rebinding()
    return Attack()


# --- targets: a 3-node mesh of one system, node 0 attacked ---------------------------------------


@contextlib.contextmanager
def nofile_limit(soft: int) -> Iterator[None]:
    """Children spawned inside inherit this soft open-file limit (0: leave it)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, old[1]), old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Target(abc.ABC):
    """One system's 3-node mesh on loopback; node 0 is attacked."""

    label = ""
    peer_addr: tuple[str, int]  # the target's gossip UDP port and peer TCP port
    api_port = 0

    @abc.abstractmethod
    def start(self) -> None: ...
    @abc.abstractmethod
    def pid(self) -> int: ...
    @abc.abstractmethod
    def alive(self) -> bool: ...
    @abc.abstractmethod
    def api_call(self) -> None:
        """One API request; raises on failure."""

    @abc.abstractmethod
    def others_see_alive(self) -> list[bool]: ...
    @abc.abstractmethod
    def slow_preamble(self) -> bytes: ...
    @abc.abstractmethod
    def stop(self) -> None: ...

    def start_probe(self, duration: float) -> subprocess.Popen[bytes] | None:
        return None

    def sealed_chunk_request(self) -> dict[str, Any]:
        raise NotImplementedError(f"{self.label} has no chunk store")


class MeshdTarget(Target):
    def __init__(
        self, label: str, tree: Path, workdir: Path, key_b64: str, taken: set[int], args: Any
    ) -> None:
        self.label, self.tree, self.args = label, tree, args
        self.cluster = bq.MeshdCluster(3, "lan", workdir, key_b64, taken)
        self.peer_addr = (HOST, self.cluster.ports[0])
        self.api_port = self.cluster.api_ports[0]
        self.env = {**os.environ, "PYTHONPATH": str(tree)}
        self._sealed: dict[str, Any] | None = None
        self._target_id = ""

    def start(self) -> None:
        # bench_queries starts nodes from its own REPO: point it at the tree under test for this call.
        # `python -m` puts the working directory first on sys.path: start from the tree, or the
        # nodes would run whatever meshd/ the bench was started next to.
        saved, bq.REPO = bq.REPO, self.tree
        try:
            with nofile_limit(self.args.node_nofile), contextlib.chdir(self.tree):
                self.cluster.start()
        finally:
            bq.REPO = saved

    def pid(self) -> int:
        return self.cluster.procs[0].popen.pid

    def alive(self) -> bool:
        return self.cluster.procs[0].popen.poll() is None

    def api_call(self) -> None:
        bq.http_json(self.cluster.api(0) + "/v1/members", API_TIMEOUT)

    def others_see_alive(self) -> list[bool]:
        seen = []
        for i in (1, 2):
            try:
                members = bq.http_json(self.cluster.api(i) + "/v1/members", API_TIMEOUT)["members"]
                state = {m["name"]: m["state"] for m in members}.get(self.cluster.name(0))
            except (OSError, ValueError, KeyError):
                state = None
            seen.append(state == "alive")
        return seen

    def _helper(self, *argv: str) -> list[str]:
        return [
            sys.executable, str(HELPER), *argv, "--key-file", str(self.cluster.key_file),
            "--cluster", "bench", "--addr", f"{HOST}:{self.peer_addr[1]}",
        ]  # fmt: skip

    def start_probe(self, duration: float) -> subprocess.Popen[bytes] | None:
        if not self._target_id:
            self._target_id = str(bq.http_json(self.cluster.api(0) + "/v1/status", API_TIMEOUT)["id"])
        argv = self._helper(
            "probe",
            "--target",
            self.cluster.name(0),
            "--target-id",
            self._target_id,
            "--duration",
            str(duration),
        )
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env)

    def slow_preamble(self) -> bytes:
        return (
            f"POST /peer/v1/stream HTTP/1.1\r\nHost: {HOST}:{self.peer_addr[1]}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {SLOW_BODY_LENGTH}\r\n\r\n"
        ).encode()

    def _tree_cmd(self, module: str, *argv: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", module, *argv],
            env=self.env, cwd=self.tree, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        if out.returncode:
            raise RuntimeError(f"{module} {argv[:3]} failed: {(out.stdout + out.stderr).decode()[-400:]}")
        return out.stdout.decode()

    def sealed_chunk_request(self) -> dict[str, Any]:
        """Publish a 4 MiB release on node 0 (once), then have the tree's client seal a chunk request."""
        if self._sealed is None:
            wd = self.cluster.workdir
            (wd / "release.bin").write_bytes(random.Random(4).randbytes(RELEASE_SIZE))
            self._tree_cmd("meshd.cli.meshd", "keygen", "publisher", "--out", str(wd / "publisher.key"))
            self._tree_cmd(
                "meshd.cli.meshctl", "publish", str(wd / "release.bin"), "--name", "bench", "--version", "1",
                "--key", str(wd / "publisher.key"), "--api", self.cluster.api(0),
                "--token-file", str(wd / self.cluster.name(0) / "api-token"),
            )  # fmt: skip
            out = subprocess.run(
                self._helper("seal-chunks", "--data-dir", str(wd / self.cluster.name(0))),
                env=self.env, capture_output=True, timeout=120, check=False,
            )  # fmt: skip
            doc = json.loads(out.stdout.decode().strip().splitlines()[-1] or "{}")
            if "error" in doc or "body_b64" not in doc:
                raise RuntimeError(
                    f"cannot seal a chunk request with this tree: {doc.get('error', out.stderr)}"
                )
            log(f"{self.label}: sealed a request for {doc['ids']} chunks ({doc['status']})")
            self._sealed = doc
        return self._sealed

    def stop(self) -> None:
        self.cluster.stop()


class SerfTarget(Target):
    def __init__(self, serf_bin: str, workdir: Path, key_b64: str, taken: set[int], args: Any) -> None:
        self.label, self.args = "serf", args
        self.cluster = bq.SerfCluster(3, "lan", workdir, key_b64, taken, serf_bin)
        self.peer_addr = (HOST, self.cluster.ports[0])
        self.loop = asyncio.new_event_loop()
        self.rpc = [mb.SerfRPC(p) for p in self.cluster.rpc_ports]

    def start(self) -> None:
        with nofile_limit(self.args.node_nofile):
            self.cluster.start()

    def pid(self) -> int:
        return self.cluster.procs[0].popen.pid

    def alive(self) -> bool:
        return self.cluster.procs[0].popen.poll() is None

    def _members(self, i: int) -> dict[str, str]:
        coro = self.rpc[i].call("members", None, True)
        try:
            doc = self.loop.run_until_complete(asyncio.wait_for(coro, API_TIMEOUT))
        except BaseException:
            # a timed-out call leaves the connection mid-answer: start over next time
            self.loop.run_until_complete(self.rpc[i].close())
            raise
        return {m["Name"]: m["Status"] for m in doc["Members"]}

    def api_call(self) -> None:
        self._members(0)

    def others_see_alive(self) -> list[bool]:
        seen = []
        for i in (1, 2):
            try:
                seen.append(self._members(i).get(self.cluster.name(0)) == "alive")
            except (OSError, RuntimeError, TimeoutError, KeyError):
                seen.append(False)
        return seen

    def slow_preamble(self) -> bytes:
        # memberlist reads an encrypted stream as: type byte, u32 big-endian length, then the bytes
        return bytes([MEMBERLIST_ENCRYPT_MSG]) + struct.pack(">I", SLOW_BODY_LENGTH)

    def stop(self) -> None:
        for r in self.rpc:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(r.close())
        self.loop.close()
        self.cluster.stop()


# --- one run ------------------------------------------------------------------------------------


def measure(target: Target, attack: Attack, period: float, settle: float, rss_cap_kb: int) -> Run:
    run = Run()
    probe = target.start_probe(period + 1.0)
    stop = threading.Event()
    worker = threading.Thread(target=attack.run, args=(target, stop), daemon=True)
    worker.start()
    started = time.monotonic()
    next_sample = next_alive = started
    capped = False
    while (now := time.monotonic()) < started + period:
        if now >= next_sample:
            run.rss_max_kb = max(run.rss_max_kb, mb.group_rss_kb(target.pid())[0])
            run.fds_max = max(run.fds_max, fd_count(target.pid()))
            next_sample = now + 0.25
            if run.rss_max_kb > rss_cap_kb and not capped:
                capped = True
                stop.set()  # safety: stop feeding it; the measurement goes on
        if now >= next_alive:
            seen = target.others_see_alive()
            run.alive_seen += sum(seen)
            run.alive_polls += len(seen)
            next_alive = now + 1.0
        t0 = time.monotonic()
        try:
            target.api_call()
            run.api_ms.append((time.monotonic() - t0) * 1000)
        except Exception:
            run.api_failed += 1
        time.sleep(max(0.0, t0 + 0.1 - time.monotonic()))
    stop.set()
    worker.join(30)
    attack.close()
    run.outcome = attack.outcome() + (f"; STOPPED at the {rss_cap_kb // 1024} MiB RSS cap" if capped else "")
    if probe is not None:
        try:
            out, _ = probe.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            probe.kill()
            out, _ = probe.communicate()
        run.probe_ms, run.probe_lost, run.probe_error = parse_probe_lines(out.decode(errors="replace"))
    if settle > 0:
        time.sleep(settle)
        run.rss_after_kb = mb.group_rss_kb(target.pid())[0]
        run.fds_after = fd_count(target.pid())
    run.target_died = not target.alive()
    return run


def run_scenario(make_target: Callable[[], Target], scenario: str, args: argparse.Namespace) -> list[Run]:
    repeats = args.repeats if scenario == "rest" else args.slow_repeats
    target = make_target()
    runs: list[Run] = []
    try:
        target.start()
        limits = Path(f"/proc/{target.pid()}/limits").read_text()
        log(f"{target.label} {scenario}: mesh up, target pid {target.pid()}, nofile {parse_nofile(limits)}")
        attack = make_attack(scenario, args)
        attack.prepare(target)
        settle = args.settle if scenario != "rest" else 0.0
        for k in range(repeats):
            run = measure(target, attack, args.period, settle, args.rss_cap_mb * 1024)
            runs.append(run)
            log(f"{target.label} {scenario} {k + 1}/{repeats}: {' | '.join(row_cells([run]))}")
            if run.target_died:
                log(f"{target.label} {scenario}: the target died; no more runs")
                break
    finally:
        target.stop()
    return runs


# --- the whole bench ----------------------------------------------------------------------------


MESH_START_S = 6.0  # a fresh 3-node mesh until every node sees every other alive and healthy


def estimate_s(args: argparse.Namespace, scenarios: Sequence[str], makers: Sequence[Any]) -> float:
    """Rough length of the whole bench, to print before starting it."""
    total = 0.0
    for _label, _make, supported in makers:
        for s in scenarios:
            if s in supported:
                repeats = args.repeats if s == "rest" else args.slow_repeats
                settle = 0.0 if s == "rest" else args.settle
                total += MESH_START_S + repeats * (args.period + settle + 1.0)
    return total


def git(tree: Path, *argv: str) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), *argv], capture_output=True, check=True, text=True
    ).stdout.strip()


@contextlib.contextmanager
def before_worktree(tree: Path, ref: str | None) -> Iterator[Path | None]:
    """A detached worktree of `ref` under /tmp for the run, removed afterwards."""
    if not ref:
        yield None
        return
    path = Path(tempfile.mkdtemp(prefix="meshd-bench-before-"))
    path.rmdir()
    git(tree, "worktree", "add", "--detach", str(path), ref)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(tree), "worktree", "remove", "--force", str(path)], check=False)


def tree_label(tree: Path, ref: str | None) -> str:
    try:
        sha = git(tree, "rev-parse", "--short", "HEAD")
        dirty = "+dirty" if git(tree, "status", "--porcelain", "--untracked-files=no") else ""
    except (subprocess.CalledProcessError, OSError):
        sha, dirty = "?", ""
    return f"meshd {ref or tree.name} @{sha}{dirty}"


def raise_own_nofile(needed: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = min(needed, hard) if hard != resource.RLIM_INFINITY else needed
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return f"{soft}/{hard}"


def run(args: argparse.Namespace) -> int:
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        log(f"unknown scenarios: {sorted(unknown)}")
        return 2
    systems = [s for s in args.systems.split(",") if s]
    tree = Path(args.tree).resolve()
    key_b64 = base64.b64encode(secrets.token_bytes(32)).decode()
    workdir = Path(tempfile.mkdtemp(prefix="meshd-bench-attacks-"))
    taken: set[int] = set()
    notes: list[str] = []
    rows: list[tuple[str, str, list[Run]]] = []
    own = raise_own_nofile(args.connections + args.slow_clients + 256)
    load = os.getloadavg()[0]
    ok = True
    with before_worktree(tree, args.before) as before:
        trees = [(tree_label(before, args.before), before)] if before else []
        trees.append((tree_label(tree, None), tree))
        makers: list[tuple[str, Callable[[str], Target], tuple[str, ...]]] = []
        if "meshd" in systems:
            for k, (label, path) in enumerate(trees):

                def make(s: str, label: str = label, path: Path = path, k: int = k) -> Target:
                    # by position: `--tree /work/main --before main` gives two trees called "main"
                    return MeshdTarget(label, path, workdir / f"tree{k}-{s}", key_b64, taken, args)

                makers.append((label, make, SCENARIOS))
        serf_bin = shutil.which(args.serf) if "serf" in systems else None
        if "serf" in systems and not serf_bin:
            notes.append(f"serf: skipped, `{args.serf}` is not installed (Debian package `serf`).")
            log(notes[-1])
        if serf_bin:
            makers.append(
                (
                    "serf",
                    lambda s: SerfTarget(serf_bin, workdir / f"serf-{s}", key_b64, taken, args),
                    SERF_SCENARIOS,
                )
            )
        log(f"about {estimate_s(args, scenarios, makers) / 60:.0f} minutes")
        for scenario in scenarios:
            for label, make_target, supported in makers:
                if scenario not in supported:
                    continue
                try:
                    rows.append(
                        (
                            scenario,
                            label,
                            run_scenario(functools.partial(make_target, scenario), scenario, args),
                        )
                    )
                except Exception as e:  # a failed scenario is a row that says why; the others still run
                    ok = False
                    log(f"{label} {scenario}: FAILED: {e}")
                    notes.append(f"{label} {scenario}: FAILED: {e}")
                finally:
                    bq.kill_all()
    header = [
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()} ({os.cpu_count()} CPUs, load "
        f"{load:.1f} at the start), everything on 127.0.0.1. 3 nodes with a cluster key (lan profile, "
        f"mDNS off); the target is node 0. Each run: {args.period:g} s of attack, RSS/fds 'after' "
        f"{args.settle:g} s after it stops.",
        "",
        "```",
        "python bench/bench_attacks.py " + " ".join(sys.argv[1:]),
        "```",
    ]
    notes += [
        f"Runs: {args.repeats} at rest, {args.slow_repeats} per attack (defaults 5 and 3: an attack run "
        "costs --period + --settle, and 5 of each would take one tree past 10 minutes); cells give the "
        "median over runs and (min-max) when there are several.",
        f"Nodes started with open-file limit {args.node_nofile or 'inherited'} (soft); "
        f"the bench's own: {own}.",
        "probe rtt: direct Ping -> Ack to the target with the tree's codec every 200 ms, 1 s timeout "
        "(bench/attack_helper.py). API: GET /v1/members on a new connection every 100 ms, 2 s timeout "
        "(serf: the members RPC on one connection). Seen alive: nodes 1 and 2 polled every second.",
        f"Attacks: {args.connections} idle TCP connections; {args.slow_clients} slow clients at "
        f"{args.slow_rate // 1024} KiB/s each announcing 16 MiB; {args.flood_rate} random datagrams/s; "
        f"one sealed chunk request for a {RELEASE_SIZE // 2**20} MiB release replayed {args.replays} times; "
        "Host: evil.example on the API.",
    ]
    return bq.finish(render(rows, header, notes), args.out, workdir, ok, args.keep)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", default=str(REPO), help="meshd source tree to measure (default: this repo)")
    p.add_argument("--before", metavar="REF", help="also measure this git ref of --tree, side by side")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ", ".join(SCENARIOS))
    p.add_argument("--systems", default="meshd,serf", help="comma list: meshd, serf")
    p.add_argument("--runs", "--repeats", dest="repeats", type=int, default=5, help="runs at rest")
    p.add_argument("--slow-repeats", type=int, default=3, help="runs of each attack scenario")
    p.add_argument("--period", type=float, default=10.0, help="seconds of attack per run")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after the attack for RSS/fds 'after'")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--slow-clients", type=int, default=100)
    p.add_argument("--slow-rate", type=int, default=64 * 1024, help="bytes/s per slow client")
    p.add_argument("--flood-rate", type=int, default=20_000, help="datagrams/s")
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--node-nofile", type=int, default=1024, help="nodes' soft open-file limit (0: inherit)")
    p.add_argument("--rss-cap-mb", type=int, default=4096, help="stop an attack when the target passes this")
    p.add_argument("--serf", default="serf", help="serf binary")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "attacks.md"))
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = p.parse_args(argv)
    return bq.run_killing_all(run, args)


if __name__ == "__main__":
    sys.exit(main())
