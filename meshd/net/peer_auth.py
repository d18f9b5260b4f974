"""Peer request authentication: the cluster key is checked before a byte of a body is read.

Every request to the peer port carries a small sealed token in the X-Meshd-Auth header that
states the method, the path and the body length. The server opens the token (a few hundred
bytes) and checks that Content-Length is the stated length before it reads the body, so a host
without the cluster key costs one header's worth of work and is cut off with its body unread.

`PeerGate` is that check plus the two bounds key holders get too: a body read deadline and a
global budget of body bytes in flight. A request's reservation is given back when it ends.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from meshd.core.warnlimit import WarnLimiter
from meshd.errors import AuthError, DecodeError, ReplayError
from meshd.metrics import Exposition
from meshd.net.body import BodyTooLarge, BodyTruncated, read_bounded
from meshd.wire import Codec, Opened

log = logging.getLogger("meshd.peer")

AUTH_HEADER = "X-Meshd-Auth"
MAX_AUTH_HEADER = 1024
DEFAULT_BODY_BUDGET = 64 * 1024 * 1024  # body bytes of all requests in flight together
DEFAULT_BODY_TIMEOUT = 30.0  # a 16 MiB push-pull needs >= 0.5 MiB/s
_OCTETS = "application/octet-stream"
REPLAY_WARN_EVERY = 60.0  # refused replayed/stale tokens: one warning per sender per minute


# --- the token -----------------------------------------------------------------------------------
# Freshness is the envelope's (PROTOCOL.md 2.4): a stamp from the sender's own clock, the sender
# and the receiver, checked by the codec's ReplayGuard. A replayed token is refused, and no
# two clocks have to agree.


def _token_text(method: str, path: str, length: int) -> str:
    return f"{method} {path} {length}"


def make_token(codec: Codec, method: str, path: str, length: int = 0, *, to: str = "") -> str:
    """A sealed "<METHOD> <path> <body length>", base64, for the X-Meshd-Auth header.

    `to` is the receiving node's id when the client knows it (a member), so the token is good
    at that node only.
    """
    sealed = codec.seal(_token_text(method, path, length).encode(), to)
    return base64.b64encode(sealed).decode("ascii")


def check_token(codec: Codec, header: str | None, method: str, path: str, length: int = 0) -> Opened:
    """The opened token, or AuthError unless it is new, for this node and for this request."""
    if not header:
        raise AuthError("missing " + AUTH_HEADER)
    if len(header) > MAX_AUTH_HEADER:
        raise AuthError("oversized auth token")
    try:
        sealed = base64.b64decode(header, validate=True)
    except (binascii.Error, ValueError):
        raise AuthError("auth token is not base64") from None
    try:
        opened = codec.open_envelope(sealed, max_size=MAX_AUTH_HEADER)
        text = opened.body.decode("utf-8")
    except ReplayError as e:  # kept apart: the gate warns about these
        raise ReplayError(f"auth token refused: {e}", e.sender) from None
    except DecodeError as e:
        raise AuthError(f"auth token does not open: {e}") from None
    except UnicodeDecodeError:
        raise AuthError("auth token is not text") from None
    if text != _token_text(method, path, length):
        raise AuthError("auth token is for another request")
    return opened


# --- the gate ------------------------------------------------------------------------------------


class BodyBudget:
    """Body bytes reserved by requests in flight; a reservation over the budget is refused."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def reserve(self, n: int) -> bool:
        if n and self.in_flight + n > self.limit:
            return False
        self.in_flight += n
        return True

    def release(self, n: int) -> None:
        self.in_flight = max(0, self.in_flight - n)


class Refused(Exception):
    """A request refused before (or while) its body is read: status, and a reason for counters."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{status} {reason}: {detail}" if detail else f"{status} {reason}")
        self.status = status
        self.reason = reason


# Reasons (label values of meshd_tcp_refused_total / meshd_tcp_timeouts_total).
REFUSAL_REASONS = ("auth", "length", "too_big", "busy", "truncated")


@dataclass
class GateStats:
    auth: int = 0  # no token, or one that does not open or is for another request
    length: int = 0  # no Content-Length (chunked) where a body is allowed
    too_big: int = 0  # stated length over the route's limit
    busy: int = 0  # the global body budget is full
    truncated: int = 0  # the body ended early or broke off
    body_timeouts: int = 0  # the body did not arrive within the deadline

    def collect_metrics(self, out: Exposition) -> None:
        out.labelled(
            "meshd_peer_refused_total",
            "counter",
            "peer requests refused before or while their body was read, by reason",
            [({"reason": r}, getattr(self, r)) for r in REFUSAL_REASONS],
        )
        out.counter(
            "meshd_peer_body_timeouts_total",
            "peer request bodies not read within the deadline",
            self.body_timeouts,
        )


class PeerGate:
    """Authenticate a peer request from its headers, then read its body within bounds."""

    def __init__(
        self,
        codec: Codec,
        *,
        body_budget: int = DEFAULT_BODY_BUDGET,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        stats: GateStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.codec = codec
        self.budget = BodyBudget(body_budget)
        self.body_timeout = body_timeout
        self.stats = stats or GateStats()
        self._clock = clock
        self._replay_warnings = WarnLimiter(REPLAY_WARN_EVERY)

    def collect_metrics(self, out: Exposition) -> None:
        self.stats.collect_metrics(out)
        out.gauge(
            "meshd_peer_body_bytes_in_flight", "peer request body bytes reserved now", self.budget.in_flight
        )

    def check(self, method: str, path: str, headers: Mapping[str, str], max_body: int) -> tuple[int, str]:
        """The body length a request may send and its sender (hex, the `to` of the answer),
        judged from its headers alone; Refused otherwise.

        `headers` must look names up case-insensitively (aiohttp's headers, a CIMultiDict).
        """
        if "Transfer-Encoding" in headers:  # a chunked body has no length to state or budget
            raise Refused(411, "length", "chunked body")
        raw_len = headers.get("Content-Length")
        if raw_len is None and method == "POST":
            raise Refused(411, "length", "no Content-Length")
        if raw_len is not None and not (raw_len.isascii() and raw_len.isdigit() and len(raw_len) <= 12):
            raise Refused(400, "length", "bad Content-Length")
        length = int(raw_len) if raw_len is not None else 0
        token = headers.get(AUTH_HEADER)
        try:
            opened = check_token(self.codec, token, method, path, length)
        except AuthError as e:
            if isinstance(e, ReplayError):
                self._warn_replay(e)
            raise Refused(401 if not token else 403, "auth", str(e)) from None
        if length > max_body:
            raise Refused(413, "too_big", f"{length} bytes, limit {max_body}")
        return length, opened.sender.hex()

    def _warn_replay(self, e: ReplayError) -> None:
        # An authentic token refused (a replay, or a sender that lost its state): never silent,
        # but one line per sender per minute whatever an attacker replays.
        n = self._replay_warnings.hit(e.sender, self._clock())
        if n is not None:
            who = e.sender.hex() or "an unknown sender"
            log.warning(
                "refused %d peer request(s) from %s in the last %gs at most: %s", n, who, REPLAY_WARN_EVERY, e
            )

    @asynccontextmanager
    async def body(self, request: web.Request, max_body: int) -> AsyncIterator[bytes]:
        """The authenticated body of `request` (b"" for none); its budget held until exit."""
        length, request[REQUESTER] = self.check(request.method, request.path, request.headers, max_body)
        if not self.budget.reserve(length):
            raise Refused(503, "busy", f"{self.budget.in_flight} body bytes in flight")
        try:
            data = b""
            if length:
                try:
                    async with asyncio.timeout(self.body_timeout):
                        data = await read_bounded(request.content, length, length)
                except TimeoutError:
                    self.stats.body_timeouts += 1
                    raise Refused(408, "timeout") from None
                except BodyTooLarge:
                    raise Refused(413, "too_big") from None
                except (BodyTruncated, aiohttp.ClientPayloadError, ConnectionError) as e:
                    raise Refused(400, "truncated", str(e)) from None
            yield data
        finally:
            self.budget.release(length)

    def refusal(self, r: Refused) -> web.Response:
        """The answer to a refused request: counted, no detail, and the connection closed."""
        if r.reason in REFUSAL_REASONS:
            setattr(self.stats, r.reason, getattr(self.stats, r.reason) + 1)
        resp = web.Response(status=r.status, content_type=_OCTETS)
        resp.force_close()  # the unread body is not drained: the connection goes
        return resp


PEER_GATE = web.AppKey("peer_gate", PeerGate)
REQUESTER = web.RequestKey("requester", str)  # the sender id (hex) of an authenticated request


def requester(request: web.Request) -> str:
    """Who sent an authenticated request: the `to` its sealed answer names."""
    return request.get(REQUESTER, "")


BodyHandler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


def gated(
    max_body: int, on_refused: Callable[[web.Request, Refused], None] | None = None
) -> Callable[[BodyHandler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Wrap a route: the app's PeerGate authenticates it and hands it the body it read."""

    def wrap(fn: BodyHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            gate = request.app[PEER_GATE]
            try:
                async with gate.body(request, max_body) as data:
                    return await fn(request, data)
            except Refused as r:
                log.debug("refused %s %s from %s: %s", request.method, request.path, request.remote, r)
                if on_refused is not None:
                    on_refused(request, r)
                return gate.refusal(r)

        return handler

    return wrap
