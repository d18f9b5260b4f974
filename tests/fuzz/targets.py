"""Fuzz targets: plain functions shared by the atheris entry points and the corpus replay.

Each target takes the raw fuzz bytes and returns normally when the code under test ended in one
of its documented outcomes (a value, or one of the errors its docstring promises). Anything
else escapes: an unexpected exception, a 5xx answer or a broken round trip (`Finding`). The
atheris harnesses (tests/fuzz/fuzz_*.py) report what escapes as a crash; the replay test
(tests/unit/test_fuzz_corpus.py) fails on it.

No sockets, no real time in the outcome, no atheris import: the replay runs in tests/unit
(under `unshare -n`). The fixed keys, names and addresses here are test material only.

Input layouts (the first byte picks a mode, so one corpus explores several doors):

    wire:     mode u8 | data
        0 data is an envelope for an insecure codec          -> open + decode_body
        1 data is an envelope for an encrypted codec         -> open + decode_body
        2 data is the inner plaintext (flags | cluster | payload), sealed here with the test
          key: what a key holder can send, so the fuzzer gets past the MAC
        3 data is a body                                     -> decode_body
    http:     method u8 | flags u8 | path len u8 | path | auth len u16 BE | auth | body
        flags bit0: the harness seals a fresh X-Meshd-Auth token for (method, path) instead of
                    sending the auth bytes (a key holder), bit1: the harness seals the body,
                    bit2: chunked (no Content-Length), bit3: no Content-Type
    manifest: mode u8 | document
        0 Manifest.from_bytes + check + verify as sent
        1 the same, but re-signed here by the trusted test key (when check() passes)
        2 data is a piece: expected count u8 | piece -> decode_piece + decode_chunk
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any
from unittest import mock
from urllib.parse import quote

import nacl.signing
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request

from meshd import crypto, wire
from meshd.core.config import LAN
from meshd.core.counters import Counters
from meshd.core.node import Node
from meshd.errors import DecodeError, IntegrityError
from meshd.net import peer_auth, peer_http
from meshd.release import chunker, peer
from meshd.release.chunker import ChunkedTree, FileChunks
from meshd.release.manifest import Manifest

Target = Callable[[bytes], None]

CLUSTER = "fuzz"
KEY = bytes(range(32))  # the golden vectors' KEY_A
KEY_2 = bytes(range(0x20, 0x40))  # KEY_B: a second key in the ring
NONCE = bytes(range(24))
PUBLISHER = nacl.signing.SigningKey(bytes(range(0x40, 0x60)))
TRUSTED = [bytes(PUBLISHER.verify_key)]
NOW = 1_700_000_000.0  # the core's clock for the stream handler
PEER_ADDR = ("127.0.0.1", 40000)
METHODS = ("GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS")


class Finding(AssertionError):
    """A documented contract broken without an exception: a 5xx, a round trip that differs."""


def insecure_codec() -> wire.Codec:
    return wire.Codec(CLUSTER, None)


def secure_codec(fixed_nonce: bool = False) -> wire.Codec:
    """fixed_nonce: the same bytes on every run (seed files that do not churn in git)."""
    return wire.Codec(
        CLUSTER, crypto.Keyring([KEY, KEY_2]), nonce_fn=(lambda: NONCE) if fixed_nonce else None
    )


# --- wire ----------------------------------------------------------------------------------------

_INSECURE = insecure_codec()
_SECURE = secure_codec()


def seal_inner(inner: bytes) -> bytes:
    """An envelope around arbitrary inner bytes, sealed with KEY (layout: meshd/wire.py)."""
    header = _SECURE.seal(b"")[: wire.HEADER_SIZE]
    return header + NONCE + crypto.secretbox_seal(inner, NONCE, KEY)


def wire_target(data: bytes) -> None:
    """Only DecodeError (AuthError is one) may leave the codec."""
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    try:
        if mode == 0:
            wire.decode_body(_INSECURE.open(rest))
        elif mode == 1:
            wire.decode_body(_SECURE.open(rest))
        elif mode == 2:
            wire.decode_body(_SECURE.open(seal_inner(rest)))
        else:
            wire.decode_body(rest)
    except DecodeError:
        pass


# --- peer HTTP routes ----------------------------------------------------------------------------


def _piece_store() -> dict[str, bytes]:
    blobs = [b"chunk one " * 40, bytes(range(256)) * 8]
    return {chunker.chunk_id(b): chunker.encode_chunk(b) for b in blobs}


def sample_manifest(signed: bool = True) -> Manifest:
    """A small real release: two files, three chunks."""
    store = _piece_store()
    ids = list(store)
    sizes = {cid: len(chunker.decode_chunk(s)) for cid, s in store.items()}
    files = [
        FileChunks("bin/app", 0o755, sizes[ids[0]] + sizes[ids[1]], [ids[0], ids[1]]),
        FileChunks("etc/app.conf", 0o644, sizes[ids[0]], [ids[0]]),
    ]
    tree = ChunkedTree(files, sizes)
    m = Manifest.build(
        "gateway-agent",
        "4.2.0",
        tree,
        created=NOW,
        site="plant-2",
        tags={"role": "edge"},
        origins=["http://127.0.0.1:8080/rel/"],
    )
    return m.sign(PUBLISHER) if signed else m


class MemoryBackend:
    """peer.PeerBackend over dicts: one release, its bitmap and two stored chunks."""

    def __init__(self, codec: wire.Codec) -> None:
        self.codec = codec
        self.counters = Counters()
        self.sent = 0
        m = sample_manifest()
        self.release_id = m.release_id
        self.documents = {m.release_id: m.to_bytes()}
        self.bitmaps = {m.release_id: b"\xc0"}
        self.stored = _piece_store()

    def _full(self, rid: str) -> str | None:
        hits = [full for full in self.documents if full.startswith(rid)]
        return hits[0] if len(hits) == 1 else None

    def manifest_document(self, rid: str) -> bytes | None:
        full = self._full(rid)
        return self.documents[full] if full else None

    def bitmap(self, rid: str) -> bytes | None:
        full = self._full(rid)
        return self.bitmaps.get(full) if full else None

    async def read_piece(self, ids: list[str], room: int, tail: int = 0) -> bytearray:
        return peer.piece_buffer([self.stored.get(i) for i in ids], room, tail)

    def upload_slot(self, source: str) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    async def upload_permit(self, nbytes: int) -> None:
        return None

    def count_sent(self, nbytes: int) -> None:
        self.sent += nbytes


class CoreStream:
    """The stream handler the runtime gives the peer app: a real core node, a fixed clock."""

    def __init__(self, codec: wire.Codec) -> None:
        self.codec = codec
        self.node = self.reset()

    def reset(self) -> Node:
        """A fresh node, so each input's outcome depends on that input alone (reproducible)."""
        self.node = Node("gw-a", "id-gw-a", "127.0.0.1:7788", LAN, self.codec, random.Random(1), NOW)
        return self.node

    def handle_stream(self, data: bytes, addr: str) -> bytes | None:
        return self.node.handle_stream(data, addr, NOW)


def make_peer_app() -> tuple[web.Application, MemoryBackend, CoreStream]:
    """The node's peer app: the push-pull route over a core node, plus the release routes."""
    codec = secure_codec()
    stream = CoreStream(codec)
    app = peer_http.create_peer_app(stream, codec)
    backend = MemoryBackend(codec)
    peer.add_peer_routes(app, backend)
    app.freeze()
    return app, backend, stream


def _header_text(raw: bytes) -> str:
    # What an HTTP parser lets through into a header value: no control characters but tab.
    return "".join(c for c in raw.decode("latin-1") if c == "\t" or " " <= c <= "~" or c >= "\xa0")


def _path(raw: bytes) -> str:
    # A request target as it arrives on the wire: raw bytes outside the URL alphabet are
    # percent-escaped (a parser would refuse them), %XX the fuzzer writes is kept.
    return "/" + quote(raw.lstrip(b"/"), safe="/%:@!$&'()*+,;=-._~")


def encode_http_input(
    method: str,
    path: str,
    body: bytes = b"",
    *,
    auth: bytes = b"",
    sign_token: bool = False,
    seal_body: bool = False,
    chunked: bool = False,
    no_content_type: bool = False,
) -> bytes:
    """The fuzz bytes for one request (the seed generator writes these)."""
    flags = sign_token | seal_body << 1 | chunked << 2 | no_content_type << 3
    raw_path = path.encode()[:255]
    return (
        bytes((METHODS.index(method), flags, len(raw_path)))
        + raw_path
        + len(auth).to_bytes(2, "big")
        + auth
        + body
    )


class _Transport:
    """Just enough of an asyncio transport for request.remote and the peer address."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return PEER_ADDR if name == "peername" else default

    def is_closing(self) -> bool:
        return False


async def _serve(app: web.Application, data: bytes) -> int:
    method = METHODS[data[0] % len(METHODS)]
    flags = data[1]
    n = data[2]
    path = _path(data[3 : 3 + n])
    pos = 3 + n
    n_auth = int.from_bytes(data[pos : pos + 2], "big")
    auth = data[pos + 2 : pos + 2 + n_auth]
    body = data[pos + 2 + n_auth :]
    codec = app[peer.RELEASE_BACKEND].codec
    headers: dict[str, str] = {}
    if flags & 2:
        body = codec.seal(body)
    if flags & 1:  # a valid token for the body as sent
        headers[peer_auth.AUTH_HEADER] = peer_auth.make_token(codec, method, path, len(body))
    elif auth:
        headers[peer_auth.AUTH_HEADER] = _header_text(auth)
    if flags & 4:
        headers["Transfer-Encoding"] = "chunked"
    else:
        headers["Content-Length"] = str(len(body))
    if not flags & 8:
        headers["Content-Type"] = peer.OCTETS
    protocol = mock.Mock(_reading_paused=False)
    payload = StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    if body:
        payload.feed_data(body)
    payload.feed_eof()
    request = make_mocked_request(
        method,
        path,
        headers,
        app=app,
        payload=payload,
        transport=_Transport(),
        client_max_size=peer_http.MAX_STREAM_BODY,
    )
    try:
        response = await app._handle(request)
    except web.HTTPException as e:  # what aiohttp's server turns into a plain answer
        return e.status
    return response.status


class HttpTarget:
    """Drives one request per input through the peer app's router and handlers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.app, self.backend, self.stream = make_peer_app()

    def __call__(self, data: bytes) -> None:
        if len(data) < 5:
            return
        self.stream.reset()
        status = self.loop.run_until_complete(_serve(self.app, data))
        if status >= 500:
            raise Finding(f"peer app answered {status}")

    def close(self) -> None:
        self.loop.close()


# --- manifests and pieces ------------------------------------------------------------------------


def manifest_target(data: bytes) -> None:
    """from_bytes: DecodeError; check / verify: IntegrityError; a parsed manifest round-trips."""
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 2:
        piece_target(rest)
        return
    try:
        m = Manifest.from_bytes(rest)
    except DecodeError:
        return
    again = Manifest.from_bytes(m.to_bytes())
    if again.release_id != m.release_id or again.signature != m.signature:
        raise Finding("manifest does not round-trip through to_bytes/from_bytes")
    try:
        m.check()
    except IntegrityError:
        pass
    else:
        m.unique_chunks()
        m.matches("plant-2", {"role": "edge"})
        if mode == 1:
            m = m.sign(PUBLISHER)
    with contextlib.suppress(IntegrityError):
        m.verify(TRUSTED)


def piece_target(data: bytes) -> None:
    """decode_piece: PeerProtocolError; each entry decode_chunk: IntegrityError; exact round trip."""
    if not data:
        return
    try:
        entries = peer.decode_piece(data[1:], data[0])
    except peer.PeerProtocolError:
        return
    if peer.encode_piece(entries) != data[1:]:
        raise Finding("piece does not round-trip through encode_piece")
    for stored in entries:
        if stored is None:
            continue
        with contextlib.suppress(IntegrityError):
            chunker.decode_chunk(stored)


def token_for(method: str, path: str, length: int = 0) -> bytes:
    """A sealed X-Meshd-Auth token as raw header bytes (seed material)."""
    return peer_auth.make_token(secure_codec(fixed_nonce=True), method, path, length).encode("ascii")


TARGETS: dict[str, Callable[[], Target]] = {
    "wire": lambda: wire_target,
    "http": HttpTarget,
    "manifest": lambda: manifest_target,
}
