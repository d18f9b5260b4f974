"""Several real nodes on loopback: join, kill -9, SIGTERM leave, rejoin from the snapshot,
key rotation through meshctl, a node with the wrong key kept out, and the CLI/API against them."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable

import pytest

from tests.metrics_text import sample
from tests.processes import InProcessStarter, Mesh, NodeProc

pytestmark = pytest.mark.integration


def all_alive(nodes: list[NodeProc], names: set[str]) -> bool:
    for n in nodes:
        states = n.states()
        if {k for k, v in states.items() if v == "alive"} != names:
            return False
    return True


def snapshot_peers(n: NodeProc) -> set[str]:
    try:
        doc = json.loads((n.data_dir / "peers.json").read_text())
    except (OSError, ValueError):
        return set()
    return {p["name"] for p in doc.get("peers", [])}


@pytest.mark.timeout(150)
def test_membership_lifecycle(mesh: Mesh) -> None:
    seed = mesh.node("n1").start()
    others = [mesh.node(f"n{i}").start(join=[seed.addr]) for i in range(2, 5)]
    nodes = [seed, *others]
    names = {n.name for n in nodes}
    mesh.wait_until("every node sees every other alive", lambda: all_alive(nodes, names), 30)
    for n in nodes:
        assert n.status_code("/readyz") == 200
    status = seed.get("/v1/status")
    assert status["members"]["alive"] == 4
    assert status["addr"] == seed.addr
    assert status["cluster"] == "itest"

    n2, n3, n4 = others
    # kill -9: the others detect the failure and mark it dead.
    mesh.wait_until("n4 snapshot of its peers", lambda: snapshot_peers(n4) >= {"n1", "n2", "n3"}, 15)
    n4.signal(signal.SIGKILL)
    n4.wait_exit()
    rest = [seed, n2, n3]
    mesh.wait_until("n4 seen dead by all", lambda: all(n.states().get("n4") == "dead" for n in rest), 45)

    # SIGTERM: a graceful leave; the others list it as left, the process exits 0.
    n3.signal(signal.SIGTERM)
    assert n3.wait_exit() == 0
    mesh.wait_until("n3 seen left", lambda: all(n.states().get("n3") == "left" for n in (seed, n2)), 20)

    # Restart the killed node with no --join: it rejoins from its peer snapshot.
    n4.start()
    mesh.wait_until(
        "n4 alive again everywhere", lambda: all(n.states().get("n4") == "alive" for n in (seed, n2, n4)), 30
    )
    assert n4.states().get("n1") == "alive"
    assert n4.states().get("n2") == "alive"
    assert n4.status_code("/readyz") == 200


@pytest.mark.timeout(150)
def test_key_rotation_and_wrong_key(mesh: Mesh) -> None:
    seed = mesh.node("k1").start()
    k2 = mesh.node("k2").start(join=[seed.addr])
    k3 = mesh.node("k3").start(join=[seed.addr])
    nodes = [seed, k2, k3]
    names = {"k1", "k2", "k3"}
    mesh.wait_until("mesh formed", lambda: all_alive(nodes, names), 30)

    new_key = mesh.keygen("new.key")

    def key_ids(n: NodeProc) -> tuple[list[str], str | None]:
        doc = n.get("/v1/keys")
        return [k["id"] for k in doc["keys"]], doc["primary"]

    old_ids, old_primary = key_ids(seed)
    assert len(old_ids) == 1
    assert old_primary == old_ids[0]

    # Without the token meshctl fails clearly.
    r = seed.meshctl("keys", "install", "--key-file", str(new_key))
    assert r.returncode == 1
    assert "401" in r.stderr

    r = seed.meshctl("keys", "install", "--key-file", str(new_key), "--json", token=True)
    assert r.returncode == 0, r.stderr
    new_id = next(k["id"] for k in json.loads(r.stdout)["keys"] if k["id"] != old_primary)
    mesh.wait_until("new key installed everywhere", lambda: all(len(key_ids(n)[0]) == 2 for n in nodes), 20)

    r = k2.meshctl("keys", "use", "--key-file", str(new_key), token=True)
    assert r.returncode == 0, r.stderr
    mesh.wait_until("new key primary everywhere", lambda: all(key_ids(n)[1] == new_id for n in nodes), 20)

    old_key = mesh.key_file
    r = k3.meshctl("keys", "remove", "--key-file", str(old_key), token=True)
    assert r.returncode == 0, r.stderr
    mesh.wait_until(
        "old key removed everywhere", lambda: all(key_ids(n) == ([new_id], new_id) for n in nodes), 20
    )
    time.sleep(1.5)  # a few probe rounds under the new key
    assert all_alive(nodes, names), "rotation must not cost a member"

    # Rotation survives a restart: the keyring in the data dir wins over the (old) key file.
    k3.signal(signal.SIGTERM)
    assert k3.wait_exit() == 0
    mesh.wait_until("k3 left", lambda: seed.states().get("k3") == "left", 15)
    k3.start()  # same flags: --cluster-key-file still names the old key
    assert key_ids(k3) == ([new_id], new_id)
    mesh.wait_until("k3 back", lambda: all_alive(nodes, names), 20)

    # A node with the old (removed) key, and one with a key of its own, are kept out.
    stale = mesh.node("stale", key_file=old_key).start(join=[seed.addr])
    other_key = mesh.keygen("other.key")
    stranger = mesh.node("stranger", key_file=other_key).start(join=[seed.addr])
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        for n in nodes:
            view = n.states()
            assert "stale" not in view, view
            assert "stranger" not in view, view
        time.sleep(0.3)
    assert set(stale.states()) == {"stale"}
    assert stranger.status_code("/readyz") == 503
    # Their packets were refused and counted, not raised (their joins over TCP at the peer
    # port's gate, before the body was read; any datagrams in the core).
    metrics = seed.text("/metrics")
    refused = sample(metrics, "meshd_peer_refused_total", reason="auth")
    assert refused is not None
    assert (sample(metrics, "meshd_drops_auth_total") or 0) + refused > 0
    assert all_alive(nodes, names)


@pytest.mark.timeout(90)
def test_cli_against_a_node(mesh: Mesh) -> None:
    a = mesh.node("c1").start(extra=["--site", "north", "--tag", "role=edge"])
    b = mesh.node("c2").start(extra=["--site", "south"])
    # join through meshctl (token needed), then filters and JSON output
    r = b.meshctl("join", a.addr, token=True)
    assert r.returncode == 0, r.stderr
    mesh.wait_until("c1 and c2 see each other", lambda: all_alive([a, b], {"c1", "c2"}), 20)
    r = b.meshctl("members", "--site", "north", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [m["name"] for m in doc["members"]] == ["c1"]
    assert doc["members"][0]["tags"] == {"role": "edge"}
    r = b.meshctl("members", "--tag", "role=edge")
    assert r.returncode == 0
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["NAME", "ADDRESS", "STATE"]
    assert len(lines) == 2
    assert lines[1].split()[0] == "c1"
    r = a.meshctl("status", "--json")
    assert json.loads(r.stdout)["site"] == "north"
    # leave through the API: the node leaves and exits 0; the other sees it left
    r = a.meshctl("leave", token=True)
    assert r.returncode == 0, r.stderr
    assert a.wait_exit() == 0
    mesh.wait_until("c1 seen left", lambda: b.states().get("c1") == "left", 15)
    # a node that is not there: a clear message and exit 1
    r = a.meshctl("members")
    assert r.returncode == 1
    assert "cannot reach meshd" in r.stderr


def test_insecure_refused_off_loopback(mesh: Mesh) -> None:
    r = mesh.run_meshd(
        "run", "--insecure", "--bind", "0.0.0.0:7788", "--no-mdns", "--data-dir", str(mesh.root / "x")
    )
    assert r.returncode == 2
    assert "--insecure" in r.stderr
    assert "loopback" in r.stderr


def test_insecure_node_on_loopback(mesh: Mesh) -> None:
    n = mesh.node("i1", insecure=True)
    n.start(extra=["--insecure"], join=[n.addr])  # a shared seed list that names this node
    assert n.get("/v1/keys")["insecure"] is True
    mesh.wait_until("i1 ready", lambda: n.status_code("/readyz") == 200, 10)
    assert "alone by intent" in n.get("/readyz")["detail"]
    n.signal(signal.SIGTERM)
    assert n.wait_exit() == 0


# --- the shell in one process: runtime + UDP + peer HTTP over loopback --------------------------


async def test_runtime_pair_in_process(
    in_process_node: InProcessStarter, port_factory: Callable[[], int]
) -> None:
    import asyncio

    import aiohttp

    from meshd.core.messages import MemberState

    runtimes = [await in_process_node("r1"), await in_process_node("r2")]
    r1, r2 = runtimes
    sub = r1.subscribe()
    assert await r2.join([r1.node.addr]) == 1
    ev = await asyncio.wait_for(sub.get(), 5)
    assert ev.kind == "join"
    assert ev.member.name == "r2"
    sub.close()
    for _ in range(50):
        if all(len([m for m in rt.node.members() if m.state == MemberState.ALIVE]) == 2 for rt in runtimes):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("pair did not converge")
    await asyncio.sleep(1.5)  # probes go both ways over UDP
    assert r1.node.counters.get("msgs.in.ack", 0) > 0
    assert r1.udp is not None
    assert r1.udp.stats.received > 0
    assert r1.errors == 0
    assert r2.errors == 0
    # the peer endpoint: no token is a 401; with one, garbage is refused (400), an oversized body 413
    from meshd.net.peer_auth import AUTH_HEADER, make_token

    def auth(n: int) -> dict[str, str]:
        return {AUTH_HEADER: make_token(r1.node.codec, "POST", "/peer/v1/stream", n)}

    async with aiohttp.ClientSession() as http:
        url = f"http://{r1.node.addr}/peer/v1/stream"
        async with http.post(url, data=b"\x01garbage") as resp:
            assert resp.status == 401
        async with http.post(url, data=b"\x01garbage", headers=auth(8)) as resp:
            assert resp.status == 400
        async with http.post(url, data=b"x" * (17 * 1024 * 1024), headers=auth(17 * 1024 * 1024)) as resp:
            assert resp.status == 413
    assert r1.node.counters.get("drops.decode", 0) + r1.node.counters.get("drops.auth", 0) >= 1
    # a join to a port where nobody listens answers 0, quickly, without errors
    assert await r1.join([f"127.0.0.1:{port_factory()}"], timeout=1.0) == 0
