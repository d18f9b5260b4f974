"""ReleaseService end to end on 127.0.0.1: real stores, real aiohttp peer servers, fake membership.

Membership is faked by `Mesh` (this module's `mesh` fixture, not the process cluster of
conftest.py): each node's meta changes (the service's set_meta_keys callback) are delivered to
every other node on the next loop turn, the way gossip would.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from meshd.core.counters import Counters
from meshd.core.messages import MemberState
from meshd.core.node import MemberView
from meshd.core.swarm import SwarmConfig, make_bitmap
from meshd.crypto import Keyring, PublisherKey, aes_gcm_available, generate_publisher_keypair
from meshd.net.peer_auth import AUTH_HEADER, make_token
from meshd.release.announce import Announce, parse_announcements
from meshd.release.assembly import held_places
from meshd.release.chunker import chunk_tree, verify_stored
from meshd.release.config import DistConfig
from meshd.release.manifest import Manifest
from meshd.release.peer import (
    CHUNKS_PATH,
    CIPHER_AES,
    MAX_CHUNKS_REQUEST,
    PeerProtocolError,
    add_peer_routes,
    decode_piece,
    encode_piece,
)
from meshd.release.peer_client import PeerFetcher
from meshd.release.serve import PeerUploads
from meshd.release.service import ReleaseService
from meshd.release.store import ChunkStore
from meshd.replay import ReplayGuard, SenderClock
from meshd.wire import VERSION, VERSION_AES, Codec
from tests.fakes import FakeReleases, member, rot_chunk
from tests.local_http import serving

pytestmark = pytest.mark.integration

CLUSTER = "dtest"
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
TIMEOUT = 30.0


def data_blob(seed: int, size: int) -> bytes:
    """Half random, half compressible: realistic for lz4 and FastCDC."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rnd.randbytes(4096)
        out += bytes([rnd.randrange(256)]) * 4096
    return bytes(out[:size])


@dataclass
class TNode:
    name: str
    site: str
    tags: dict[str, str]
    root: Path
    service: ReleaseService
    mesh: Mesh
    meta: dict[str, str] = field(default_factory=dict)
    runner: web.AppRunner | None = None
    port: int = 0
    alive: bool = True

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def member(self) -> MemberView:
        state = MemberState.ALIVE if self.alive else MemberState.DEAD
        return member(self.name, state, node_id=self.name, addr=self.addr, meta=dict(self.meta))

    def set_meta_keys(self, updates: dict[str, str | None]) -> None:
        for k, v in updates.items():
            if v is None:
                self.meta.pop(k, None)
            else:
                self.meta[k] = v
        asyncio.get_running_loop().call_soon(self.mesh.gossip, self)

    def release_file(self, name: str, rel: str) -> Path:
        return self.root / "releases" / name / "current" / rel

    def row(self, rid: str) -> dict[str, Any] | None:
        for r in self.service.releases():
            if r["id"] == rid:
                return r
        return None

    def state_of(self, rid: str) -> str | None:
        row = self.row(rid)
        return row["state"] if row else None


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.nodes: list[TNode] = []
        self.events: list[dict[str, Any]] = []
        self.keys: dict[str, PublisherKey] = {}

    def key(self, label: str) -> tuple[PublisherKey, Path]:
        path = self.tmp / f"{label}.key"
        if label not in self.keys:
            self.keys[label] = generate_publisher_keypair(path)
        return self.keys[label], path

    def gossip(self, src: TNode) -> None:
        for n in self.nodes:
            if n is not src and n.alive:
                n.service.member_update(src.member())

    async def add(
        self,
        name: str,
        *,
        site: str = "a",
        tags: dict[str, str] | None = None,
        trust: tuple[str, ...] = ("pub",),
        cluster_key: bytes | None = KEY,
        config: DistConfig | None = None,
        swarm: SwarmConfig | None = None,
        root: Path | None = None,
        server_cls: type[PeerUploads] = PeerUploads,
        wall: Callable[[], float] = time.time,
    ) -> TNode:
        root = root or self.tmp / name
        # A real node's codec: it names itself (node id = name here) and refuses replays.
        ring = Keyring([cluster_key]) if cluster_key else None
        clock = SenderClock(lambda: int(wall() * 1e6))  # its stamps follow its own wall clock
        codec = Codec(CLUSTER, ring, node_id=name, guard=ReplayGuard(), clock=clock)
        cfg = config or DistConfig(fsync=False, announce_interval=0.2, origin_delay=1.0)
        node: TNode
        service = ReleaseService(
            root,
            name=name,
            site=site,
            tags=tags or {},
            codec=codec,
            trusted=[self.key(t)[0].public_key for t in trust],
            config=cfg,
            set_meta_keys=lambda u: node.set_meta_keys(u),
            emit=self.events.append,
            swarm_config=swarm or SwarmConfig(origin_delay=cfg.origin_delay, timeout_min=3.0),
            wall=wall,
        )
        service.server.__class__ = server_cls  # a lying server for some tests
        node = TNode(name, site, tags or {}, root, service, self)
        node.meta = {"site": site, **{f"tag:{k}": v for k, v in (tags or {}).items()}}
        app = web.Application()
        service.add_routes(app)
        node.runner = web.AppRunner(app, access_log=None)
        await node.runner.setup()
        site_ = web.TCPSite(node.runner, "127.0.0.1", 0)
        await site_.start()
        node.port = site_._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.nodes.append(node)
        await service.start([n.member() for n in self.nodes if n is not node and n.alive])
        self.gossip(node)
        return node

    async def kill(self, node: TNode) -> None:
        """Stop a node and tell the others it is dead."""
        node.alive = False
        await node.service.stop()
        if node.runner is not None:
            await node.runner.cleanup()
        self.nodes.remove(node)
        for n in self.nodes:
            n.service.member_update(node.member())

    async def close(self) -> None:
        for n in list(self.nodes):
            await n.service.stop()
            if n.runner is not None:
                await n.runner.cleanup()
        # No task of any service died of an unexpected exception.
        assert all(not n.service.counters.get("errors") for n in self.nodes)


@pytest.fixture
async def mesh(tmp_path: Path) -> Any:
    m = Mesh(tmp_path)
    yield m
    await m.close()


async def wait_for(cond: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


async def publish(node: TNode, src: Path, version: str, key: str = "pub", **kw: Any) -> str:
    _, key_path = node.mesh.key(key)
    info = await node.service.publish(src, "app", version, key_path, **kw)
    return str(info["id"])


async def slow_node(mesh: Mesh, name: str) -> TNode:
    """A node that fetches at 1 MB/s in small pieces: a test can stop it part way."""
    slow = DistConfig(fsync=False, announce_interval=0.2, download_rate=1_000_000)
    swarm = SwarmConfig(rate_limit=1_000_000, rate_burst=0, piece_target=256 * 1024, piece_max=512 * 1024)
    return await mesh.add(name, config=slow, swarm=swarm)


# --- the happy path ------------------------------------------------------------------------------


async def test_release_spreads_from_peers_byte_exact(mesh: Mesh, tmp_path: Path) -> None:
    n0 = await mesh.add("n0")
    n1 = await mesh.add("n1")
    n2 = await mesh.add("n2")
    blob = data_blob(1, 5_000_000)
    src = write_file(tmp_path / "src" / "app.bin", blob)
    rid = await publish(n0, src, "1.0")
    for n in (n0, n1, n2):
        await wait_for(lambda n=n: n.state_of(rid) == "active", what=f"{n.name} active")  # type: ignore[misc]
        assert n.release_file("app", "app.bin").read_bytes() == blob
    # From peers only; every chunk verified; nothing from an origin.
    assert n1.service.transfer.received_bytes > 0
    assert n2.service.transfer.received_bytes > 0
    assert n1.service.transfer.origin_bytes == 0
    assert n2.service.transfer.origin_bytes == 0
    assert n0.service.transfer.sent_bytes > 0
    # Gossip said who has it: every node sees three complete holders and three currents.
    await wait_for(lambda: all(n.row(rid)["nodes_complete"] == 3 for n in (n0, n1, n2)))  # type: ignore[index]
    await wait_for(lambda: n2.row(rid)["current_on"] == ["n0", "n1", "n2"])  # type: ignore[index]
    row = n2.row(rid)
    assert row is not None
    assert row["current"]
    assert row["have_chunks"] == row["chunks"]
    assert row["size"] == len(blob)
    ann = parse_announcements(n1.meta)
    assert [a.complete and a.current for a in ann.values()] == [True]
    states = [(e["node"], e["state"]) for e in mesh.events if e["id"] == rid]
    assert ("n1", "downloading") in states
    assert ("n1", "complete") in states
    assert ("n1", "active") in states


async def test_directory_release_and_late_joiner(mesh: Mesh, tmp_path: Path) -> None:
    n0 = await mesh.add("n0")
    src = tmp_path / "tree"
    write_file(src / "bin" / "agent", data_blob(2, 400_000))
    write_file(src / "etc" / "agent.conf", b"x=1\n")
    os.chmod(src / "bin" / "agent", 0o755)
    rid = await publish(n0, src, "2.0")
    n1 = await mesh.add("n1")  # joins after the publish: learns from n0's metadata
    await wait_for(lambda: n1.state_of(rid) == "active")
    base = n1.root / "releases" / "app" / "current"
    assert (base / "bin" / "agent").read_bytes() == (src / "bin" / "agent").read_bytes()
    assert (base / "etc" / "agent.conf").read_bytes() == b"x=1\n"
    assert os.stat(base / "bin" / "agent").st_mode & 0o777 == 0o755


# --- authentication ------------------------------------------------------------------------------


async def test_node_without_the_cluster_key_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    n0 = await mesh.add("n0")
    rid = await publish(n0, write_file(tmp_path / "s" / "f", data_blob(3, 300_000)), "1.0")
    stranger = await mesh.add("stranger", cluster_key=OTHER_KEY)
    await asyncio.sleep(1.0)
    assert stranger.row(rid) is None
    assert stranger.service.counters.get("discover.errors", 0) >= 1
    assert n0.service.counters.get("serve.drops.auth", 0) >= 1
    # Chunk requests sealed with another key, or with no key at all, are refused too.
    ids = list(n0.service._manifests[rid].chunks)[:2]
    for codec in (Codec(CLUSTER, Keyring([OTHER_KEY])), Codec(CLUSTER, None), Codec("other", Keyring([KEY]))):
        fetcher = PeerFetcher(codec, Counters())
        with pytest.raises(PeerProtocolError, match=r"40[13]"):
            await fetcher.chunks(n0.addr, ids, [65536, 65536], 5.0)
        with pytest.raises(PeerProtocolError, match=r"40[13]"):
            await fetcher.manifest(n0.addr, rid)
        await fetcher.close()
    # A GET with no token at all is a 401; a token for another path a 403.
    fetcher = PeerFetcher(Codec(CLUSTER, Keyring([KEY]), node_id="n9"), Counters())
    sess = fetcher.session()
    async with sess.get(f"http://{n0.addr}/peer/v1/manifests/{rid}") as resp:
        assert resp.status == 401
    token = make_token(fetcher.codec, "GET", "/peer/v1/manifests/" + "0" * 64)
    async with sess.get(f"http://{n0.addr}/peer/v1/manifests/{rid}", headers={AUTH_HEADER: token}) as resp:
        assert resp.status == 403
    # With the key it works, and the answer is sealed (not the manifest in the clear).
    doc = await fetcher.manifest(n0.addr, rid[:16])
    assert doc is not None
    assert Manifest.from_bytes(doc).release_id == rid
    await fetcher.close()
    assert n0.service.counters["serve.drops.auth"] >= 8


async def test_oversized_and_garbage_requests(mesh: Mesh) -> None:
    n0 = await mesh.add("n0")
    codec = n0.service.codec
    sess = PeerFetcher(codec, Counters()).session()
    url = f"http://{n0.addr}{CHUNKS_PATH}"

    def auth(body: bytes) -> dict[str, str]:
        return {AUTH_HEADER: make_token(codec, "POST", CHUNKS_PATH, len(body))}

    big = b"\x01" * (MAX_CHUNKS_REQUEST + 10)
    async with sess.post(url, data=big, headers=auth(big)) as resp:
        assert resp.status == 413
    async with sess.post(url, data=b"garbage", headers=auth(b"garbage")) as resp:
        assert resp.status == 400
    too_many = codec.seal(orjson.dumps({"ids": ["a" * 64] * 2000}))
    async with sess.post(url, data=too_many, headers=auth(too_many)) as resp:
        assert resp.status == 413
    bad_ids = codec.seal(orjson.dumps({"ids": ["../etc/passwd"]}))
    async with sess.post(url, data=bad_ids, headers=auth(bad_ids)) as resp:
        assert resp.status == 400
    # A token for another length, or a chunked body, is refused before the body is read.
    async with sess.post(url, data=bad_ids, headers=auth(bad_ids + b"x")) as resp:
        assert resp.status == 403

    async def chunked() -> AsyncIterator[bytes]:
        yield bad_ids

    async with sess.post(url, data=chunked(), headers=auth(bad_ids)) as resp:
        assert resp.status == 411
    await sess.close()
    c = n0.service.counters
    assert c["serve.drops.too_big"] == 2
    assert c["serve.drops.decode"] == 2
    assert c["serve.drops.auth"] == 1
    assert c["serve.drops.bad_request"] == 1


async def test_a_recorded_chunk_request_is_served_once_and_only_where_it_was_sent(
    mesh: Mesh, tmp_path: Path
) -> None:
    # Issue 9: one sealed chunk request replayed 200 times by a host without the key served
    # 838 MB. Now the token and the body are envelopes with a stamp, a sender and a receiver.
    n0 = await mesh.add("n0")
    n2 = await mesh.add("n2")
    rid = await publish(n0, write_file(tmp_path / "src" / "app.bin", data_blob(7, 2_000_000)), "1.0")
    ids = Manifest.from_bytes(n0.service.manifest_bytes(rid)).unique_chunks()[:8]
    sender = Codec(CLUSTER, Keyring([KEY]), node_id="n1")  # what n1 sent n0, recorded on the wire
    body = sender.seal(orjson.dumps({"ids": ids}), "n0")
    headers = {AUTH_HEADER: make_token(sender, "POST", CHUNKS_PATH, len(body), to="n0")}
    async with aiohttp.ClientSession() as sess:  # the replayer: no key, just the bytes
        url = f"http://{n0.addr}{CHUNKS_PATH}"
        async with sess.post(url, data=body, headers=headers) as resp:
            assert resp.status == 200
            first = len(await resp.read())
        assert first > 100_000
        statuses, replayed_bytes = [], 0
        for _ in range(200):
            async with sess.post(url, data=body, headers=headers) as resp:
                statuses.append(resp.status)
                replayed_bytes += len(await resp.read())
        async with sess.post(f"http://{n2.addr}{CHUNKS_PATH}", data=body, headers=headers) as resp:
            elsewhere = resp.status
    assert set(statuses) == {403}
    assert replayed_bytes == 0  # one answer, not 201
    assert elsewhere == 403  # sealed for n0: good at n0 only
    assert n0.service.counters["serve.drops.auth"] == 200


needs_aes = pytest.mark.skipif(
    not aes_gcm_available(), reason="this CPU has no AES instructions: libsodium's AES-256-GCM is off"
)


@needs_aes
async def test_a_piece_comes_in_the_cipher_its_requester_asked_for(mesh: Mesh, tmp_path: Path) -> None:
    n0 = await mesh.add("n0")
    rid = await publish(n0, write_file(tmp_path / "src" / "app.bin", data_blob(3, 1_000_000)), "1.0")
    ids = Manifest.from_bytes(n0.service.manifest_bytes(rid)).unique_chunks()[:6]
    asker = Codec(CLUSTER, Keyring([KEY]), node_id="n1")

    async def ask(sess: aiohttp.ClientSession, doc: dict[str, Any]) -> bytearray:
        body = asker.seal(orjson.dumps(doc), "n0")
        headers = {AUTH_HEADER: make_token(asker, "POST", CHUNKS_PATH, len(body), to="n0")}
        async with sess.post(f"http://{n0.addr}{CHUNKS_PATH}", data=body, headers=headers) as resp:
            assert resp.status == 200
            return bytearray(await resp.read())

    async with aiohttp.ClientSession() as sess:
        answers = {
            "asked": await ask(sess, {"ids": ids, "cipher": CIPHER_AES}),
            "not asked (a node from before)": await ask(sess, {"ids": ids}),
            "asked for one it does not know": await ask(sess, {"ids": ids, "cipher": "rot13"}),
        }
        n0.service.codec._aes = False  # a server without AES instructions
        answers["asked a server that cannot"] = await ask(sess, {"ids": ids, "cipher": CIPHER_AES})
    versions = {what: sealed[0] for what, sealed in answers.items()}
    assert versions == {
        "asked": VERSION_AES,
        "not asked (a node from before)": VERSION,
        "asked for one it does not know": VERSION,
        "asked a server that cannot": VERSION,
    }
    for sealed in answers.values():
        stored = decode_piece(asker.open_view(sealed), len(ids))
        for cid, form in zip(ids, stored, strict=True):
            assert form is not None
            verify_stored(cid, form)


@needs_aes
async def test_nodes_with_and_without_aes_fetch_from_each_other(mesh: Mesh, tmp_path: Path) -> None:
    n0 = await mesh.add("n0")
    old = await mesh.add("old")
    new = await mesh.add("new")
    n0.service.codec._aes = old.service.codec._aes = False  # they ask for and answer version 2
    blob = data_blob(4, 4_000_000)
    rid = await publish(n0, write_file(tmp_path / "src" / "app.bin", blob), "1.0")
    for n in (old, new):
        await wait_for(lambda n=n: n.state_of(rid) == "active", what=f"{n.name} active")  # type: ignore[misc]
        assert n.release_file("app", "app.bin").read_bytes() == blob
    assert old.service.transfer.received_bytes > 0
    assert new.service.transfer.received_bytes > 0
    assert not any(
        n.service.counters[k] for n in (old, new) for k in ("fetch.drops.auth", "fetch.drops.decode")
    )


async def test_far_site_gets_about_one_copy_over_the_site_link(mesh: Mesh, tmp_path: Path) -> None:
    hq = await mesh.add("hq", site="hq")
    hq2 = await mesh.add("hq2", site="hq")
    far = [await mesh.add(f"far{i}", site="far") for i in range(3)]
    blob = data_blob(12, 6_000_000)
    rid = await publish(hq, write_file(tmp_path / "s" / "f.bin", blob), "1.0")
    for n in (hq2, *far):
        await wait_for(lambda n=n: n.state_of(rid) == "active")  # type: ignore[misc]
        assert n.release_file("app", "f.bin").read_bytes() == blob
    stored = sum(len(hq.service.store.get_stored(c)) for c in hq.service._manifests[rid].chunks)
    wan = sum(n.service.counters.get("fetch.bytes.other_site", 0) for n in far)
    lan = sum(n.service.counters.get("fetch.bytes.same_site", 0) for n in far)
    # Three copies reached the far site; about one of them crossed the site link.
    assert wan + lan >= 3 * stored * 0.99
    print(f"site link carried {wan / stored:.2f} copies, the far LAN {lan / stored:.2f}")
    assert wan <= 1.5 * stored, (wan / stored, lan / stored)


# --- lying and broken peers ----------------------------------------------------------------------


class LyingServer(PeerUploads):
    """Serves chunks with one byte flipped (a peer with bad bytes, or an attacker)."""

    async def read_piece(self, ids: list[str], room: int, tail: int = 0) -> bytearray:
        body = await super().read_piece(ids, room, tail)
        entries = decode_piece(memoryview(body)[room : len(body) - tail], len(ids))
        for entry in entries:
            if entry is not None:
                entry[-1] ^= 0xFF
        return body


async def test_peer_serving_wrong_bytes_is_banned_and_chunks_refetched(mesh: Mesh, tmp_path: Path) -> None:
    n0 = await mesh.add("n0", site="far")
    blob = data_blob(4, 3_000_000)
    rid = await publish(n0, write_file(tmp_path / "s" / "f.bin", blob), "1.0")
    liar = await mesh.add("liar", site="near", server_cls=LyingServer)
    await wait_for(lambda: liar.state_of(rid) == "active")
    # n2 is in the liar's site: same site first sends it to the liar, who gets banned.
    n2 = await mesh.add("n2", site="near")
    await wait_for(lambda: n2.state_of(rid) == "active")
    assert n2.release_file("app", "f.bin").read_bytes() == blob
    assert n2.service.counters.get("fetch.bans", 0) == 1
    assert n2.service.counters.get("fetch.bad_hash", 0) >= 1
    assert n2.service.store.counters["chunks.rejected"] >= 1


async def test_bit_rot_in_a_peer_store_is_dropped_and_repaired(mesh: Mesh, tmp_path: Path) -> None:
    n0 = await mesh.add("n0", site="far")
    blob = data_blob(5, 1_500_000)
    rid = await publish(n0, write_file(tmp_path / "s" / "f.bin", blob), "1.0")
    n1 = await mesh.add("n1", site="near")
    await wait_for(lambda: n1.state_of(rid) == "active")
    victim = next(iter(n0.service._manifests[rid].chunks))
    rot_chunk(n1.service.store, victim)
    n2 = await mesh.add("n2", site="near")
    await wait_for(lambda: n2.state_of(rid) == "active")
    assert n2.release_file("app", "f.bin").read_bytes() == blob
    # n1 noticed while serving, dropped the chunk and fetched it again.
    await wait_for(lambda: n1.service.counters.get("store.damaged", 0) == 1)
    await wait_for(lambda: n1.service.store.has(victim) and n1.state_of(rid) == "active")
    n1.service.store.get(victim)  # verified read


async def _raw_http_server(answer: Callable[[bytes], bytes]) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        writer.write(answer(body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


async def test_truncated_oversized_and_malformed_answers_are_counted_drops() -> None:
    codec = Codec(CLUSTER, Keyring([KEY]))
    good = codec.seal(encode_piece([b"\x00abc"]))
    two = codec.seal(encode_piece([b"\x00a", None]))  # two entries for a one-chunk request
    cases = {
        "truncated": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(good) + good[:-7],
        "oversized": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n" + good,
        "malformed": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(two) + two,
        "auth": (
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(good)
            + bytes([good[0]])
            + b"\xff" * (len(good) - 1)
        ),
    }
    for kind, reply in cases.items():
        server, addr = await _raw_http_server(lambda _body, reply=reply: reply)  # type: ignore[misc]
        counters = Counters()
        fetcher = PeerFetcher(codec, counters)
        with pytest.raises(PeerProtocolError):
            await fetcher.chunks(addr, ["a" * 64], [3], 5.0)
        await fetcher.close()
        server.close()
        assert counters.get(f"fetch.drops.{kind}", 0) == 1, (kind, counters)
    # A reply streamed without Content-Length that runs past the bound is cut off too.
    big = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"\x00" * 200_000
    server, addr = await _raw_http_server(lambda _b: big)
    counters = Counters()
    fetcher = PeerFetcher(codec, counters)
    with pytest.raises(PeerProtocolError, match="over"):
        await fetcher.chunks(addr, ["a" * 64], [3], 5.0)
    await fetcher.close()
    server.close()
    assert counters["fetch.drops.oversized"] == 1


# --- manifests and targeting ---------------------------------------------------------------------


async def test_untrusted_and_unsigned_manifests_are_refused(mesh: Mesh, tmp_path: Path) -> None:
    rogue = await mesh.add("rogue", trust=("pub",))
    n1 = await mesh.add("n1", trust=("pub",))
    blob = data_blob(6, 200_000)
    rid = await publish(rogue, write_file(tmp_path / "s" / "f", blob), "6.6", key="evil")
    await wait_for(lambda: n1.service.counters.get("manifests.refused", 0) >= 1)
    assert n1.row(rid) is None
    assert not n1.service.store.has_manifest(rid)
    # The publisher holds it for others but does not install what it does not trust itself.
    assert rogue.state_of(rid) == "complete"
    assert not (rogue.root / "releases" / "app").exists()
    assert any(e["state"] == "refused" and e["node"] == "n1" for e in mesh.events)

    # An unsigned manifest, served by a fake peer with the cluster key.
    tree = chunk_tree(write_file(tmp_path / "u" / "f", blob))
    unsigned = Manifest.build("app", "7.0", tree, created=0)

    class Fake(FakeReleases):
        def manifest_document(self, rid: str) -> bytes | None:
            return unsigned.to_bytes()

    app = web.Application()
    add_peer_routes(app, Fake(Codec(CLUSTER, Keyring([KEY]), node_id="fake")))
    async with serving(app) as port:
        ann = Announce("app", "7.0", unsigned.release_id[:16], 1, len(unsigned.chunks)).text()
        fake = member("fake", node_id="fake", addr=f"127.0.0.1:{port}", meta={"rel:app": ann})
        n1.service.member_update(fake)
        await wait_for(lambda: n1.service.counters.get("manifests.refused", 0) >= 2)
        assert not n1.service.store.has_manifest(unsigned.release_id)


async def test_targeting_by_site_and_tag(mesh: Mesh, tmp_path: Path) -> None:
    n0 = await mesh.add("n0", site="hq")
    n_b = await mesh.add("nb", site="b", tags={"role": "pos"})
    n_b2 = await mesh.add("nb2", site="b", tags={"role": "cam"})
    n_c = await mesh.add("nc", site="c", tags={"role": "pos"})
    blob = data_blob(7, 300_000)
    rid = await publish(n0, write_file(tmp_path / "s" / "f", blob), "1.0", site="b", tags={"role": "pos"})
    await wait_for(lambda: n_b.state_of(rid) == "active")
    await asyncio.sleep(0.5)
    for other in (n_b2, n_c):
        assert other.row(rid) is None
        assert other.service.counters.get("releases.ignored", 0) == 1
        assert not (other.root / "releases" / "app").exists()
    # The publisher is at hq: it holds and serves the release but does not install it.
    assert n0.state_of(rid) == "complete"
    assert not (n0.root / "releases" / "app").exists()


# --- delta, resume, origin -----------------------------------------------------------------------


async def test_delta_release_moves_only_changed_chunks(mesh: Mesh, tmp_path: Path) -> None:
    n0 = await mesh.add("n0")
    n1 = await mesh.add("n1")
    blob = bytearray(data_blob(8, 6_000_000))
    src = write_file(tmp_path / "s" / "app.bin", bytes(blob))
    rid1 = await publish(n0, src, "1.0")
    await wait_for(lambda: n1.state_of(rid1) == "active")
    before = n1.service.transfer.received_bytes
    assert before > 0
    # 2% changed in one place.
    blob[3_000_000:3_120_000] = random.Random(9).randbytes(120_000)
    write_file(src, bytes(blob))
    info = await n0.service.publish(src, "app", "1.1", n0.mesh.key("pub")[1])
    rid2 = info["id"]
    await wait_for(lambda: n1.state_of(rid2) == "active")
    moved = n1.service.transfer.received_bytes - before
    assert n1.release_file("app", "app.bin").read_bytes() == bytes(blob)
    # Only the new chunks came over (the stored bytes n0 produced for them), nothing else.
    assert 0 < moved <= info["stored_bytes"] + 4096
    assert moved < 0.1 * before
    assert n1.state_of(rid1) == "installed"
    row2 = n1.row(rid2)
    assert row2 is not None
    assert row2["current"]


async def test_resume_after_restart_mid_download(mesh: Mesh, tmp_path: Path) -> None:
    n0 = await mesh.add("n0")
    blob = data_blob(10, 4_000_000)
    rid = await publish(n0, write_file(tmp_path / "s" / "f.bin", blob), "1.0")
    n1 = await slow_node(mesh, "n1")
    total = len(n0.service._manifests[rid].chunks)
    await wait_for(lambda: 0 < (n1.row(rid) or {}).get("have_chunks", 0) < total // 2)
    first_run = n1.service.transfer.received_bytes
    await mesh.kill(n1)  # an abrupt stop: tasks cancelled mid-flight
    have_on_disk = total - len(n1.service.store.missing(n0.service._manifests[rid].unique_chunks()))
    assert 0 < have_on_disk < total
    n1b = await mesh.add("n1", root=n1.root)
    row = n1b.row(rid)
    assert row is not None
    assert row["have_chunks"] >= have_on_disk
    await wait_for(lambda: n1b.state_of(rid) == "active")
    assert n1b.release_file("app", "f.bin").read_bytes() == blob
    stored_total = sum(n0.service.store.stored_size(c) for c in n0.service._manifests[rid].chunks)
    assert first_run + n1b.service.transfer.received_bytes <= stored_total * 1.15
    assert n1b.service.transfer.received_bytes < stored_total


async def test_origin_fallback_when_no_peer_has_the_chunks(mesh: Mesh, tmp_path: Path) -> None:
    # A static web server of the origin dir on 127.0.0.1.
    origin_dir = tmp_path / "origin"
    origin_dir.mkdir()
    app = web.Application()
    app.router.add_static("/rel/", origin_dir)
    async with serving(app) as port:
        origin_url = f"http://127.0.0.1:{port}/rel/"

        pub = await mesh.add("pub", site="hq")
        blob = data_blob(11, 1_200_000)
        rid = await publish(
            pub,
            write_file(tmp_path / "s" / "f.bin", blob),
            "3.0",
            site="edge",
            origins=[origin_url],
            origin_dir=origin_dir,
        )
        assert (origin_dir / "manifest.json").is_file()
        manifest = pub.service._manifests[rid]
        for cid in manifest.chunks:
            assert (origin_dir / "chunks" / cid[:2] / cid[2:]).is_file()
        # The publisher holds everything; make it serve the manifest only: an empty bitmap.
        pub.service._complete.discard(rid)
        pub.meta["rel:app"] = Announce("app", "3.0", rid[:16], 1, len(manifest.chunks)).text()
        pub.service.announcer.set_meta_keys = None  # keep its (false) partial announcement

        def empty_bitmap(rid: str) -> bytes | None:
            return make_bitmap([], len(manifest.chunks))

        pub.service.server.bitmap = empty_bitmap  # type: ignore[method-assign]
        edge = await mesh.add(
            "edge", site="edge", config=DistConfig(fsync=False, origin_delay=0.3, announce_interval=0.2)
        )
        await wait_for(lambda: edge.state_of(rid) == "active")
        assert edge.release_file("app", "f.bin").read_bytes() == blob
        stored_total = sum(len(pub.service.store.get_stored(c)) for c in manifest.chunks)
        assert edge.service.transfer.origin_bytes == stored_total
        assert edge.service.transfer.received_bytes == 0


# --- each byte written once ----------------------------------------------------------------------


async def test_a_fetched_release_is_written_once_and_served_from_where_it_is_installed(
    mesh: Mesh, tmp_path: Path
) -> None:
    n0 = await mesh.add("n0")
    blob = random.Random(21).randbytes(3_000_000)  # incompressible: every chunk comes raw
    rid = await publish(n0, write_file(tmp_path / "s" / "f.bin", blob), "1.0")
    n1 = await mesh.add("n1")
    await wait_for(lambda: n1.state_of(rid) == "active")
    installed = n1.root / "releases" / "app" / "1.0"
    assert (installed / "f.bin").read_bytes() == blob
    # Nothing of it in n1's store: no pack, no chunk file; no assembly left behind.
    assert ChunkStore.scan(n1.root) == {}
    assert not list((n1.root / "releases" / "app").glob(".part-*"))
    chunks = n0.service._manifests[rid].chunks
    for cid in chunks:
        path, _, length = n1.service.store.locate(cid)
        assert path.parent == installed
        assert length == chunks[cid]
    assert held_places(n1.root).keys() == chunks.keys()
    # After a restart n1 reads its chunks from the installed file again: with the publisher
    # gone, a new node gets the release from n1 alone.
    await mesh.kill(n1)
    n1b = await mesh.add("n1", root=n1.root)
    await mesh.kill(n0)
    n2 = await mesh.add("n2")
    await wait_for(lambda: n2.state_of(rid) == "active")
    assert n2.release_file("app", "f.bin").read_bytes() == blob
    assert n1b.service.transfer.sent_bytes >= len(blob)


async def test_an_installed_file_changed_on_disk_is_not_served(mesh: Mesh, tmp_path: Path) -> None:
    """The store reads a release's chunks from the installed files, which are not meshd's alone:
    a chunk whose bytes there changed (an application wrote into its folder, bit rot) does not
    verify, is dropped and fetched again into the store, and the file is left as it is."""
    n0 = await mesh.add("n0")
    blob = random.Random(22).randbytes(2_000_000)
    rid = await publish(n0, write_file(tmp_path / "s" / "f.bin", blob), "1.0")
    n1 = await mesh.add("n1")
    await wait_for(lambda: n1.state_of(rid) == "active")
    target = n1.root / "releases" / "app" / "1.0" / "f.bin"
    changed = bytearray(blob)
    changed[1_000_000] ^= 0xFF
    target.write_bytes(changed)
    victim = next(cid for cid, (path, off, n) in held_places(n1.root).items() if off <= 1_000_000 < off + n)
    await mesh.kill(n0)  # n1 is the only source
    n2 = await mesh.add("n2")
    await wait_for(lambda: n1.service.counters.get("store.damaged", 0) == 1, what="n1 finds the change")
    assert not n2.release_file("app", "f.bin").exists() or n2.state_of(rid) != "active"
    assert target.read_bytes() == bytes(changed)  # meshd never writes an installed file
    assert n2.service.counters.get("fetch.bad_hash", 0) == 0  # the wrong bytes never left n1
    # A publisher back with the release: n1 repairs its store, and n2 completes.
    n0b = await mesh.add("n0", root=n0.root)
    await wait_for(lambda: n2.state_of(rid) == "active", what="n2 active")
    assert n2.release_file("app", "f.bin").read_bytes() == blob
    await wait_for(lambda: n1.service.store.has(victim), what="n1 holds the chunk again")
    n1.service.store.get(victim)
    assert n0b.service.transfer.sent_bytes > 0


async def test_a_release_fetched_in_place_resumes_after_a_kill(mesh: Mesh, tmp_path: Path) -> None:
    """Killed mid-fetch with half its chunks written in place and none synced: the restart
    hashes what the folder holds, keeps what verifies and fetches only the rest."""
    n0 = await mesh.add("n0")
    blob = random.Random(23).randbytes(4_000_000)  # raw chunks only: all of it goes in place
    rid = await publish(n0, write_file(tmp_path / "s" / "f.bin", blob), "1.0")
    n1 = await slow_node(mesh, "n1")
    total = len(n0.service._manifests[rid].chunks)
    await wait_for(lambda: 0 < (n1.row(rid) or {}).get("have_chunks", 0) < total // 2)
    await mesh.kill(n1)
    part = n1.root / "releases" / "app" / f".part-{rid}"
    assert (part / "f.bin").stat().st_size == len(blob)  # sparse, at its full size
    assert ChunkStore.scan(n1.root) == {}  # nothing went into the store itself
    n1b = await mesh.add("n1", root=n1.root)
    resumed = set(n1b.service._assemblies[rid].written)
    assert 0 < len(resumed) < total
    await wait_for(lambda: n1b.state_of(rid) == "active")
    assert n1b.release_file("app", "f.bin").read_bytes() == blob
    assert n1b.service.transfer.received_bytes <= len(blob) - len(resumed) * 16 * 1024
    assert not part.exists()


async def test_a_newer_release_keeps_the_chunks_it_shares_with_the_one_it_supersedes(
    mesh: Mesh, tmp_path: Path
) -> None:
    """1.0 half fetched in place when 2.0 (most of it the same bytes) supersedes it: 1.0's folder
    goes, but the chunks 2.0 needs are kept in the store first, and 2.0 installs byte-exact."""
    n0 = await mesh.add("n0")
    v1 = random.Random(24).randbytes(4_000_000)
    rid1 = await publish(n0, write_file(tmp_path / "s1" / "f.bin", v1), "1.0")
    n1 = await slow_node(mesh, "n1")
    total = len(n0.service._manifests[rid1].chunks)
    await wait_for(lambda: total // 4 < (n1.row(rid1) or {}).get("have_chunks", 0) < total // 2)
    v2 = v1[:3_000_000] + random.Random(25).randbytes(1_000_000)  # the first 3 MB shared
    rid2 = await publish(n0, write_file(tmp_path / "s2" / "f.bin", v2), "2.0")
    await wait_for(lambda: n1.state_of(rid2) == "active", what="n1 installs 2.0")
    assert n1.release_file("app", "f.bin").read_bytes() == v2
    assert not list((n1.root / "releases" / "app").glob(".part-*"))
    assert n1.service.counters.get("activations.failed", 0) == 0
