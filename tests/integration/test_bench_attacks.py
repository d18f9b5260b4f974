"""bench/bench_attacks.py on loopback: its key-holder helper against a real node (probes, a sealed
chunk request that a host without the key replays), and each attack's own accounting against
plain sockets, so the table measures what it says."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bench.bench_attacks import (
    HELPER,
    DatagramFlood,
    IdleConnections,
    MeshdTarget,
    Replay,
    SlowBodies,
    Target,
)
from tests.processes import Mesh, clean_env

REPO = Path(__file__).resolve().parents[2]


class FakeTarget(Target):
    """Only what the attacks read: the peer address, a preamble, a sealed request."""

    def __init__(self, port: int, sealed: dict[str, Any] | None = None) -> None:
        self.peer_addr = ("127.0.0.1", port)
        self.sealed = sealed

    def start(self) -> None: ...
    def pid(self) -> int:
        return os.getpid()

    def alive(self) -> bool:
        return True

    def api_call(self) -> None: ...
    def others_see_alive(self) -> list[bool]:
        return []

    def slow_preamble(self) -> bytes:
        return b"POST /x HTTP/1.1\r\nContent-Length: 16777216\r\n\r\n"

    def sealed_chunk_request(self) -> dict[str, Any]:
        assert self.sealed is not None
        return self.sealed

    def stop(self) -> None: ...


def helper(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**clean_env(), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(HELPER), *argv], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def attack_for(attack: Any, target: Target, seconds: float) -> None:
    stop = threading.Event()
    t = threading.Thread(target=attack.run, args=(target, stop))
    t.start()
    time.sleep(seconds)
    stop.set()
    t.join(10)
    attack.close()
    assert not t.is_alive()


def test_probe_helper_times_ping_ack_and_a_wrong_key_gets_no_ack(mesh: Mesh) -> None:
    node = mesh.node("a").start()
    common = ["--cluster", "itest", "--addr", node.addr, "--target", "a", "--duration", "1.2"]
    ok = helper("probe", "--key-file", str(mesh.key_file), *common)
    lines = [json.loads(x) for x in ok.stdout.splitlines()]
    assert len(lines) >= 4, ok.stdout + ok.stderr
    assert all(0 < x["rtt_ms"] < 1000 for x in lines), lines
    wrong = helper("probe", "--key-file", str(mesh.keygen("other.key")), *common, "--timeout", "0.3")
    lines = [json.loads(x) for x in wrong.stdout.splitlines()]
    assert lines, wrong.stdout + wrong.stderr
    assert all(x == {"lost": True} for x in lines), lines


def test_sealed_chunk_request_is_made_by_the_trees_client_and_replayed_without_the_key(
    mesh: Mesh, tmp_path: Path
) -> None:
    node = mesh.node("a").start()
    (tmp_path / "release.bin").write_bytes(os.urandom(300_000))
    mesh.run_meshd("keygen", "publisher", "--out", str(tmp_path / "pub.key"), check=True)
    published = node.meshctl(
        "publish", str(tmp_path / "release.bin"), "--name", "r", "--version", "1",
        "--key", str(tmp_path / "pub.key"), token=True,
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    out = helper(
        "seal-chunks", "--key-file", str(mesh.key_file), "--cluster", "itest",
        "--addr", node.addr, "--data-dir", str(node.data_dir),
    )  # fmt: skip
    sealed = json.loads(out.stdout.splitlines()[-1])
    assert sealed["status"] == "ok", sealed  # the node served the tree's own request
    assert sealed["path"] == "/peer/v1/chunks"
    assert sealed["ids"] >= 2

    replay = Replay(5)
    attack_for(replay, FakeTarget(node.port, sealed), 3.0)
    assert sum(replay.statuses.values()) == 5
    assert (replay.served > 0) == (200 in replay.statuses)
    assert replay.outcome().endswith(f"{replay.served / 1e6:.0f} MB served in {replay.seconds:.1f} s")


def test_idle_connections_counts_opened_and_closed_by_the_server() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(128)
        attack = IdleConnections(40)
        stop = threading.Event()
        t = threading.Thread(target=attack.run, args=(FakeTarget(srv.getsockname()[1]), stop))
        t.start()
        accepted: list[socket.socket] = []
        srv.settimeout(5)
        while len(accepted) < 40:
            accepted.append(srv.accept()[0])
        for c in accepted[:7]:  # the "node" closes 7 of them
            c.close()
        time.sleep(0.2)
        stop.set()
        t.join(10)
        attack.close()
        for c in accepted[7:]:
            c.close()
    assert len(attack.socks) == 40
    assert attack.closed_by_node == 7
    assert attack.outcome() == "40/40 opened, 7 closed by the node by the end"


def test_datagram_flood_keeps_to_its_rate() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        flood = DatagramFlood(2000)
        attack_for(flood, FakeTarget(rx.getsockname()[1]), 1.0)
        rx.setblocking(False)
        got = 0
        while True:
            try:
                rx.recv(2048)
                got += 1
            except BlockingIOError:
                break
    assert got == flood.sent
    assert flood.sent <= 2000 * flood.seconds * 1.1 + 20  # paced, not as fast as it can
    assert flood.sent >= 2000 * flood.seconds * 0.3  # and it does send (a loaded machine slows it)


def test_slow_bodies_trickle_at_their_rate_and_reconnect_when_dropped() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        port = srv.getsockname()[1]
        accepts = [0]

        def drop_after_first_read() -> None:
            srv.settimeout(0.2)
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                try:
                    c, _ = srv.accept()
                except TimeoutError:
                    continue
                accepts[0] += 1
                time.sleep(0.3)
                c.close()  # a node that drops the uploader

        server = threading.Thread(target=drop_after_first_read)
        server.start()
        slow = SlowBodies(2, 8192, lambda t: t.slow_preamble())
        attack_for(slow, FakeTarget(port), 2.0)
        server.join(5)
    assert slow.dropped >= 1  # noticed the close
    assert accepts[0] > 2  # and came back: two clients, more connections
    assert 0 < slow.sent <= 2 * 8192 * 2.0 + 8192  # at most the rate, per client


FAKE_MESHD = """import sys
from pathlib import Path
args = sys.argv[1:]
if "--data-dir" in args:  # `meshd run`: say where this code lives, then exit
    d = Path(args[args.index("--data-dir") + 1])
    d.mkdir(parents=True, exist_ok=True)
    (d / "ran-from").write_text(__file__)
else:
    print(__file__)
"""


def test_nodes_and_tree_commands_run_the_trees_code_even_from_another_checkout(
    tmp_path: Path, monkeypatch: Any
) -> None:
    tree = tmp_path / "tree"
    for pkg in ("meshd", "meshd/cli"):
        (tree / pkg).mkdir(parents=True)
        (tree / pkg / "__init__.py").write_text("")
    (tree / "meshd/cli/meshd.py").write_text(FAKE_MESHD)
    monkeypatch.chdir(REPO)  # a checkout with its own meshd/ in the working directory
    target = MeshdTarget("t", tree, tmp_path / "work", "a2V5", set(), argparse.Namespace(node_nofile=0))
    try:
        with pytest.raises(RuntimeError, match="exited"):
            target.start()
    finally:
        target.stop()
    ran = (tmp_path / "work" / "m00" / "ran-from").read_text()
    assert ran == str(tree / "meshd/cli/meshd.py")
    assert target._tree_cmd("meshd.cli.meshd", "keygen").strip() == str(tree / "meshd/cli/meshd.py")
