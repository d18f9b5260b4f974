"""Health-query latency: meshd against HashiCorp Serf, side by side in one run on 127.0.0.1.

Both systems run N nodes (default 16) with the same timing preset (`--profile`, default lan)
and the same kind of cluster key. Then the same question is asked again and again: "every
node, how healthy are you?", and the clock measures the time until every node's answer is in.

- meshd: `GET /v1/health` on one node (the asking node rotates), no filter, default timeout.
  The query completes as soon as every alive node has answered. Reported: the wall time of the
  HTTP call, the node's own `elapsed_ms`, and whether all N answered.
- serf: agents started with `-event-handler query:health=SCRIPT` (the script prints a small
  JSON health answer); `serf query health` from the CLI against one agent (rotating), with
  Serf's default timeout (gossip interval x 16 x ceil(log10(N+1)): 6.4 s for 10..99 nodes at
  lan). Serf always waits the timeout out; its output lines are timestamped as they arrive,
  so the table shows both when the last answer came in and when the command returned (what a
  script calling `serf query` waits for).

Every process is started in its own session and killed (the whole group) when the run ends,
whatever happens; the run is bounded (start-up and convergence deadlines). Nothing leaves
loopback: every address is 127.0.0.1 and mDNS is off.

    python bench/bench_queries.py                     # 16 nodes, lan, 5 queries per system
    python bench/bench_queries.py --nodes 20 --repeats 10 --profile local
    python bench/bench_queries.py --systems meshd     # without serf

Writes a Markdown table to bench/results/queries.md (--out) and to standard output.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.benchstats import environment, json_path, write_json  # noqa: E402

HOST = "127.0.0.1"
START_DEADLINE = 90.0  # every node's API/RPC answers
CONVERGE_DEADLINE = 90.0  # every node lists every other alive
SERF_GOSSIP_INTERVAL = {"lan": 0.2, "wan": 0.5, "local": 0.1}  # memberlist presets
SERF_QUERY_TIMEOUT_MULT = 16

SERF_HANDLER = """#!/bin/sh
# serf query handler: a small health answer, like meshd's (stdout is the response)
cat >/dev/null
printf '{"name":"%s","status":"passing","checks":[]}' "$SERF_SELF_NAME"
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port(taken: set[int]) -> int:
    """A port free on 127.0.0.1 for TCP and UDP (gossip uses both)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((HOST, 0))
            port = int(t.getsockname()[1])
            if port in taken:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((HOST, port))
                except OSError:
                    continue
        taken.add(port)
        return port
    raise RuntimeError("no free port on 127.0.0.1")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tail(self, n: int = 10) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


SPAWNED: list[Proc] = []


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> Proc:
    with open(log_path, "wb") as fh:
        popen = subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    proc = Proc(name, popen, log_path)
    SPAWNED.append(proc)
    return proc


def kill_all() -> None:
    for p in SPAWNED:
        p.kill()
    SPAWNED.clear()


def wait_for(what: str, pred: Callable[[], bool], deadline: float, procs: list[Proc]) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        dead = [p for p in procs if p.popen.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead[0].name} exited while waiting for {what}:\n{dead[0].tail()}")
        if pred():
            return
        time.sleep(0.25)
    raise RuntimeError(f"timed out after {deadline:.0f}s waiting for {what}")


def http_json(url: str, timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class Sample:
    all_in_s: float  # time until every node's answer was in
    returned_s: float  # time until the call returned
    answers: int
    missing: list[str] = field(default_factory=list)
    server_ms: float | None = None  # meshd's own elapsed_ms


# --- meshd ----------------------------------------------------------------------------------------


class MeshdCluster:
    def __init__(self, n: int, profile: str, workdir: Path, key_b64: str, taken: set[int]) -> None:
        self.n, self.profile, self.workdir = n, profile, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.key_file = workdir / "cluster.key"
        self.key_file.write_text(key_b64 + "\n")
        self.key_file.chmod(0o600)
        self.ports = [free_port(taken) for _ in range(n)]
        self.api_ports = [free_port(taken) for _ in range(n)]
        self.procs: list[Proc] = []

    def name(self, i: int) -> str:
        return f"m{i:02d}"

    def api(self, i: int) -> str:
        return f"http://{HOST}:{self.api_ports[i]}"

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env = {k: v for k, v in env.items() if not k.startswith("MESHD_")}
        seed = f"{HOST}:{self.ports[0]}"
        for i in range(self.n):
            argv = [
                sys.executable,
                "-m",
                "meshd.cli.meshd",
                "run",
                "--name",
                self.name(i),
                "--bind",
                f"{HOST}:{self.ports[i]}",
                "--api",
                f"{HOST}:{self.api_ports[i]}",
                "--data-dir",
                str(self.workdir / self.name(i)),
                "--profile",
                self.profile,
                "--no-mdns",
                "--cluster-key-file",
                str(self.key_file),
                "--cluster",
                "bench",
                "--site",
                f"site{i % 3}",
                "--log-level",
                "warning",
            ]
            if i:
                argv += ["--join", seed]
            self.procs.append(spawn(self.name(i), argv, self.workdir / f"{self.name(i)}.log", env))
        wait_for(
            "every meshd API", lambda: all(self._up(i) for i in range(self.n)), START_DEADLINE, self.procs
        )
        names = {self.name(i) for i in range(self.n)}
        wait_for(
            "meshd convergence (all alive, health known everywhere)",
            lambda: all(self._converged(i, names) for i in range(self.n)),
            CONVERGE_DEADLINE,
            self.procs,
        )

    def _up(self, i: int) -> bool:
        try:
            http_json(self.api(i) + "/healthz", 2)
            return True
        except OSError:
            return False

    def _converged(self, i: int, names: set[str]) -> bool:
        try:
            members = http_json(self.api(i) + "/v1/members", 5)["members"]
        except (OSError, ValueError):
            return False
        return {m["name"] for m in members if m["state"] == "alive" and m["health"] != "unknown"} == names

    def ask(self, origin: int) -> Sample:
        started = time.monotonic()
        doc = http_json(self.api(origin) + "/v1/health", 60)
        wall = time.monotonic() - started
        return Sample(wall, wall, len(doc["responses"]), list(doc["missing"]), float(doc["elapsed_ms"]))

    def stop(self) -> None:
        for p in self.procs:
            p.kill()


# --- serf ----------------------------------------------------------------------------------------


class SerfCluster:
    def __init__(
        self, n: int, profile: str, workdir: Path, key_b64: str, taken: set[int], serf_bin: str
    ) -> None:
        self.n, self.profile, self.workdir, self.key = n, profile, workdir, key_b64
        self.serf = serf_bin
        workdir.mkdir(parents=True, exist_ok=True)
        self.ports = [free_port(taken) for _ in range(n)]
        self.rpc_ports = [free_port(taken) for _ in range(n)]
        self.handler = workdir / "health-handler.sh"
        self.handler.write_text(SERF_HANDLER)
        self.handler.chmod(0o755)
        self.procs: list[Proc] = []

    def name(self, i: int) -> str:
        return f"s{i:02d}"

    def rpc(self, i: int) -> str:
        return f"{HOST}:{self.rpc_ports[i]}"

    def default_timeout(self) -> float:
        import math

        return (
            SERF_GOSSIP_INTERVAL[self.profile]
            * SERF_QUERY_TIMEOUT_MULT
            * max(1, math.ceil(math.log10(self.n + 1)))
        )

    def start(self) -> None:
        seed = f"{HOST}:{self.ports[0]}"
        for i in range(self.n):
            argv = [
                self.serf,
                "agent",
                f"-node={self.name(i)}",
                f"-bind={HOST}:{self.ports[i]}",
                f"-rpc-addr={self.rpc(i)}",
                f"-profile={self.profile}",
                f"-encrypt={self.key}",
                f"-event-handler=query:health={self.handler}",
                "-log-level=warn",
                f"-tag=site=site{i % 3}",
            ]
            if i:
                argv.append(f"-join={seed}")
            self.procs.append(spawn(self.name(i), argv, self.workdir / f"{self.name(i)}.log"))
            if i == 0:  # serf gives up at once when its -join seed is not listening yet
                wait_for("the serf seed", lambda: bool(self._alive(0)), START_DEADLINE, self.procs)
        names = {self.name(i) for i in range(self.n)}
        wait_for(
            "serf convergence (all alive everywhere)",
            lambda: all(self._alive(i) == names for i in range(self.n)),
            START_DEADLINE + CONVERGE_DEADLINE,
            self.procs,
        )

    def _alive(self, i: int) -> set[str]:
        try:
            out = subprocess.run(
                [self.serf, "members", f"-rpc-addr={self.rpc(i)}", "-format=json"],
                capture_output=True,
                timeout=5,
                check=True,
            ).stdout
            return {m["name"] for m in json.loads(out)["members"] if m["status"] == "alive"}
        except (subprocess.SubprocessError, ValueError, KeyError, OSError):
            return set()

    def ask(self, origin: int) -> Sample:
        """`serf query health` (text output, timestamped line by line) with the default timeout."""
        argv = [self.serf, "query", f"-rpc-addr={self.rpc(origin)}", "health", ""]
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        killer = threading.Timer(self.default_timeout() + 30, lambda: proc.kill())
        killer.start()
        responders: set[str] = set()
        last = started
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("Response from '"):
                    responders.add(line.split("'")[1])
                    last = time.monotonic()
            proc.wait()
        finally:
            killer.cancel()
        returned = time.monotonic() - started
        missing = sorted({self.name(i) for i in range(self.n)} - responders)
        return Sample(last - started, returned, len(responders), missing)

    def stop(self) -> None:
        for p in self.procs:
            p.kill()


# --- the run -------------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(samples: list[Sample]) -> dict[str, Any]:
    return {
        "runs": len(samples),
        "complete": sum(1 for s in samples if not s.missing),
        "all_in_median": median([s.all_in_s for s in samples]),
        "all_in_min": min((s.all_in_s for s in samples), default=float("nan")),
        "all_in_max": max((s.all_in_s for s in samples), default=float("nan")),
        "returned_median": median([s.returned_s for s in samples]),
        "returned_min": min((s.returned_s for s in samples), default=float("nan")),
        "returned_max": max((s.returned_s for s in samples), default=float("nan")),
        "server_ms_median": median([s.server_ms for s in samples if s.server_ms is not None]),
        "answers_min": min((s.answers for s in samples), default=0),
        "samples": [asdict(s) for s in samples],
    }


def fmt_s(x: float) -> str:
    if x != x:  # nan
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def render(args: argparse.Namespace, results: dict[str, dict[str, Any]], notes: list[str]) -> str:
    lines = [
        "# Health query: time until every node's answer is in",
        "",
        f"`bench/bench_queries.py --nodes {args.nodes} --runs {args.repeats} --profile {args.profile}`"
        f", {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()} ({os.cpu_count()} CPUs), "
        f"everything on 127.0.0.1, both systems encrypted with a 32-byte key.",
        "",
        "| system | nodes | queries | complete (every node answered) | fewest answers "
        "| **every answer in**: median (min-max) | call returns: median (min-max) "
        "| node's own elapsed (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system, r in results.items():
        lines.append(
            f"| {system} | {args.nodes} | {r['runs']} | {r['complete']} of {r['runs']} | {r['answers_min']} "
            f"| {fmt_s(r['all_in_median'])} ({fmt_s(r['all_in_min'])}-{fmt_s(r['all_in_max'])}) "
            f"| {fmt_s(r['returned_median'])} ({fmt_s(r['returned_min'])}-{fmt_s(r['returned_max'])}) "
            f"| {fmt_s(r['server_ms_median'] / 1000) if system == 'meshd' else '-'} |"
        )
    if "meshd" in results and "serf" in results:
        lines += ["", headline(results["meshd"], results["serf"], args.nodes, args.profile)]
    lines += ["", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def headline(m: dict[str, Any], s: dict[str, Any], nodes: int, profile: str) -> str:
    """The protocol figure, the same measure on both sides: until the last answer is in.

    Not the call's return: `serf query` waits its timeout out whatever the answers, so a ratio
    of return times would be a ratio against serf's CLI timeout."""
    ratio = m["all_in_median"] / s["all_in_median"] if s["all_in_median"] else float("nan")
    met = m["all_in_max"] < 1.0 and ratio <= 0.2
    return (
        f"**Every answer in** ({nodes} nodes each, `{profile}` preset, 127.0.0.1, median (min-max) over "
        f"{m['runs']} / {s['runs']} queries): meshd {fmt_s(m['all_in_median'])} "
        f"({fmt_s(m['all_in_min'])}-{fmt_s(m['all_in_max'])}) against serf {fmt_s(s['all_in_median'])} "
        f"({fmt_s(s['all_in_min'])}-{fmt_s(s['all_in_max'])}): {ratio:.1%} of serf's time (goal: under 1 s "
        f"and at most 20%: {'met' if met else 'NOT met'}). Both clocks start when the query is sent "
        "(HTTP request / `serf query` launched) and stop when the last node's answer has arrived at "
        "the asker's client (meshd: the call returns with every answer; serf: its last "
        "'Response from' line). `serf query` itself returns only after its timeout; that column "
        "is shown for what a script waits, not compared."
    )


def run(args: argparse.Namespace) -> int:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    serf_bin = shutil.which(args.serf) if "serf" in systems else None
    if "serf" in systems and not serf_bin:
        log("serf not found (apt-get install serf): measuring meshd only")
        systems.remove("serf")
    key_b64 = base64.b64encode(secrets.token_bytes(32)).decode()
    workdir = Path(tempfile.mkdtemp(prefix="meshd-bench-queries-"))
    taken: set[int] = set()
    results: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    ok = True
    for system in systems:
        cluster: MeshdCluster | SerfCluster
        if system == "meshd":
            cluster = MeshdCluster(args.nodes, args.profile, workdir / "meshd", key_b64, taken)
        elif system == "serf":
            assert serf_bin is not None
            cluster = SerfCluster(args.nodes, args.profile, workdir / "serf", key_b64, taken, serf_bin)
        else:
            log(f"unknown system {system!r}")
            return 2
        try:
            log(f"{system}: starting {args.nodes} nodes ({args.profile})")
            t0 = time.monotonic()
            cluster.start()
            log(f"{system}: converged in {time.monotonic() - t0:.1f}s")
            cluster.ask(0)  # warm-up (first handler run, first connections)
            samples = []
            for k in range(args.repeats):
                origin = (k * 5 + 1) % args.nodes
                sample = cluster.ask(origin)
                samples.append(sample)
                log(
                    f"{system}: query {k + 1} from node {origin}: {sample.answers} answers, every answer "
                    f"in {fmt_s(sample.all_in_s)}, returned after {fmt_s(sample.returned_s)}"
                    + (f", missing {sample.missing}" if sample.missing else "")
                )
            results[system] = summarize(samples)
            if system == "serf":
                assert isinstance(cluster, SerfCluster)
                notes.append(
                    f"serf: `serf query health` with its default timeout, "
                    f"{cluster.default_timeout():.1f} s here (gossip interval "
                    f"{SERF_GOSSIP_INTERVAL[args.profile] * 1000:.0f} ms x 16 x "
                    f"ceil(log10({args.nodes}+1))); "
                    "it always waits the timeout out. 'Every answer in' is when its last "
                    "'Response from' line was printed. Handler: a shell script printing a small JSON answer."
                )
            else:
                notes.append(
                    "meshd: `GET /v1/health` (no filter, default timeout) on a rotating node; the "
                    "answer carries every check of every node (5 built-in checks each). 'Call returns' "
                    "is the HTTP round trip measured by the client, 'own elapsed' the node's elapsed_ms. "
                    "The asking node gossips the query and also sends it straight to each expected "
                    "member (Node.ask in the core); answers go straight back by UDP; the "
                    "health answer is built in-process (Serf forks its handler for every query)."
                )
        except Exception as e:  # a failed system is reported, the other still runs
            ok = False
            log(f"{system}: FAILED: {e}")
            notes.append(f"{system}: FAILED: {e} (logs in {cluster.workdir})")
        finally:
            cluster.stop()
    kill_all()
    if args.out:
        write_json(
            json_path(Path(args.out)),
            {
                "bench": "queries",
                "env": environment(),
                "conditions": {"nodes": args.nodes, "profile": args.profile, "runs": args.repeats},
                "results": results,
                "notes": notes,
            },
        )
    return finish(render(args, results, notes), args.out, workdir, ok, args.keep)


def finish(text: str, out: str | None, workdir: Path, ok: bool, keep: bool) -> int:
    """Print and write the results; remove the work dir unless kept or something failed."""
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        log(f"wrote {out}")
    if ok and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"work dir kept: {workdir}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=16, help="nodes per system (12..20 is the brief)")
    p.add_argument(
        "--runs", "--repeats", dest="repeats", type=int, default=5, help="measured queries per system"
    )
    p.add_argument("--profile", choices=("lan", "wan", "local"), default="lan")
    p.add_argument("--systems", default="meshd,serf", help="comma list: meshd, serf")
    p.add_argument("--serf", default="serf", help="serf binary")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "queries.md"))
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = p.parse_args(argv)
    if args.nodes < 2:
        p.error("--nodes: at least 2")
    return run_killing_all(run, args)


def run_killing_all(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """run(args); every process spawned is killed at the end, on SIGTERM/SIGINT too."""

    def on_signal(signum: int, frame: Any) -> None:
        kill_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return run(args)
    finally:
        kill_all()


if __name__ == "__main__":
    sys.exit(main())
