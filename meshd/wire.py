"""The only place bytes become messages and messages become bytes (proto/PROTOCOL.md).

Layers, outside in:

    envelope  = version u8 (=1) | key id [4] (zeros = not encrypted) | box
    box       = nonce [24] | XSalsa20-Poly1305(inner)        (encrypted)
              = inner                                         (insecure)
    (version 3: nonce [12] | AES-256-GCM(inner) | tag [16]; release pieces only, when asked)
    inner     = flags u8 (bit0 = lz4) | cluster len u8 | cluster [len] | stamp
                | sender [8] | receiver [8] | payload
    stamp     = u64 LE: the sender's SenderClock (strictly increasing; meshd/replay.py)
    sender    = first 8 bytes of the sender's node id; receiver: the same of the node it is
                meant for, zeros = any node (a join to an address, a broadcast)
    payload   = body                                          (bit0 clear)
              = body size u32 LE | lz4 block of body          (bit0 set)
    body      = msgpack array of messages (a "compound"); each message is a msgspec
                array_like struct whose first element is its integer tag

Every function that takes bytes from the network raises only DecodeError or AuthError (of which
ReplayError: an envelope seen before, stale for its sender, or meant for another node).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import lz4.block
import msgspec
import nacl.exceptions

from meshd.core.messages import Message
from meshd.crypto import (
    AEAD_MAC_SIZE,
    AEAD_NONCE_SIZE,
    KEY_ID_SIZE,
    SECRETBOX_MAC_SIZE,
    SECRETBOX_NONCE_SIZE,
    Keyring,
    aes_gcm_available,
    aes_gcm_open_in_place,
    aes_gcm_seal_in_place,
    aes_piece_key,
    key_id,
    secretbox_open,
    secretbox_open_in_place,
    secretbox_open_view,
    secretbox_seal,
    secretbox_seal_in_place,
)
from meshd.errors import AuthError, DecodeError, ReplayError
from meshd.replay import SENDER_ID_SIZE, ReplayGuard, SenderClock, sender_id

__all__ = [
    "AES_TAIL",
    "COMPRESS_MIN",
    "DEFAULT_MAX_SIZE",
    "HEADER_SIZE",
    "MAX_CLUSTER_NAME",
    "MAX_DATAGRAM",
    "VERSION",
    "VERSION_AES",
    "Codec",
    "Opened",
    "compound",
    "compound_size",
    "decode_body",
    "encode_body",
    "encode_message",
]

VERSION = 2  # 2: stamp, sender and receiver in the inner header (replay protection)
VERSION_AES = 3  # version 2's inner envelope sealed with AES-256-GCM: release pieces, when asked
AES_TAIL = AEAD_MAC_SIZE  # room a version 3 envelope needs after its body, for the tag
HEADER_SIZE = 1 + KEY_ID_SIZE
MAX_DATAGRAM = 65507  # largest UDP payload over IPv4; the shell's receive buffer
DEFAULT_MAX_SIZE = 64 * 1024 * 1024  # largest body (after decompression) of a TCP frame
MAX_CLUSTER_NAME = 255  # bytes of UTF-8; the length is a u8
COMPRESS_MIN = 64  # bodies shorter than this never shrink under lz4 (4-byte size + tokens)
FLAG_LZ4 = 0x01
_KNOWN_FLAGS = FLAG_LZ4
_LZ4_SIZE = 4
_LZ4_MAX_RATIO = 255  # lz4 cannot expand more than ~255x; larger claims are lies
_NO_KEY = bytes(KEY_ID_SIZE)
_ANY = bytes(SENDER_ID_SIZE)
_STAMP_SIZE = 8
_REPLAY_FIELDS = _STAMP_SIZE + 2 * SENDER_ID_SIZE
_BOX_OVERHEAD = SECRETBOX_NONCE_SIZE + SECRETBOX_MAC_SIZE
# A version 3 envelope starts this far into the room seal_in_place is given, so that its inner
# envelope lies where version 2's does (the tag goes after it, in AES_TAIL bytes).
_AES_SKIP = _BOX_OVERHEAD - AEAD_NONCE_SIZE

_encoder = msgspec.msgpack.Encoder()
_body_decoder = msgspec.msgpack.Decoder(list[Message])
_lz4_compress = lz4.block.compress
_lz4_decompress = lz4.block.decompress
_LZ4Error = lz4.block.LZ4BlockError


# --- bodies -------------------------------------------------------------------------------------


def encode_message(msg: Message) -> bytes:
    """One message as msgpack (an array whose first element is the tag)."""
    return _encoder.encode(msg)


def encode_body(msgs: list[Message]) -> bytes:
    """A body straight from messages; equal to compound([encode_message(m) for m in msgs])."""
    return _encoder.encode(msgs)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xdd" + n.to_bytes(4, "big")
    raise ValueError("too many parts")


_SMALL_HEADERS = [bytes((0x90 | n,)) for n in range(16)]


def compound(parts: list[bytes]) -> bytes:
    """A body carrying several encoded messages: a msgpack array header, then the parts."""
    n = len(parts)
    header = _SMALL_HEADERS[n] if n < 16 else _array_header(n)
    return header + b"".join(parts)


def compound_size(part_sizes: list[int]) -> int:
    """Exact len(compound(parts)) for parts of these sizes, without building it."""
    n = len(part_sizes)
    header = 1 if n < 16 else 3 if n < 0x10000 else 5
    return header + sum(part_sizes)


def decode_body(body: bytes | memoryview) -> list[Message]:
    """Decode a body into messages. Any malformed input, unknown tag included: DecodeError."""
    try:
        return _body_decoder.decode(body)
    except (msgspec.DecodeError, ValueError) as e:
        # ValidationError subclasses msgspec.DecodeError; bad UTF-8 raises UnicodeDecodeError
        raise DecodeError(f"bad body: {e}") from None


# --- envelope -----------------------------------------------------------------------------------


def _random_nonce() -> bytes:
    return os.urandom(SECRETBOX_NONCE_SIZE)


class Opened(NamedTuple):
    """An opened envelope: the body and who sealed it for whom (meshd/replay.py)."""

    body: bytes
    sender: bytes  # 8 bytes; sender.hex() is a valid `to` for the answer
    stamp: int
    receiver: bytes  # 8 bytes, zeros: any node


class Codec:
    """Seals bodies into envelopes and opens them, for one cluster, keyring and node.

    keyring None means insecure: packets carry a zero key id and no encryption; such a codec
    refuses encrypted packets, and an encrypting codec refuses insecure ones (AuthError).
    `node_id` names this node as sender (and as the receiver it accepts); `clock` stamps what it
    seals; `guard`, when set, refuses replays (ReplayError). Codecs made by `variant` share all
    three. `nonce_fn` exists for golden vectors; leave it alone otherwise.
    """

    __slots__ = (
        "_aes",
        "_cluster",
        "_compress",
        "_hdr_key",
        "_header",
        "_nonce_fn",
        "_prefix_lz4",
        "_prefix_plain",
        "_sender",
        "clock",
        "cluster",
        "guard",
        "keyring",
        "node_id",
        "overhead",
    )

    def __init__(
        self,
        cluster: str,
        keyring: Keyring | None,
        compress: bool = True,
        *,
        node_id: str = "",
        clock: SenderClock | None = None,
        guard: ReplayGuard | None = None,
        nonce_fn: Callable[[], bytes] | None = None,
    ) -> None:
        name = cluster.encode("utf-8")
        if len(name) > MAX_CLUSTER_NAME:
            raise ValueError(f"cluster name longer than {MAX_CLUSTER_NAME} bytes")
        self.cluster = cluster
        self.keyring = keyring
        self.node_id = node_id
        self.clock = clock or SenderClock()
        self.guard = guard
        self._sender = sender_id(node_id)
        self._cluster = name
        self._compress = compress
        self._nonce_fn = nonce_fn or _random_nonce
        self._prefix_plain = bytes((0, len(name))) + name
        self._prefix_lz4 = bytes((FLAG_LZ4, len(name))) + name
        self._hdr_key: bytes | None = None  # primary key the cached header belongs to
        self._header = bytes((VERSION,)) + _NO_KEY
        self._aes = keyring is not None and aes_gcm_available()
        # lz4 is used only when it shrinks the payload, so it never adds to this bound.
        self.overhead: int = (
            HEADER_SIZE
            + (_BOX_OVERHEAD if keyring is not None else 0)
            + len(self._prefix_plain)
            + _REPLAY_FIELDS
        )

    def variant(self, *, compress: bool) -> Codec:
        """The same cluster, keyring, node, clock and guard, with another compression switch."""
        return Codec(
            self.cluster,
            self.keyring,
            compress,
            node_id=self.node_id,
            clock=self.clock,
            guard=self.guard,
            nonce_fn=self._nonce_fn,
        )

    @property
    def secure(self) -> bool:
        return self.keyring is not None

    @property
    def aes(self) -> bool:
        """Whether this codec seals and opens version 3 (AES-256-GCM) envelopes: encrypted, and
        this CPU runs libsodium's AES-GCM."""
        return self._aes

    def body_budget(self, packet_size: int) -> int:
        """Largest body that always fits in a packet of `packet_size` bytes."""
        return packet_size - self.overhead

    def seal(self, body: bytes, to: str = "", *, compress: bool = True) -> bytes:
        """Wrap a body into an envelope (compressed when that is smaller, then encrypted).

        `to` is the node id of the receiver (or the hex sender of an envelope being answered);
        empty when any node may take it (a join to an address). compress=False skips the lz4
        attempt for a body known not to shrink (release chunks are compressed already: the
        attempt cost more CPU than the encryption).
        """
        stamp = self.clock.stamp().to_bytes(_STAMP_SIZE, "little")
        ids = self._sender + (sender_id(to) if to else _ANY)
        n = len(body)
        inner: bytes | None = None
        if compress and self._compress and n >= COMPRESS_MIN:
            packed = _lz4_compress(body)  # stores the size as u32 LE in front
            if len(packed) < n:
                inner = b"".join((self._prefix_lz4, stamp, ids, packed))
        if inner is None:
            inner = b"".join((self._prefix_plain, stamp, ids, body))
        keyring = self.keyring
        if keyring is None:
            return self._header + inner
        key = keyring.primary
        if key is not self._hdr_key:  # keyring rotated: refresh the key id in the header
            self._header = bytes((VERSION,)) + key_id(key)
            self._hdr_key = key
        nonce = self._nonce_fn()
        return b"".join((self._header, nonce, secretbox_seal(inner, nonce, key)))

    def open(self, data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
        """Check and unwrap an envelope; returns the body. AuthError / DecodeError."""
        return self.open_envelope(data, max_size).body

    def open_envelope(self, data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> Opened:
        """Check and unwrap an envelope, with who sealed it for whom. AuthError / DecodeError."""
        if type(data) is not bytes:  # bytearray/memoryview from the shell: nacl wants bytes
            data = bytes(data)
        n = len(data)
        if n < HEADER_SIZE:
            raise DecodeError("truncated envelope")
        if data[0] != VERSION:
            raise DecodeError(f"unknown envelope version {data[0]}")
        if n > max_size + self.overhead:
            raise DecodeError("envelope too large")
        kid = data[1:HEADER_SIZE]
        keyring = self.keyring
        if keyring is None:
            if kid != _NO_KEY:
                raise AuthError("encrypted packet but this node runs insecure")
            inner = data[HEADER_SIZE:]
        else:
            if kid == _NO_KEY:
                raise AuthError("unencrypted packet but this node requires encryption")
            key = keyring.by_id(kid)
            if key is None:
                raise AuthError(f"unknown key id {kid.hex()}")
            if n < HEADER_SIZE + _BOX_OVERHEAD:
                raise DecodeError("truncated envelope")
            nonce_end = HEADER_SIZE + SECRETBOX_NONCE_SIZE
            try:
                inner = secretbox_open(data[nonce_end:], data[HEADER_SIZE:nonce_end], key)
            except (nacl.exceptions.CryptoError, ValueError, TypeError):
                raise AuthError("envelope does not authenticate") from None
        return self._unwrap(inner, max_size)

    def _unwrap(self, inner: bytes, max_size: int) -> Opened:
        end, compressed, sender, stamp, receiver = self._check_inner(inner)
        if not compressed:
            return Opened(inner[end:], sender, stamp, receiver)
        return Opened(self._decompress(memoryview(inner)[end:], max_size), sender, stamp, receiver)

    def _check_inner(self, inner: bytes | bytearray) -> tuple[int, bool, bytes, int, bytes]:
        """(where the body starts, lz4, sender, stamp, receiver) of an opened inner envelope,
        refused (DecodeError / AuthError / ReplayError) before its body costs any work."""
        if inner.startswith(self._prefix_plain):
            compressed = False
        elif inner.startswith(self._prefix_lz4):
            compressed = True
        else:
            if len(inner) < 2 or len(inner) < 2 + inner[1]:
                raise DecodeError("truncated envelope")
            if inner[2 : 2 + inner[1]] != self._cluster:
                raise AuthError("packet from another cluster")
            raise DecodeError(f"unknown envelope flags {inner[0]:#04x}")
        pos = len(self._prefix_plain)
        end = pos + _REPLAY_FIELDS
        if len(inner) < end:
            raise DecodeError("truncated envelope")
        stamp = int.from_bytes(inner[pos : pos + _STAMP_SIZE], "little")
        sender = bytes(inner[pos + _STAMP_SIZE : pos + _STAMP_SIZE + SENDER_ID_SIZE])
        receiver = bytes(inner[end - SENDER_ID_SIZE : end])
        # Checked before anything costs work: a misdirected or replayed envelope is not unpacked.
        if receiver != _ANY and self._sender != _ANY and receiver != self._sender:
            raise ReplayError("envelope meant for another node", sender)
        if self.guard is not None:
            refused = self.guard.check(sender, stamp)
            if refused is not None:
                raise ReplayError(f"{refused} envelope from sender {sender.hex()}", sender)
        return end, compressed, sender, stamp, receiver

    @staticmethod
    def _decompress(view: memoryview, max_size: int) -> bytes:
        if len(view) < _LZ4_SIZE:
            raise DecodeError("truncated compressed payload")
        size = int.from_bytes(view[:_LZ4_SIZE], "little")
        block = view[_LZ4_SIZE:]
        if size > max_size:
            raise DecodeError(f"decompressed body of {size} bytes exceeds {max_size}")
        if size > len(block) * _LZ4_MAX_RATIO:
            raise DecodeError("implausible decompressed size")
        try:
            body: bytes = _lz4_decompress(block, uncompressed_size=size)
        except (_LZ4Error, ValueError, MemoryError):
            raise DecodeError("bad lz4 payload") from None
        if len(body) != size:
            raise DecodeError("lz4 payload size mismatch")
        return body

    # --- large bodies (release pieces): one copy each way instead of four or five ------------

    def seal_in_place(self, buf: bytearray, to: str = "", *, aes: bool = False) -> bytearray | memoryview:
        """Seal buf[overhead:] where it lies, the envelope seal(that, to, compress=False) makes:
        the first `overhead` bytes are room for the envelope's header, left there by whoever
        filled the body (a served piece is read from its files straight into place).

        aes=True (the requester asked for AES-256-GCM): the caller left AES_TAIL bytes of room
        after the body too. The answer is then a version 3 envelope when self.aes (a view that
        starts inside the front room), else version 2's with that tail room cut off."""
        if len(buf) < self.overhead + (AES_TAIL if aes else 0):
            raise ValueError("buffer smaller than the envelope's header")
        if aes and not self._aes:  # asked for, but insecure or no AES-GCM here: version 2
            del buf[len(buf) - AES_TAIL :]
            aes = False
        stamp = self.clock.stamp().to_bytes(_STAMP_SIZE, "little")
        ids = self._sender + (sender_id(to) if to else _ANY)
        head = self._prefix_plain + stamp + ids
        keyring = self.keyring
        if keyring is None:
            at = len(self._header)
            buf[:at] = self._header
            buf[at : at + len(head)] = head
            return buf
        key = keyring.primary
        if key is not self._hdr_key:
            self._header = bytes((VERSION,)) + key_id(key)
            self._hdr_key = key
        box_at = HEADER_SIZE + SECRETBOX_NONCE_SIZE
        pos = box_at + SECRETBOX_MAC_SIZE
        buf[pos : pos + len(head)] = head
        if aes:
            nonce = self._nonce_fn()[:AEAD_NONCE_SIZE]
            buf[_AES_SKIP] = VERSION_AES
            buf[_AES_SKIP + 1 : _AES_SKIP + HEADER_SIZE] = self._header[1:]
            buf[_AES_SKIP + HEADER_SIZE : pos] = nonce
            aes_gcm_seal_in_place(buf, pos, nonce, aes_piece_key(key))
            return memoryview(buf)[_AES_SKIP:]
        nonce = self._nonce_fn()
        buf[:HEADER_SIZE] = self._header
        buf[HEADER_SIZE:box_at] = nonce
        secretbox_seal_in_place(buf, box_at, nonce, key)
        return buf

    def open_view(self, data: bytes | bytearray, max_size: int = DEFAULT_MAX_SIZE) -> memoryview:
        """open() for large bodies: the body as a view, with the same checks and errors
        (AuthError / DecodeError / ReplayError), of a version 2 or (if self.aes) 3 envelope. A
        bytearray is decrypted where it lies (a version 2 one that does not authenticate is left
        as it was); bytes into one new buffer."""
        keyring = self.keyring
        n = len(data)
        version = data[0] if n else 0
        if version == VERSION_AES and self._aes:
            return self._open_aes(data, max_size)
        if keyring is None or n < HEADER_SIZE + _BOX_OVERHEAD or version != VERSION:
            return memoryview(self.open(bytes(data), max_size))  # insecure or malformed: the plain path
        if n > max_size + self.overhead:
            raise DecodeError("envelope too large")
        key = self._key_of(data)
        nonce_end = HEADER_SIZE + SECRETBOX_NONCE_SIZE
        nonce = bytes(data[HEADER_SIZE:nonce_end])
        inner: memoryview | bytearray | None
        if isinstance(data, bytearray):
            inner = secretbox_open_in_place(data, nonce_end, nonce, key)
        else:
            inner = secretbox_open_view(memoryview(data)[nonce_end:], nonce, key)
        if inner is None:
            raise AuthError("envelope does not authenticate")
        return self._inner_body(inner, max_size)

    def _open_aes(self, data: bytes | bytearray, max_size: int) -> memoryview:
        n = len(data)
        if n < HEADER_SIZE + AEAD_NONCE_SIZE + AEAD_MAC_SIZE:
            raise DecodeError("truncated envelope")
        if n > max_size + self.overhead:
            raise DecodeError("envelope too large")
        key = aes_piece_key(self._key_of(data))
        at = HEADER_SIZE + AEAD_NONCE_SIZE
        nonce = bytes(data[HEADER_SIZE:at])
        buf = data if isinstance(data, bytearray) else bytearray(data)
        inner = aes_gcm_open_in_place(buf, at, nonce, key)
        if inner is None:
            raise AuthError("envelope does not authenticate")
        return self._inner_body(inner, max_size)

    def _key_of(self, data: bytes | bytearray) -> bytes:
        """The installed key an encrypted envelope names (AuthError when none)."""
        assert self.keyring is not None
        kid = bytes(data[1:HEADER_SIZE])
        if kid == _NO_KEY:
            raise AuthError("unencrypted packet but this node requires encryption")
        key = self.keyring.by_id(kid)
        if key is None:
            raise AuthError(f"unknown key id {kid.hex()}")
        return key

    def _inner_body(self, inner: memoryview | bytearray, max_size: int) -> memoryview:
        # The header fields are checked on a copy of them: _check_inner reads them as bytes.
        end, compressed, _, _, _ = self._check_inner(bytes(inner[: self.overhead + MAX_CLUSTER_NAME]))
        if compressed:
            return memoryview(self._decompress(memoryview(inner)[end:], max_size))
        return memoryview(inner)[end:]

    def pack(self, parts: list[bytes], to: str = "") -> bytes:
        """seal(compound(parts), to)."""
        return self.seal(compound(parts), to)

    def unpack(self, data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> list[Message]:
        """decode_body(open(data)): an envelope straight to messages."""
        return decode_body(self.open(data, max_size))

    def __repr__(self) -> str:
        mode = "insecure" if self.keyring is None else "encrypted"
        return f"Codec({self.cluster!r}, {mode})"
