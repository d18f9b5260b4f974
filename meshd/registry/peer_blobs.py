"""Cached registry blobs between the nodes of a site, over the authenticated peer port.

    POST /peer/v1/blobs   sealed(orjson {"digest", "repo", "ns", "kind", "fetch"})
        -> 404: not held here (and not fetched: "fetch" false, or no upstream)
        -> 200: a stream of frames, then an end frame

`fetch` true asks the node to fetch the blob from upstream when it does not hold it (the site's
owner of the digest, or a node holding a lease on it); concurrent asks join its one fetch. The
request is authenticated like every peer route (X-Meshd-Auth token before the body is read);
the answer is a stream of frames, each `type (1 byte) + u32 length + payload`:

    b"D": a sealed envelope of up to FRAME_BYTES of the blob (sealed for the requester)
    b"K": keepalive while the node fetches from upstream (no payload)
    b"E": the end: every byte was sent
    b"X": failed after the answer started (the upstream fetch failed): nothing to keep

Frames bound memory on both sides (a blob is hundreds of megabytes); the digest, checked by the
requester over the bytes it got, is what says they are right.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import orjson
from aiohttp import web

from meshd.errors import AuthError, DecodeError
from meshd.net.peer_auth import AUTH_HEADER, PEER_GATE, PeerGate, Refused, gated, make_token, requester
from meshd.registry.rules import NAME_RE
from meshd.registry.site_cache import digest_hex
from meshd.wire import Codec

log = logging.getLogger("meshd.registry.peer")

BLOBS_PATH = "/peer/v1/blobs"
MAX_REQUEST = 4096
FRAME_BYTES = 1024 * 1024
KEEPALIVE_EVERY = 5.0
OCTETS = "application/octet-stream"
_HEAD = struct.Struct("<cI")
DATA, KEEPALIVE, END, FAILED = b"D", b"K", b"E", b"X"
KINDS = ("blobs", "manifests")
_MAX_TEXT = 256
_NS_RE = re.compile(r"[A-Za-z0-9.:\[\]-]*")  # a registry host[:port] (containerd's ?ns=), or none


class PeerBlobError(DecodeError):
    """A peer's blob answer that is not one (bad frame, refused status, truncated)."""


@dataclass(frozen=True)
class BlobAsk:
    digest: str
    repo: str
    ns: str
    kind: str = "blobs"
    fetch: bool = False

    def encode(self) -> bytes:
        return orjson.dumps(
            {"digest": self.digest, "repo": self.repo, "ns": self.ns, "kind": self.kind, "fetch": self.fetch}
        )

    @classmethod
    def decode(cls, body: bytes) -> BlobAsk:
        """DecodeError for anything but a well-formed ask."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise DecodeError("blob ask is not JSON") from None
        if not isinstance(doc, dict):
            raise DecodeError("blob ask is not an object")
        digest, repo, ns = doc.get("digest"), doc.get("repo"), doc.get("ns", "")
        kind, fetch = doc.get("kind", "blobs"), doc.get("fetch", False)
        if not isinstance(digest, str) or digest_hex(digest) is None:
            raise DecodeError("blob ask: bad digest")
        if not all(isinstance(t, str) and len(t) <= _MAX_TEXT for t in (repo, ns)):
            raise DecodeError("blob ask: bad repo or ns")
        if not NAME_RE.fullmatch(str(repo)) or not _NS_RE.fullmatch(str(ns)):
            raise DecodeError("blob ask: repo or ns is not a registry name")  # it goes into a URL
        if kind not in KINDS or not isinstance(fetch, bool):
            raise DecodeError("blob ask: bad kind or fetch")
        return cls(digest, str(repo), str(ns), kind, fetch)


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEAD.pack(kind, len(payload)) + payload


# --- server ------------------------------------------------------------------------------------


class BlobHolder(Protocol):
    """What the route needs from the pull-through: the cached file, and a fetch to join."""

    codec: Codec

    def cached(self, digest: str) -> Path | None: ...
    def can_fetch(self) -> bool: ...
    async def fetch_for_peer(self, ask: BlobAsk) -> Path | None: ...
    async def upload_permit(self, nbytes: int) -> None:
        """Waits while this node's upload rate ([dist] upload_rate) is used up."""
        ...

    def count_peer_out(self, nbytes: int) -> None: ...


BLOB_HOLDER = web.AppKey("blob_holder", BlobHolder)


def _refused(_: web.Request, r: Refused) -> None:
    log.debug("blob ask refused: %s", r)


@gated(MAX_REQUEST, _refused)
async def _post_blob(request: web.Request, raw: bytes) -> web.StreamResponse:
    holder = request.app[BLOB_HOLDER]
    try:
        ask = BlobAsk.decode(holder.codec.open(raw, max_size=MAX_REQUEST))
    except AuthError:
        return web.Response(status=403, content_type=OCTETS)
    except DecodeError:
        return web.Response(status=400, content_type=OCTETS)
    to = requester(request)
    path = holder.cached(ask.digest)
    if path is None and not (ask.fetch and holder.can_fetch()):
        return web.Response(status=404, content_type=OCTETS)
    resp = web.StreamResponse(headers={"Content-Type": OCTETS})
    await resp.prepare(request)
    if path is None:
        job = asyncio.ensure_future(holder.fetch_for_peer(ask))
        while not job.done():
            await asyncio.wait([job], timeout=KEEPALIVE_EVERY)
            if not job.done():
                await resp.write(frame(KEEPALIVE))
        path = job.result() if not job.cancelled() and job.exception() is None else None
        if path is None:
            await resp.write(frame(FAILED))
            await resp.write_eof()
            return resp
    try:
        f = await asyncio.to_thread(path.open, "rb")
    except OSError:  # collected in between
        await resp.write(frame(FAILED))
        await resp.write_eof()
        return resp
    with f:
        while block := await asyncio.to_thread(f.read, FRAME_BYTES):
            await holder.upload_permit(len(block))
            await resp.write(frame(DATA, holder.codec.seal(block, to, compress=False)))
            holder.count_peer_out(len(block))
    await resp.write(frame(END))
    await resp.write_eof()
    return resp


def add_blob_routes(app: web.Application, holder: BlobHolder) -> None:
    """Add POST /peer/v1/blobs to a peer app (before it starts)."""
    app[BLOB_HOLDER] = holder
    if PEER_GATE not in app:
        app[PEER_GATE] = PeerGate(holder.codec)
    app.router.add_post(BLOBS_PATH, _post_blob)


# --- client ------------------------------------------------------------------------------------


async def fetch_blob(
    session: aiohttp.ClientSession,
    codec: Codec,
    addr: str,
    to: str,
    ask: BlobAsk,
    on_block: Callable[[bytes], Awaitable[None]],
    *,
    connect_timeout: float = 5.0,
    read_timeout: float = 3 * KEEPALIVE_EVERY,
) -> bool:
    """Ask node `to` at `addr` for a blob; every opened block goes to `on_block` (which hashes
    and writes it). False: the node does not hold it (404). PeerBlobError / aiohttp errors /
    OSError otherwise."""
    body = codec.seal(ask.encode(), to)
    headers = {"Content-Type": OCTETS, AUTH_HEADER: make_token(codec, "POST", BLOBS_PATH, len(body), to=to)}
    timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout)
    async with session.post(
        f"http://{addr}{BLOBS_PATH}", data=body, headers=headers, timeout=timeout
    ) as resp:
        if resp.status == 404:
            return False
        if resp.status != 200:
            raise PeerBlobError(f"{addr} answered {resp.status} to a blob ask")
        while True:
            try:
                head = await resp.content.readexactly(_HEAD.size)
                kind, n = _HEAD.unpack(head)
                if n > FRAME_BYTES + codec.overhead + 64:
                    raise PeerBlobError(f"{addr}: frame of {n} bytes")
                payload = await resp.content.readexactly(n) if n else b""
            except asyncio.IncompleteReadError:
                raise PeerBlobError(f"{addr}: blob answer cut short") from None
            if kind == DATA:
                try:
                    await on_block(codec.open(payload, max_size=FRAME_BYTES))
                except DecodeError as e:
                    raise PeerBlobError(f"{addr}: frame does not open: {e}") from None
            elif kind == END:
                return True
            elif kind == FAILED:
                raise PeerBlobError(f"{addr}: its fetch failed")
            elif kind != KEEPALIVE:
                raise PeerBlobError(f"{addr}: unknown frame {kind!r}")


__all__ = ["BLOBS_PATH", "BlobAsk", "BlobHolder", "PeerBlobError", "add_blob_routes", "fetch_blob", "frame"]
