"""The only place bytes become messages and messages become bytes (proto/PROTOCOL.md).

Layers, outside in:

    envelope  = version u8 (=1) | key id [4] (zeros = not encrypted) | box
    box       = nonce [24] | XSalsa20-Poly1305(inner)        (encrypted)
              = inner                                         (insecure)
    inner     = flags u8 (bit0 = lz4) | cluster len u8 | cluster [len] | payload
    payload   = body                                          (bit0 clear)
              = body size u32 LE | lz4 block of body          (bit0 set)
    body      = msgpack array of messages (a "compound"); each message is a msgspec
                array_like struct whose first element is its integer tag

Every function that takes bytes from the network raises only DecodeError or AuthError.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import lz4.block
import msgspec
import nacl.exceptions

from meshd.core.messages import Message
from meshd.crypto import (
    KEY_ID_SIZE,
    SECRETBOX_MAC_SIZE,
    SECRETBOX_NONCE_SIZE,
    Keyring,
    key_id,
    secretbox_open,
    secretbox_seal,
)
from meshd.errors import AuthError, DecodeError

__all__ = [
    "COMPRESS_MIN",
    "DEFAULT_MAX_SIZE",
    "HEADER_SIZE",
    "MAX_CLUSTER_NAME",
    "MAX_DATAGRAM",
    "VERSION",
    "Codec",
    "compound",
    "compound_size",
    "decode_body",
    "encode_body",
    "encode_message",
]

VERSION = 1
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
_BOX_OVERHEAD = SECRETBOX_NONCE_SIZE + SECRETBOX_MAC_SIZE

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


class Codec:
    """Seals bodies into envelopes and opens them, for one cluster and keyring.

    keyring None means insecure: packets carry a zero key id and no encryption; such a codec
    refuses encrypted packets, and an encrypting codec refuses insecure ones (AuthError).
    `nonce_fn` exists for golden vectors; leave it alone otherwise.
    """

    __slots__ = (
        "_cluster",
        "_compress",
        "_hdr_key",
        "_header",
        "_nonce_fn",
        "_prefix_lz4",
        "_prefix_plain",
        "cluster",
        "keyring",
        "overhead",
    )

    def __init__(
        self,
        cluster: str,
        keyring: Keyring | None,
        compress: bool = True,
        *,
        nonce_fn: Callable[[], bytes] | None = None,
    ) -> None:
        name = cluster.encode("utf-8")
        if len(name) > MAX_CLUSTER_NAME:
            raise ValueError(f"cluster name longer than {MAX_CLUSTER_NAME} bytes")
        self.cluster = cluster
        self.keyring = keyring
        self._cluster = name
        self._compress = compress
        self._nonce_fn = nonce_fn or _random_nonce
        self._prefix_plain = bytes((0, len(name))) + name
        self._prefix_lz4 = bytes((FLAG_LZ4, len(name))) + name
        self._hdr_key: bytes | None = None  # primary key the cached header belongs to
        self._header = bytes((VERSION,)) + _NO_KEY
        # lz4 is used only when it shrinks the payload, so it never adds to this bound.
        self.overhead: int = (
            HEADER_SIZE + (_BOX_OVERHEAD if keyring is not None else 0) + len(self._prefix_plain)
        )

    @property
    def secure(self) -> bool:
        return self.keyring is not None

    def body_budget(self, packet_size: int) -> int:
        """Largest body that always fits in a packet of `packet_size` bytes."""
        return packet_size - self.overhead

    def seal(self, body: bytes) -> bytes:
        """Wrap a body into an envelope (compressed when that is smaller, then encrypted)."""
        n = len(body)
        inner: bytes | None = None
        if self._compress and n >= COMPRESS_MIN:
            packed = _lz4_compress(body)  # stores the size as u32 LE in front
            if len(packed) < n:
                inner = self._prefix_lz4 + packed
        if inner is None:
            inner = self._prefix_plain + body
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

    def _unwrap(self, inner: bytes, max_size: int) -> bytes:
        prefix = self._prefix_plain
        if inner.startswith(prefix):
            return inner[len(prefix) :]
        prefix = self._prefix_lz4
        if not inner.startswith(prefix):
            if len(inner) < 2 or len(inner) < 2 + inner[1]:
                raise DecodeError("truncated envelope")
            if inner[2 : 2 + inner[1]] != self._cluster:
                raise AuthError("packet from another cluster")
            raise DecodeError(f"unknown envelope flags {inner[0]:#04x}")
        view = memoryview(inner)[len(prefix) :]
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

    def pack(self, parts: list[bytes]) -> bytes:
        """seal(compound(parts))."""
        return self.seal(compound(parts))

    def unpack(self, data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> list[Message]:
        """decode_body(open(data)): an envelope straight to messages."""
        return decode_body(self.open(data, max_size))

    def __repr__(self) -> str:
        mode = "insecure" if self.keyring is None else "encrypted"
        return f"Codec({self.cluster!r}, {mode})"
