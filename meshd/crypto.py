"""Keys: the cluster keyring (gossip and peer traffic), node identity, publisher signatures.

Cluster keys are 32 random bytes used with XSalsa20-Poly1305 (NaCl SecretBox). The keyring has
memberlist's semantics: the primary key encrypts, every installed key decrypts, so a key is
rotated with install (everywhere) -> use (everywhere) -> remove (everywhere). Each key is named
on the wire by a 4-byte key id so a receiver picks the right key without trial decryption.

Ed25519 (NaCl signing) is used for node identity and for release manifests; never per packet.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import os
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing
import orjson
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

from meshd.errors import ConfigError, IntegrityError, StateError

__all__ = [
    "KEY_ID_SIZE",
    "KEY_SIZE",
    "SIGNATURE_SIZE",
    "Keyring",
    "NodeIdentity",
    "PublisherKey",
    "fingerprint",
    "generate_cluster_key",
    "generate_publisher_key",
    "generate_publisher_keypair",
    "key_id",
    "load_publisher_private",
    "load_publisher_public",
    "read_key_file",
    "sign_manifest",
    "verify_manifest",
    "verify_signature",
    "write_key_file",
]

KEY_SIZE = 32
KEY_ID_SIZE = 4
SIGNATURE_SIZE = 64
NODE_KEY_FILE = "node.key"
_NO_KEY_ID = bytes(KEY_ID_SIZE)  # reserved on the wire for "not encrypted"
_MAX_KEY_FILE = 64 * 1024  # key files are tiny; refuse to slurp anything large

PathLike = str | os.PathLike[str]


# --- helpers ------------------------------------------------------------------------------------


def key_id(key: bytes) -> bytes:
    """4-byte identifier of a cluster key as carried in every envelope."""
    return hashlib.blake2b(key, digest_size=KEY_ID_SIZE, person=b"meshd-keyid").digest()


def fingerprint(key: bytes) -> str:
    """Short display form of a key (hex of its key id); safe to log, reveals nothing useful."""
    return key_id(key).hex()


def generate_cluster_key() -> bytes:
    return os.urandom(KEY_SIZE)


def _check_cluster_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise ConfigError(f"cluster key must be {KEY_SIZE} bytes")
    key = bytes(key)
    if key_id(key) == _NO_KEY_ID:  # 2**-32 odds; that id means "insecure" on the wire
        raise ConfigError("cluster key has a reserved key id; generate another key")
    return key


def write_private(path: PathLike, data: bytes) -> None:
    """Atomically write `data` to `path` with mode 0600 (never briefly world-readable)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # umask or a stale tmp file must not widen the mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_public(path: PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _read_small(path: PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise ConfigError(f"{what} {os.fspath(path)}: {e.strerror or e}") from e
    if len(data) > _MAX_KEY_FILE:
        raise ConfigError(f"{what} {os.fspath(path)}: file too large")
    return data


def _b64_key(text: bytes | str, size: int, where: str) -> bytes:
    if isinstance(text, str):
        text = text.encode("ascii", "replace")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ConfigError(f"{where}: not base64 text") from e
    if len(raw) != size:
        raise ConfigError(f"{where}: expected {size} bytes of key, got {len(raw)}")
    return raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def read_key_file(path: PathLike) -> bytes:
    """Read a cluster key file (base64 text of 32 bytes). ConfigError names the path."""
    data = _read_small(path, "cluster key file")
    key = _b64_key(data, KEY_SIZE, f"cluster key file {os.fspath(path)}")
    try:
        return _check_cluster_key(key)
    except ConfigError as e:
        raise ConfigError(f"cluster key file {os.fspath(path)}: {e}") from None


def write_key_file(path: PathLike, key: bytes) -> None:
    """Write a cluster key as base64 text, mode 0600."""
    write_private(path, (_b64(_check_cluster_key(key)) + "\n").encode("ascii"))


# --- keyring ------------------------------------------------------------------------------------


class Keyring:
    """Cluster keys with memberlist semantics: `primary` encrypts, all `keys` decrypt."""

    __slots__ = ("_by_id", "_keys")

    def __init__(self, keys: list[bytes], primary: bytes | None = None) -> None:
        checked = [_check_cluster_key(k) for k in keys]
        if primary is not None:
            primary = _check_cluster_key(primary)
            if primary not in checked:
                checked.insert(0, primary)
        if not checked:
            raise ConfigError("keyring needs at least one key")
        self._keys: list[bytes] = []
        self._by_id: dict[bytes, bytes] = {}
        for k in checked:
            self._add(k)
        if primary is not None:
            self.use(primary)

    def _add(self, key: bytes) -> None:
        if key in self._keys:
            return
        kid = key_id(key)
        if kid in self._by_id:  # two keys, one id: the receiver could not tell them apart
            raise StateError(f"key id {kid.hex()} collides with an installed key")
        self._keys.append(key)
        self._by_id[kid] = key

    @property
    def primary(self) -> bytes:
        return self._keys[0]

    @property
    def primary_id(self) -> bytes:
        return key_id(self._keys[0])

    @property
    def keys(self) -> list[bytes]:
        """All keys, primary first (a copy)."""
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def install(self, key: bytes) -> None:
        """Add a key for decryption; installing a key already present is a no-op."""
        self._add(_check_cluster_key(key))

    def use(self, key: bytes) -> None:
        """Make an installed key the primary (the one that encrypts)."""
        key = _check_cluster_key(key)
        if key not in self._keys:
            raise StateError(f"key {fingerprint(key)} is not installed")
        self._keys.remove(key)
        self._keys.insert(0, key)

    def remove(self, key: bytes) -> None:
        """Drop a key. The primary cannot be removed (use another key first)."""
        key = _check_cluster_key(key)
        if key not in self._keys:
            raise StateError(f"key {fingerprint(key)} is not installed")
        if key == self._keys[0]:
            raise StateError(f"key {fingerprint(key)} is the primary key; use another first")
        self._keys.remove(key)
        del self._by_id[key_id(key)]

    def by_id(self, kid: bytes) -> bytes | None:
        """The installed key with this 4-byte key id, or None."""
        return self._by_id.get(bytes(kid))

    def fingerprints(self) -> list[str]:
        """Display ids of every key, primary first."""
        return [fingerprint(k) for k in self._keys]

    # Serf's keyring file format: a JSON array of base64 keys, the first is the primary.
    @classmethod
    def load(cls, path: PathLike) -> Keyring:
        data = _read_small(path, "keyring file")
        where = f"keyring file {os.fspath(path)}"
        try:
            items = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON: {e}") from e
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{where}: expected a non-empty JSON array of base64 keys")
        keys = [_b64_key(i, KEY_SIZE, where) for i in items]
        try:
            return cls(keys)
        except (ConfigError, StateError) as e:
            raise ConfigError(f"{where}: {e}") from None

    def save(self, path: PathLike) -> None:
        write_private(path, orjson.dumps([_b64(k) for k in self._keys]) + b"\n")

    def __repr__(self) -> str:  # never print key material
        return f"Keyring({self.fingerprints()})"


# --- Ed25519: node identity and publisher keys ------------------------------------------------


def verify_signature(pubkey: bytes, data: bytes, sig: bytes) -> None:
    """Check an Ed25519 detached signature; IntegrityError when it does not match."""
    if len(pubkey) != KEY_SIZE or len(sig) != SIGNATURE_SIZE:
        raise IntegrityError("bad signature or public key size")
    try:
        nacl.signing.VerifyKey(bytes(pubkey)).verify(bytes(data), bytes(sig))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError) as e:
        raise IntegrityError("signature does not match") from e


class _Signer:
    __slots__ = ("_sk", "public_key")

    def __init__(self, seed: bytes) -> None:
        self._sk = nacl.signing.SigningKey(seed)
        self.public_key: bytes = bytes(self._sk.verify_key)

    def sign(self, data: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature of `data`."""
        return bytes(self._sk.sign(bytes(data)).signature)

    def verify(self, data: bytes, sig: bytes) -> None:
        verify_signature(self.public_key, data, sig)

    @property
    def seed(self) -> bytes:
        return bytes(self._sk)


class NodeIdentity(_Signer):
    """This node's Ed25519 key, kept in <data_dir>/node.key (base64 seed, mode 0600)."""

    __slots__ = ("node_id",)

    def __init__(self, seed: bytes) -> None:
        super().__init__(seed)
        self.node_id: str = node_id_of(self.public_key)

    @classmethod
    def load_or_create(cls, data_dir: PathLike) -> NodeIdentity:
        path = Path(data_dir) / NODE_KEY_FILE
        if path.exists():
            data = _read_small(path, "node key file")
            return cls(_b64_key(data, KEY_SIZE, f"node key file {path}"))
        ident = cls(os.urandom(KEY_SIZE))
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        write_private(path, (_b64(ident.seed) + "\n").encode("ascii"))
        return ident

    def __repr__(self) -> str:
        return f"NodeIdentity({self.node_id})"


def node_id_of(public_key: bytes) -> str:
    """Node id: hex of the 16-byte BLAKE2b of the node's Ed25519 public key."""
    return hashlib.blake2b(public_key, digest_size=16).hexdigest()


class PublisherKey(_Signer):
    """A release publisher's private key; `sign` signs manifests."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"PublisherKey({_b64(self.public_key)})"


def generate_publisher_keypair(out_path: PathLike) -> PublisherKey:
    """Write a new key: FILE (private seed, base64, mode 0600) and FILE.pub (public, base64)."""
    key = PublisherKey(os.urandom(KEY_SIZE))
    write_private(out_path, (_b64(key.seed) + "\n").encode("ascii"))
    _write_public(os.fspath(out_path) + ".pub", (_b64(key.public_key) + "\n").encode("ascii"))
    return key


generate_publisher_key = generate_publisher_keypair


def load_publisher_private(path: PathLike) -> PublisherKey:
    data = _read_small(path, "publisher key file")
    return PublisherKey(_b64_key(data, KEY_SIZE, f"publisher key file {os.fspath(path)}"))


def load_publisher_public(path: PathLike) -> bytes:
    """Read a FILE.pub (base64 text of a 32-byte Ed25519 public key)."""
    data = _read_small(path, "publisher public key file")
    pub = _b64_key(data, KEY_SIZE, f"publisher public key file {os.fspath(path)}")
    try:
        nacl.signing.VerifyKey(pub)
    except (nacl.exceptions.CryptoError, ValueError) as e:
        raise ConfigError(f"publisher public key file {os.fspath(path)}: invalid key") from e
    return pub


def sign_manifest(key: PublisherKey, data: bytes) -> bytes:
    return key.sign(data)


def verify_manifest(pubkey: bytes, data: bytes, sig: bytes) -> None:
    verify_signature(pubkey, data, sig)


# SecretBox primitives used by meshd.wire (kept here so all key handling lives in one module).
secretbox_seal = nacl.bindings.crypto_secretbox_easy
secretbox_open = nacl.bindings.crypto_secretbox_open_easy
SECRETBOX_NONCE_SIZE: int = nacl.bindings.crypto_secretbox_NONCEBYTES
SECRETBOX_MAC_SIZE: int = nacl.bindings.crypto_secretbox_MACBYTES


def secretbox_seal_in_place(buf: bytearray, box_at: int, nonce: bytes, key: bytes) -> None:
    """Encrypt buf[box_at + MAC:] in place into the box buf[box_at:] (MAC first), the bytes
    secretbox_seal would return. For large bodies (release pieces): no copy of the message
    and none of the box, which the Python binding makes twice (libsodium allows the overlap)."""
    if len(nonce) != SECRETBOX_NONCE_SIZE or len(key) != nacl.bindings.crypto_secretbox_KEYBYTES:
        raise ValueError("bad nonce or key size")
    mlen = len(buf) - box_at - SECRETBOX_MAC_SIZE
    if box_at < 0 or mlen < 0:
        raise ValueError("buffer too small for the box")
    p = _ffi.from_buffer(buf, require_writable=True)
    if _lib.crypto_secretbox_easy(p + box_at, p + box_at + SECRETBOX_MAC_SIZE, mlen, nonce, key) != 0:
        raise ValueError("secretbox failed")


def secretbox_open_in_place(buf: bytearray, box_at: int, nonce: bytes, key: bytes) -> memoryview | None:
    """Decrypt the box buf[box_at:] (MAC first) where it lies: the message is the view
    buf[box_at + MAC:], no new buffer (a received piece is megabytes). None when it does not
    authenticate (then the box is left as it was: libsodium checks the MAC first)."""
    if len(nonce) != SECRETBOX_NONCE_SIZE or len(key) != nacl.bindings.crypto_secretbox_KEYBYTES:
        return None
    clen = len(buf) - box_at
    if box_at < 0 or clen < SECRETBOX_MAC_SIZE:
        return None
    p = _ffi.from_buffer(buf, require_writable=True)
    # The message lands on the ciphertext itself (m == c + MAC): libsodium allows the overlap.
    if _lib.crypto_secretbox_open_easy(p + box_at + SECRETBOX_MAC_SIZE, p + box_at, clen, nonce, key) != 0:
        return None
    return memoryview(buf)[box_at + SECRETBOX_MAC_SIZE :]


def secretbox_open_view(box: memoryview, nonce: bytes, key: bytes) -> bytearray | None:
    """secretbox_open into one new buffer, reading the box where it lies (no copy of it).
    None when it does not authenticate."""
    if len(nonce) != SECRETBOX_NONCE_SIZE or len(key) != nacl.bindings.crypto_secretbox_KEYBYTES:
        return None
    if len(box) < SECRETBOX_MAC_SIZE:
        return None
    out = bytearray(len(box) - SECRETBOX_MAC_SIZE)
    rc = _lib.crypto_secretbox_open_easy(
        _ffi.from_buffer(out, require_writable=True), _ffi.from_buffer(box), len(box), nonce, key
    )
    return out if rc == 0 else None


# AES-256-GCM for release pieces (proto/PROTOCOL.md section 2.5): about twice XSalsa20-Poly1305's
# speed where the CPU has AES instructions, and pieces are most of a node's bytes. Only sealed
# for a requester that asks, by a node whose libsodium can; gossip keeps SecretBox.
AEAD_NONCE_SIZE: int = _lib.crypto_aead_aes256gcm_npubbytes()
AEAD_MAC_SIZE: int = _lib.crypto_aead_aes256gcm_abytes()


def aes_gcm_available() -> bool:
    """Whether this CPU runs libsodium's AES-256-GCM (it needs AES instructions)."""
    return bool(_lib.crypto_aead_aes256gcm_is_available())


@functools.lru_cache(maxsize=16)
def aes_piece_key(key: bytes) -> bytes:
    """The AES-256-GCM key derived from a cluster key: one key is never used by two ciphers."""
    return hashlib.blake2b(key, digest_size=KEY_SIZE, person=b"meshd-aes-gcm").digest()


def aes_gcm_seal_in_place(buf: bytearray, at: int, nonce: bytes, key: bytes) -> None:
    """Encrypt buf[at:-AEAD_MAC_SIZE] where it lies and write its tag into the last
    AEAD_MAC_SIZE bytes (room the caller left). `key` is already derived (aes_piece_key)."""
    if len(nonce) != AEAD_NONCE_SIZE or len(key) != KEY_SIZE:
        raise ValueError("bad nonce or key size")
    mlen = len(buf) - at - AEAD_MAC_SIZE
    if at < 0 or mlen < 0:
        raise ValueError("buffer too small for the tag")
    p, null = _ffi.from_buffer(buf, require_writable=True), _ffi.NULL
    rc = _lib.crypto_aead_aes256gcm_encrypt(p + at, null, p + at, mlen, null, 0, null, nonce, key)
    if rc != 0:
        raise ValueError("aes-256-gcm failed")


def aes_gcm_open_in_place(buf: bytearray, at: int, nonce: bytes, key: bytes) -> memoryview | None:
    """Decrypt buf[at:] (ciphertext, then its tag) where it lies; the message is the view
    buf[at:-AEAD_MAC_SIZE]. None when it does not authenticate; the buffer is then not
    promised to be as it was (libsodium may zero what it decrypted): drop it."""
    if len(nonce) != AEAD_NONCE_SIZE or len(key) != KEY_SIZE:
        return None
    clen = len(buf) - at
    if at < 0 or clen < AEAD_MAC_SIZE:
        return None
    p, null = _ffi.from_buffer(buf, require_writable=True), _ffi.NULL
    rc = _lib.crypto_aead_aes256gcm_decrypt(p + at, null, null, p + at, clen, null, 0, nonce, key)
    if rc != 0:
        return None
    return memoryview(buf)[at : len(buf) - AEAD_MAC_SIZE]
