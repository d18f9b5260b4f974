"""Peer HTTP for update distribution: manifests, have-bitmaps and chunk pieces, sealed.

This module is the protocol and the server routes; the client is meshd.release.peer_client and
what the routes serve comes from a PeerBackend (meshd.release.serve.PeerUploads).

Routes, added to the node's peer app (the TCP twin of the gossip port):

    GET  /peer/v1/manifests/<release id or a prefix of >= 16 hex>   -> sealed(manifest document)
    GET  /peer/v1/bitmaps/<release id>                               -> sealed(have-bitmap)
    POST /peer/v1/chunks   sealed(orjson {"ids": [chunk id, ...]})   -> sealed(piece)
                           (+ "cipher": "aes256gcm": the piece in a version 3 envelope, if
                           this node can; a node that cannot, or predates it, answers in 2)

Authentication is the cluster keyring (wire.Codec): every body both ways is a sealed envelope,
and every request carries a sealed token stating method, path and body length in the
X-Meshd-Auth header (meshd.net.peer_auth), checked before a byte of the body is read, so a node
without the key gets 401 (no token) or 403 (token does not open) and learns nothing.

With an upload rate limit, the work one source address can queue is bounded too: a few uploads
at a time and a few waiting; more get 503 (`serve.drops.busy`).

A piece: b"MDP1", u32 count, count x u32 stored length (0 = not served: absent or damaged),
then the stored forms back to back, in the order of the ids asked for. Every size is bounded;
a body over a bound is a 413 (server) or a counted drop (client), never a crash.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import orjson
from aiohttp import web

from meshd.core.counters import Counters
from meshd.errors import AuthError, DecodeError
from meshd.net.peer_auth import PEER_GATE, PeerGate, Refused, gated, requester
from meshd.release.chunker import MAX_SIZE, is_chunk_id
from meshd.wire import AES_TAIL, Codec

log = logging.getLogger("meshd.release.peer")

MANIFEST_PATH = "/peer/v1/manifests/{rid}"
BITMAP_PATH = "/peer/v1/bitmaps/{rid}"
CHUNKS_PATH = "/peer/v1/chunks"
PIECE_MAGIC = b"MDP1"
MAX_IDS = 1024  # 16 KiB minimum chunks x 1024 = 16 MiB: far above a 4 MiB piece
MAX_CHUNKS_REQUEST = 256 * 1024  # sealed id list: 1024 x ~70 bytes of JSON + envelope
MAX_PIECE_STORED = 16 * 1024 * 1024  # the server stops filling a piece beyond this
MAX_MANIFEST = 64 * 1024 * 1024
STORED_OVERHEAD = 5  # header byte + lz4 size prefix
CIPHER_AES = "aes256gcm"  # what a requester asks its pieces in, when its codec can open them
# An answer being sent holds an upload slot; one not gone within this long is dropped with its
# connection (a requester that stops reading). 10 s + 2 MiB at 64 KiB/s: 42 s for a piece.
SEND_MIN_S = 10.0
SEND_FLOOR_RATE = 64 * 1024
OCTETS = "application/octet-stream"
_HEX_RE = re.compile(r"^[0-9a-f]{16,64}$")
_U32 = struct.Struct("<I")


class PeerProtocolError(DecodeError):
    """A peer's answer that does not parse (truncated, oversized, malformed)."""


# --- pieces --------------------------------------------------------------------------------------


def piece_head(lengths: Sequence[int]) -> bytes:
    """A piece's header and length table (0: that chunk is not served); its stored forms
    follow back to back."""
    return b"".join([PIECE_MAGIC, _U32.pack(len(lengths)), *(_U32.pack(n) for n in lengths)])


def encode_piece(stored: Sequence[bytes | memoryview | None]) -> bytes:
    head = piece_head([len(s) if s else 0 for s in stored])
    return b"".join([head, *(s for s in stored if s)])


def piece_buffer(stored: Sequence[bytes | memoryview | None], room: int, tail: int = 0) -> bytearray:
    """encode_piece after `room` bytes left for the envelope's header and before `tail` bytes
    left for its tag (Codec.seal_in_place)."""
    return bytearray(room) + encode_piece(stored) + bytes(tail)


def decode_piece(body: bytes | memoryview, expected: int) -> list[memoryview | None]:
    """Split a piece into `expected` stored forms (None: not served), as views of `body` (no
    copies: a piece is megabytes). PeerProtocolError."""
    view = memoryview(body)
    n_head = len(PIECE_MAGIC) + 4
    if len(view) < n_head or view[:4] != PIECE_MAGIC:
        raise PeerProtocolError("piece has no MDP1 header")
    (count,) = _U32.unpack_from(view, 4)
    if count != expected:
        raise PeerProtocolError(f"piece holds {count} entries, asked for {expected}")
    table_end = n_head + 4 * count
    if len(view) < table_end:
        raise PeerProtocolError("truncated piece length table")
    lengths = [_U32.unpack_from(view, n_head + 4 * i)[0] for i in range(count)]
    if any(n > MAX_SIZE + STORED_OVERHEAD for n in lengths):
        raise PeerProtocolError("piece entry larger than a chunk can be")
    total = table_end + sum(lengths)
    if len(view) != total:
        what = "truncated" if len(view) < total else "oversized"
        raise PeerProtocolError(f"{what} piece: {len(view)} bytes, table says {total}")
    out: list[memoryview | None] = []
    pos = table_end
    for n in lengths:
        out.append(view[pos : pos + n] if n else None)
        pos += n
    return out


def max_piece_reply(sizes: Sequence[int], codec: Codec) -> int:
    """Upper bound of the sealed answer to a request for chunks of these uncompressed sizes."""
    return len(PIECE_MAGIC) + 4 + sum(4 + s + STORED_OVERHEAD for s in sizes) + codec.overhead + 64


# --- server --------------------------------------------------------------------------------------


class PeerBackend(Protocol):
    """What the routes need from the distribution service."""

    codec: Codec
    counters: Counters

    def manifest_document(self, rid: str) -> bytes | None: ...
    def bitmap(self, rid: str) -> bytes | None: ...
    async def read_piece(self, ids: list[str], room: int, tail: int = 0) -> bytearray:
        """The piece answering `ids`, after `room` bytes left for the envelope's header and
        before `tail` bytes left for its tag."""
        ...

    async def upload_permit(self, nbytes: int) -> None: ...
    def count_sent(self, nbytes: int) -> None: ...
    def upload_slot(self, source: str) -> AbstractAsyncContextManager[None]:
        """Held while one answer to `source` is prepared and paced; UploadBusy when it has
        too many already."""
        ...


class UploadBusy(Exception):
    """A source has too many uploads running and waiting."""


RELEASE_BACKEND = web.AppKey("release_backend", PeerBackend)


def _count(backend: PeerBackend, key: str) -> None:
    backend.counters[key] += 1


def _refuse(backend: PeerBackend, status: int, key: str) -> web.Response:
    _count(backend, key)
    return web.Response(status=status, content_type=OCTETS)


_REFUSAL_COUNTERS = {
    "auth": "serve.drops.auth",
    "too_big": "serve.drops.too_big",
    "length": "serve.drops.bad_request",
    "busy": "serve.drops.busy",
    "truncated": "serve.drops.truncated",
    "timeout": "serve.drops.truncated",
}


def _count_refusal(request: web.Request, r: Refused) -> None:
    _count(request.app[RELEASE_BACKEND], _REFUSAL_COUNTERS.get(r.reason, "serve.drops.bad_request"))


async def _upload(
    request: web.Request, make: Callable[[], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Run `make` in an upload slot of the request's source (503 when it has too many)."""
    backend = request.app[RELEASE_BACKEND]
    try:
        async with backend.upload_slot(request.remote or "unknown"):
            return await make()
    except UploadBusy:
        return _refuse(backend, 503, "serve.drops.busy")


async def _reply(request: web.Request, body: bytes) -> web.StreamResponse:
    backend = request.app[RELEASE_BACKEND]
    return await _send(request, backend.codec.seal(body, requester(request)))  # for the requester only


async def _send(request: web.Request, sealed: bytes | bytearray | memoryview) -> web.StreamResponse:
    """Send a sealed answer now, in the upload slot it was made in: the slot ends when its
    bytes are in the kernel, so what the slots bound is the memory of answers being sent."""
    backend = request.app[RELEASE_BACKEND]
    await backend.upload_permit(len(sealed))
    backend.count_sent(len(sealed))
    resp = web.StreamResponse(headers={"Content-Type": OCTETS})
    resp.content_length = len(sealed)
    try:
        async with asyncio.timeout(send_deadline(len(sealed))):
            await resp.prepare(request)
            await resp.write(sealed)
            await resp.write_eof()
    except ConnectionError:  # the requester went away mid-answer (it asks elsewhere)
        _count(backend, "serve.aborted")
    except TimeoutError:
        # A requester that stops reading would hold its slot for good: its connection goes.
        _count(backend, "serve.drops.send_timeout")
        if request.transport is not None:
            request.transport.abort()
    return resp


def send_deadline(nbytes: int) -> float:
    """How long an answer may take to leave: SEND_MIN_S, plus its bytes at SEND_FLOOR_RATE."""
    return SEND_MIN_S + nbytes / SEND_FLOOR_RATE


async def _serve_by_release(
    request: web.Request, lookup: Callable[[PeerBackend, str], bytes | None], what: str
) -> web.StreamResponse:
    """GET /peer/v1/<what>/<release id>: authenticated, the id checked, the answer sealed."""
    backend = request.app[RELEASE_BACKEND]
    rid = request.match_info["rid"]
    if not _HEX_RE.match(rid):
        return _refuse(backend, 400, "serve.drops.bad_request")
    body = lookup(backend, rid)
    if body is None:
        return _refuse(backend, 404, "serve.not_found")
    _count(backend, f"serve.{what}")
    return await _upload(request, lambda: _reply(request, body))


@gated(0, _count_refusal)
async def _get_manifest(request: web.Request, _: bytes) -> web.StreamResponse:
    return await _serve_by_release(request, lambda b, rid: b.manifest_document(rid), "manifests")


@gated(0, _count_refusal)
async def _get_bitmap(request: web.Request, _: bytes) -> web.StreamResponse:
    return await _serve_by_release(request, lambda b, rid: b.bitmap(rid), "bitmaps")


@gated(MAX_CHUNKS_REQUEST, _count_refusal)
async def _post_chunks(request: web.Request, raw: bytes) -> web.StreamResponse:
    backend = request.app[RELEASE_BACKEND]
    try:
        body = backend.codec.open(raw, max_size=MAX_CHUNKS_REQUEST)
    except AuthError:
        return _refuse(backend, 403, "serve.drops.auth")
    except DecodeError:
        return _refuse(backend, 400, "serve.drops.decode")
    try:
        doc = orjson.loads(body)
        ids = doc["ids"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return _refuse(backend, 400, "serve.drops.decode")
    if not isinstance(ids, list):
        return _refuse(backend, 400, "serve.drops.decode")
    aes = doc.get("cipher") == CIPHER_AES and backend.codec.aes  # another value: version 2
    if len(ids) > MAX_IDS:
        return _refuse(backend, 413, "serve.drops.too_big")
    if not all(is_chunk_id(i) for i in ids):
        return _refuse(backend, 400, "serve.drops.decode")

    async def piece() -> web.StreamResponse:
        codec = backend.codec
        body = await backend.read_piece(ids, codec.overhead, AES_TAIL if aes else 0)
        _count(backend, "serve.pieces")
        # Sealed where the files were read into, without a second lz4 attempt: stored forms are
        # lz4 already where that pays, and a piece is megabytes (each copy of it costs).
        return await _send(request, codec.seal_in_place(body, requester(request), aes=aes))

    return await _upload(request, piece)


def add_peer_routes(app: web.Application, backend: PeerBackend) -> None:
    """Add the distribution routes to a peer app (before it starts); an app without a PeerGate
    gets one with the backend's codec."""
    app[RELEASE_BACKEND] = backend
    if PEER_GATE not in app:
        app[PEER_GATE] = PeerGate(backend.codec)
    app.router.add_get(MANIFEST_PATH, _get_manifest)
    app.router.add_get(BITMAP_PATH, _get_bitmap)
    app.router.add_post(CHUNKS_PATH, _post_chunks)


def create_release_app(backend: PeerBackend) -> web.Application:
    """A stand-alone peer app with only the distribution routes (tests, tools)."""
    app = web.Application(client_max_size=MAX_CHUNKS_REQUEST)
    add_peer_routes(app, backend)
    return app
