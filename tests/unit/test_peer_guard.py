"""The peer port's guard, token and gate logic without sockets: fake transports, fake time."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from meshd.crypto import Keyring
from meshd.errors import AuthError
from meshd.metrics import Exposition
from meshd.net.guard import ConnectionGuard, Guard, GuardedProtocol, GuardLimits, Phase
from meshd.net.peer_auth import AUTH_HEADER, BodyBudget, PeerGate, Refused, check_token, make_token
from meshd.net.peer_http import PeerTraffic
from meshd.release.peer import UploadBusy
from meshd.release.serve import TokenBucket, UploadSlots
from meshd.replay import ReplayGuard
from meshd.wire import Codec
from tests.metrics_text import sample

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
LIM = GuardLimits(max_conns=4, max_per_source=2, header_timeout=10.0, idle_timeout=15.0)


def codec(key: bytes = KEY) -> Codec:
    return Codec("t", Keyring([key]))


# --- ConnectionGuard ----------------------------------------------------------------------------


def test_a_source_over_its_cap_is_refused_and_counted() -> None:
    g: ConnectionGuard[str] = ConnectionGuard(LIM)
    assert g.open("a1", "198.18.0.1", 0).admitted
    assert g.open("a2", "198.18.0.1", 0).admitted
    verdict = g.open("a3", "198.18.0.1", 0)
    assert not verdict.admitted
    assert verdict.reason == "per_source"
    assert g.stats.refused_per_source == 1
    assert g.open("b1", "198.18.0.2", 0).admitted  # another source is not affected
    assert g.stats.open == 3
    g.close("a1")
    assert g.open("a3", "198.18.0.1", 0).admitted  # a closed one frees its place


def test_a_full_server_drops_an_idle_connection_of_the_biggest_holder() -> None:
    g: ConnectionGuard[str] = ConnectionGuard(LIM)
    for key, src in (("a1", "198.18.0.1"), ("a2", "198.18.0.1"), ("b1", "198.18.0.2"), ("c1", "198.18.0.3")):
        assert g.open(key, src, 0).admitted
    g.request_started("a1")  # in a handler: never evicted
    verdict = g.open("d1", "198.18.0.4", 1)
    assert verdict.admitted
    assert verdict.evict == "a2"
    assert g.phase("a2") is None
    assert g.count("198.18.0.1") == 1
    assert g.stats.evicted == 1
    assert len(g) == 4
    # Now every source holds one: nobody holds more than a newcomer would, so it is refused.
    verdict = g.open("e1", "198.18.0.5", 2)
    assert not verdict.admitted
    assert verdict.reason == "global"
    assert g.stats.refused_global == 1


def test_a_full_server_of_busy_connections_refuses() -> None:
    g: ConnectionGuard[str] = ConnectionGuard(GuardLimits(max_conns=2, max_per_source=4))
    for key in ("a1", "a2"):
        g.open(key, "198.18.0.1", 0)
        g.request_started(key)
    assert not g.open("b1", "198.18.0.2", 0).admitted


def test_deadlines_follow_the_connection_phase() -> None:
    g: ConnectionGuard[str] = ConnectionGuard(LIM)
    g.open("c", "198.18.0.1", 100.0)
    assert g.expired(109.9) == []
    assert g.expired(110.0) == [("c", Phase.HEADERS)]  # no request within the header deadline
    g.request_started("c")
    assert g.expired(1000.0) == []  # a handler runs: no header deadline
    g.request_done("c", 200.0)
    assert g.phase("c") is Phase.IDLE
    assert g.expired(214.9) == []
    assert g.expired(215.0) == [("c", Phase.IDLE)]
    g.data("c", 205.0)  # the next request starts: the header deadline from its first byte
    assert g.phase("c") is Phase.HEADERS
    assert g.expired(214.9) == []
    g.data("c", 214.0)  # more bytes do not push the deadline
    assert g.expired(215.0) == [("c", Phase.HEADERS)]
    g.timed_out("c", Phase.HEADERS)
    assert g.stats.header_timeouts == 1
    assert len(g) == 0
    assert g.count("198.18.0.1") == 0


# --- the asyncio shell, with fake transports -----------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host
        self.aborted = False
        self.buffered = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.host, 40000) if name == "peername" else default

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return self.buffered


class Inner(asyncio.Protocol):
    made = 0

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Inner.made += 1

    def data_received(self, data: bytes) -> None:
        self.data.append(data)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0


def shell(limits: GuardLimits = LIM) -> tuple[Guard, Clock]:
    guard = Guard(limits)
    clock = Clock()
    guard._now = lambda: clock.t  # type: ignore[method-assign]
    return guard, clock


def test_a_refused_connection_is_aborted_and_never_reaches_aiohttp() -> None:
    guard, _ = shell()
    Inner.made = 0
    protos = [GuardedProtocol(guard, Inner) for _ in range(3)]
    transports = [FakeTransport("198.18.0.1") for _ in range(3)]
    for p, t in zip(protos, transports, strict=True):
        p.connection_made(t)
    assert [t.aborted for t in transports] == [False, False, True]
    assert Inner.made == 2
    protos[2].data_received(b"GET / HTTP/1.1\r\n")  # ignored, nothing buffered
    protos[0].connection_lost(None)
    assert guard.stats.open == 1


def test_the_sweep_closes_what_is_past_its_deadline_but_not_a_reply_still_going_out() -> None:
    guard, clock = shell()
    slow, quiet = FakeTransport("198.18.0.1"), FakeTransport("198.18.0.2")
    for t in (slow, quiet):
        GuardedProtocol(guard, Inner).connection_made(t)
        guard.core.request_started(t)
        guard.core.request_done(t, clock.t)
    slow.buffered = 1 << 20  # the client reads its reply slowly
    clock.t = 15.0
    guard.sweep()
    assert quiet.aborted
    assert not slow.aborted
    assert guard.stats.idle_timeouts == 1
    slow.buffered = 0
    clock.t = 30.0
    guard.sweep()
    assert slow.aborted
    assert guard.stats.open == 0


def test_guard_counters_are_exposed_with_the_peer_traffic() -> None:
    traffic = PeerTraffic()
    traffic.guard.refused_per_source = 3
    traffic.gate.auth = 2
    out = Exposition()
    traffic.collect_metrics(out)
    text = out.render()
    assert sample(text, "meshd_tcp_refused_total", reason="per_source") == 3
    assert sample(text, "meshd_tcp_timeouts_total", phase="header") == 0
    assert sample(text, "meshd_tcp_evicted_total") == 0
    assert sample(text, "meshd_tcp_connections") == 0
    assert sample(text, "meshd_peer_refused_total", reason="auth") == 2
    assert sample(text, "meshd_peer_body_timeouts_total") == 0


# --- the token -----------------------------------------------------------------------------------


def test_the_token_states_method_path_and_length() -> None:
    c = codec()
    token = make_token(c, "POST", "/peer/v1/stream", 1234, to="n2")
    check_token(c, token, "POST", "/peer/v1/stream", 1234)
    for method, path, length in (
        ("POST", "/peer/v1/stream", 1235),
        ("POST", "/peer/v1/chunks", 1234),
        ("GET", "/peer/v1/stream", 1234),
    ):
        with pytest.raises(AuthError):
            check_token(c, token, method, path, length)
    with pytest.raises(AuthError):
        check_token(codec(OTHER), token, "POST", "/peer/v1/stream", 1234)
    with pytest.raises(AuthError):
        check_token(c, None, "GET", "/x")
    with pytest.raises(AuthError):
        check_token(c, "not base64 !", "GET", "/x")
    with pytest.raises(AuthError):
        check_token(c, "A" * 2000, "GET", "/x")


def test_a_replayed_or_misdirected_token_is_refused() -> None:
    # Freshness comes from the envelope (stamp, sender, receiver): no clock is compared.
    ring = Keyring([KEY])
    client = Codec("t", ring, node_id="aa" * 16)
    server = Codec("t", ring, node_id="bb" * 16, guard=ReplayGuard())
    token = make_token(client, "POST", "/x", 10, to="bb" * 16)
    assert check_token(server, token, "POST", "/x", 10).sender == bytes.fromhex("aa" * 8)
    with pytest.raises(AuthError, match="replay"):
        check_token(server, token, "POST", "/x", 10)
    elsewhere = make_token(client, "POST", "/x", 10, to="cc" * 16)
    with pytest.raises(AuthError, match="another node"):
        check_token(server, elsewhere, "POST", "/x", 10)


# --- the gate ------------------------------------------------------------------------------------


def headers(**kv: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in kv.items()})


def test_the_gate_warns_about_replayed_tokens_once_a_minute_per_sender(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="meshd.peer")
    ring = Keyring([KEY])
    client = Codec("t", ring, node_id="aa" * 16)
    now = [100.0]
    gate = PeerGate(Codec("t", ring, node_id="bb" * 16, guard=ReplayGuard()), clock=lambda: now[0])
    token = make_token(client, "GET", "/x", to="bb" * 16)
    gate.check("GET", "/x", headers(**{AUTH_HEADER: token}), 0)
    for _ in range(20):
        with pytest.raises(Refused) as e:
            gate.check("GET", "/x", headers(**{AUTH_HEADER: token}), 0)
        assert (e.value.status, e.value.reason) == (403, "auth")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1
    assert lines[0].startswith("refused 1 peer request(s) from " + "aa" * 8)
    assert "replay envelope" in lines[0]
    now[0] += 60.0
    with pytest.raises(Refused):
        gate.check("GET", "/x", headers(**{AUTH_HEADER: token}), 0)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2
    assert lines[1].startswith("refused 20 peer request(s)")


def test_the_gate_judges_a_request_from_its_headers() -> None:
    gate = PeerGate(codec())
    path = "/peer/v1/stream"
    tok = make_token(gate.codec, "POST", path, 100)
    length, sender = gate.check("POST", path, headers(Content_Length="100", **{AUTH_HEADER: tok}), 1000)
    assert length == 100
    assert sender == gate.codec.open_envelope(base64.b64decode(tok)).sender.hex()
    cases = [
        (headers(Content_Length="100"), 401, "auth"),
        (headers(Content_Length="100", **{AUTH_HEADER: "Zm9v"}), 403, "auth"),
        (headers(Content_Length="101", **{AUTH_HEADER: tok}), 403, "auth"),  # not the stated length
        (headers(Transfer_Encoding="chunked", **{AUTH_HEADER: tok}), 411, "length"),
        (headers(**{AUTH_HEADER: tok}), 411, "length"),
        (headers(Content_Length="-1", **{AUTH_HEADER: tok}), 400, "length"),
    ]
    for h, status, reason in cases:
        with pytest.raises(Refused) as e:
            gate.check("POST", path, h, 1000)
        assert (e.value.status, e.value.reason) == (status, reason)
    with pytest.raises(Refused) as e:
        gate.check("POST", path, headers(Content_Length="100", **{AUTH_HEADER: tok}), 99)
    assert e.value.status == 413


def test_the_body_budget_is_shared_and_given_back() -> None:
    b = BodyBudget(100)
    assert b.reserve(60)
    assert not b.reserve(41)
    assert b.reserve(40)
    b.release(60)
    b.release(40)
    assert b.in_flight == 0
    assert b.reserve(0)


class NeverRead:
    """A request body that must not be read."""

    async def readany(self) -> bytes:
        raise AssertionError("the body was read")


async def test_a_request_is_refused_with_its_body_unread() -> None:
    gate = PeerGate(codec(), body_budget=1000)
    path = "/peer/v1/chunks"

    def request(length: int, token: str | None) -> web.Request:
        h = {"Content-Length": str(length)}
        if token:
            h[AUTH_HEADER] = token
        return make_mocked_request("POST", path, headers=h, payload=NeverRead())  # type: ignore[arg-type]

    for req in (request(500, None), request(500, make_token(codec(OTHER), "POST", path, 500))):
        with pytest.raises(Refused):
            async with gate.body(req, 10_000):
                pass
    # A key holder over the global budget waits for nobody: 503, nothing read, nothing held.
    gate.budget.reserve(800)
    with pytest.raises(Refused) as e:
        async with gate.body(request(500, make_token(gate.codec, "POST", path, 500)), 10_000):
            pass
    assert e.value.status == 503
    assert gate.budget.in_flight == 800
    resp = gate.refusal(e.value)
    assert resp.status == 503
    assert not resp.keep_alive
    assert gate.stats.busy == 1


# --- uploads -------------------------------------------------------------------------------------


async def test_the_token_bucket_does_not_hold_a_lock_while_sleeping() -> None:
    clock = [0.0]
    sleeping: list[float] = []
    wake = asyncio.Event()

    async def sleep(s: float) -> None:
        sleeping.append(s)
        await wake.wait()

    bucket = TokenBucket(1000.0, burst=1000.0, clock=lambda: clock[0], sleep=sleep)
    first = asyncio.create_task(bucket.take(2000))  # 1 s of debt
    second = asyncio.create_task(bucket.take(500))  # waits behind it: 1.5 s
    for _ in range(5):
        await asyncio.sleep(0)
    assert sleeping == [1.0, 1.5]  # both reserved while the first sleeps
    wake.set()
    await asyncio.gather(first, second)


async def test_upload_slots_bound_the_work_of_one_source() -> None:
    slots = UploadSlots(running=1, waiting=1)
    release = asyncio.Event()
    entered: list[str] = []

    async def upload(src: str) -> None:
        async with slots.slot(src):
            entered.append(src)
            await release.wait()

    a1 = asyncio.create_task(upload("198.18.0.1"))
    a2 = asyncio.create_task(upload("198.18.0.1"))
    b1 = asyncio.create_task(upload("198.18.0.2"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert entered == ["198.18.0.1", "198.18.0.2"]  # a2 waits, b1 has its own slot
    with pytest.raises(UploadBusy):
        async with slots.slot("198.18.0.1"):
            pass
    release.set()
    await asyncio.gather(a1, a2, b1)
    assert slots.held("198.18.0.1") == 0
    assert not slots._sems
