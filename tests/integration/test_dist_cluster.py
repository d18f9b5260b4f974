"""Update distribution with 6 real `meshd run` processes on 127.0.0.1.

A 64 MB release published at one node reaches all of them byte-exact; a node killed with
SIGKILL mid-download resumes from what it verified; a version with 2% changed moves only the
changed chunks.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.processes import Mesh, NodeProc

pytestmark = pytest.mark.integration

SIZE = 64 * 1024 * 1024
NAME = "fw"


def make_blob(seed: int) -> bytearray:
    """Incompressible in 1 MiB blocks with compressible gaps (a firmware-like mix)."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < SIZE:
        out += rnd.randbytes(768 * 1024)
        out += bytes(256 * 1024)
    return out[:SIZE]


def releases(node: NodeProc) -> list[dict[str, Any]]:
    try:
        return list(node.get("/v1/releases")["releases"])
    except (OSError, ValueError):
        return []


def row(node: NodeProc, version: str) -> dict[str, Any] | None:
    for r in releases(node):
        if r["name"] == NAME and r["version"] == version:
            return r
    return None


def active(node: NodeProc, version: str) -> bool:
    r = row(node, version)
    return r is not None and r["state"] == "active" and bool(r["current"])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def received(node: NodeProc) -> int:
    return int(node.get("/v1/status")["transfer"]["received_bytes"])


@pytest.mark.timeout(240)
def test_release_reaches_six_nodes_resumes_and_deltas(mesh: Mesh, tmp_path: Path) -> None:
    pub_key = tmp_path / "publisher.key"
    mesh.run_meshd("keygen", "publisher", "--out", str(pub_key), check=True)
    slow_cfg = tmp_path / "slow.toml"
    slow_cfg.write_text('[dist]\ndownload_rate = "6MB"\n')
    trust = ["--trust-publisher", f"{pub_key}.pub"]
    nodes = [mesh.node(f"d{i}") for i in range(6)]
    nodes[0].start(extra=trust)
    for n in nodes[1:5]:
        n.start(join=[nodes[0].addr], extra=trust)
    slow = nodes[5]
    slow.start(join=[nodes[0].addr], extra=[*trust, "--config", str(slow_cfg)])
    mesh.wait_until(
        "6 alive members",
        lambda: all(sum(1 for s in n.states().values() if s == "alive") == 6 for n in nodes),
    )

    blob = make_blob(1)
    src = tmp_path / "src" / "fw.img"
    src.parent.mkdir()
    src.write_bytes(blob)
    want = hashlib.sha256(blob).hexdigest()
    out = nodes[0].meshctl(
        "publish", str(src), "--name", NAME, "--version", "1.0", "--key", str(pub_key), "--json", token=True
    )
    assert out.returncode == 0, out.stderr
    published = json.loads(out.stdout)
    assert published["size"] == SIZE
    assert published["name"] == NAME

    # kill -9 the slow node mid-download, then start it again on the same data dir.
    total = published["chunks"]
    mesh.wait_until(
        "slow node mid-download",
        lambda: (row(slow, "1.0") or {}).get("have_chunks", 0) >= total // 4,
        timeout=60,
    )
    before_kill = row(slow, "1.0")
    assert before_kill is not None
    assert before_kill["have_chunks"] < total
    first_run = received(slow)
    slow.signal(signal.SIGKILL)
    slow.wait_exit()
    slow.start(join=[nodes[0].addr], extra=trust)  # without the rate cap this time
    mesh.wait_until("restarted node lists the release", lambda: row(slow, "1.0") is not None)
    resumed = row(slow, "1.0")
    assert resumed is not None
    assert resumed["have_chunks"] >= before_kill["have_chunks"]

    mesh.wait_until("all nodes active on 1.0", lambda: all(active(n, "1.0") for n in nodes), timeout=120)
    for n in nodes:
        path = n.data_dir / "releases" / NAME / "current" / "fw.img"
        assert file_digest(path) == want, n.name
    # The restarted node fetched only what it lacked (stored bytes < the release size).
    assert first_run > 0
    assert received(slow) < published["stored_bytes"]
    mesh.wait_until(
        "gossip shows 6 holders everywhere",
        lambda: all((row(n, "1.0") or {}).get("nodes_complete") == 6 for n in nodes),
    )
    status = nodes[0].get("/v1/status")
    assert status["transfer"]["sent_bytes"] > 0
    assert status["transfer"]["origin_bytes"] == 0

    out = nodes[2].meshctl("releases", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["releases"]
    assert any(r["version"] == "1.0" and r["nodes_complete"] == 6 for r in rows)
    out = nodes[2].meshctl("releases")
    assert out.returncode == 0
    assert "1.0" in out.stdout
    assert NAME in out.stdout

    # A delta: 2% of the image changes in one place.
    before = {n.name: received(n) for n in nodes}
    start = SIZE // 2
    blob[start : start + SIZE // 50] = random.Random(2).randbytes(SIZE // 50)
    src.write_bytes(blob)
    out = nodes[0].meshctl(
        "publish", str(src), "--name", NAME, "--version", "1.1", "--key", str(pub_key), "--json", token=True
    )
    assert out.returncode == 0, out.stderr
    delta = json.loads(out.stdout)
    t0 = time.monotonic()
    mesh.wait_until("all nodes active on 1.1", lambda: all(active(n, "1.1") for n in nodes), timeout=60)
    took = time.monotonic() - t0
    want2 = hashlib.sha256(blob).hexdigest()
    for n in nodes:
        assert file_digest(n.data_dir / "releases" / NAME / "current" / "fw.img") == want2
        if n is nodes[0]:
            continue
        moved = received(n) - before[n.name]
        # Only the new chunks (what the publisher stored anew), nothing of the 98% unchanged.
        # A delta this small is all endgame, where a chunk may be asked of two peers at once.
        assert 0 < moved <= delta["stored_bytes"] * 2 + 65536, (n.name, moved, delta)
        assert moved < 0.05 * SIZE
    assert delta["new_chunks"] < 0.05 * delta["chunks"]
    print(f"delta {delta['stored_bytes']} bytes in {delta['new_chunks']} chunks, spread in {took:.1f}s")
