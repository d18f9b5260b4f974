"""Release manifests: what a release is made of, who signed it, where it may be installed.

Document (JSON, keys sorted):

    {"manifest": {"format": 1, "name", "version", "target": {"site": str|null, "tags": {k: v}},
                  "files": [{"path", "mode", "size", "chunks": [id, ...]}],
                  "chunks": {id: size}, "total_size", "hash": "blake3", "origins": [url],
                  "created": "YYYY-MM-DDTHH:MM:SSZ", "seq": int (absent: 0)},
     "signature": {"key": base64 Ed25519 public key, "sig": base64 signature} | null}

The canonical bytes are the `manifest` object encoded by orjson with sorted keys; the publisher
signs exactly those bytes (no prefix, so meshd.crypto.sign_manifest signs the same thing) and the
release id is their BLAKE3 hex. Unknown keys in `manifest` are kept and covered by the signature.

`Manifest.from_bytes` checks JSON and shapes (DecodeError); `verify(trusted)` checks signature,
then every semantic rule (IntegrityError): chunk list against files and sizes, paths that could
escape the release folder, bounds, name and version usable as directory names.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import blake3
import msgspec
import nacl.exceptions
import nacl.signing
import orjson

from meshd.errors import ConfigError, DecodeError, IntegrityError
from meshd.release.chunker import MAX_SIZE, MODE_MASK, ChunkedTree, is_chunk_id

FORMAT = 1
HASH_ALG = "blake3"
KEY_SIZE = 32
SIG_SIZE = 64
# Name and version become directory names under releases/: no separators, no leading dot
# (temp names start with "."), and never the "current" link's name.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
RESERVED_VERSIONS = frozenset({"current"})
MAX_SEQ = 2**53  # exact in every JSON reader; a publisher takes one above the highest it has seen


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * 1024 * 1024
    max_files: int = 100_000
    max_chunks: int = 262_144  # 16 GiB at 64 KiB
    max_path_bytes: int = 4096
    max_component_bytes: int = 255
    max_origins: int = 16
    max_url_len: int = 2048
    max_tags: int = 64


DEFAULT_LIMITS = Limits()


# --- shapes (checked by msgspec; a wrong type is a DecodeError naming the JSON path) ----------


class _File(msgspec.Struct, frozen=True):
    path: str
    mode: int
    size: int
    chunks: list[str]


class _Target(msgspec.Struct, frozen=True):
    site: str | None = None
    tags: dict[str, str] = {}


class _Body(msgspec.Struct, frozen=True):
    format: int
    name: str
    version: str
    files: list[_File]
    chunks: dict[str, int]
    total_size: int
    hash: str
    created: str
    target: _Target = _Target()
    origins: list[str] = []
    seq: int = 0  # release order of its name (core/adoption.py); 0 in manifests from before it


class _Signature(msgspec.Struct, frozen=True):
    key: str
    sig: str


class _Doc(msgspec.Struct, frozen=True):
    manifest: dict[str, Any]
    signature: _Signature | None = None


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    mode: int
    size: int
    chunks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Target:
    site: str | None = None
    tags: Mapping[str, str] | None = None

    def matches(self, site: str, tags: Mapping[str, str]) -> bool:
        if self.site is not None and self.site != site:
            return False
        return all(tags.get(k) == v for k, v in (self.tags or {}).items())


class Signer(Protocol):
    """What signs a manifest: meshd.crypto.PublisherKey fits, and so does a wrapped SigningKey."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


class NaclSigner:
    def __init__(self, key: nacl.signing.SigningKey) -> None:
        self._key = key

    @property
    def public_key(self) -> bytes:
        return bytes(self._key.verify_key)

    def sign(self, data: bytes) -> bytes:
        return bytes(self._key.sign(data).signature)

    def __repr__(self) -> str:  # never print key material
        return f"NaclSigner({_b64(self.public_key)})"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DecodeError(f"manifest {what} is not base64") from e
    if len(raw) != size:
        raise DecodeError(f"manifest {what} must be {size} bytes, got {len(raw)}")
    return raw


def _read_key_text(path: str | Path, what: str) -> bytes:
    try:
        text = Path(path).read_bytes()[:4096]
        return base64.b64decode(text.strip(), validate=True)
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from e
    except (binascii.Error, ValueError) as e:
        raise ConfigError(f"{what} {path}: not base64 text") from e


def load_signing_key(path: str | Path) -> NaclSigner:
    """Publisher private key file: base64 of the 32-byte seed (64-byte seed+public accepted)."""
    raw = _read_key_text(path, "publisher key file")
    if len(raw) == 2 * KEY_SIZE:
        raw = raw[:KEY_SIZE]
    if len(raw) != KEY_SIZE:
        raise ConfigError(f"publisher key file {path}: expected 32 bytes, got {len(raw)}")
    return NaclSigner(nacl.signing.SigningKey(raw))


def load_public_key(path: str | Path) -> bytes:
    """Publisher public key file (FILE.pub): base64 of the 32-byte Ed25519 public key."""
    raw = _read_key_text(path, "publisher public key file")
    if len(raw) != KEY_SIZE:
        raise ConfigError(f"publisher public key file {path}: expected 32 bytes, got {len(raw)}")
    return raw


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Manifest:
    """A parsed (not yet trusted) release manifest. Call verify() before using it."""

    __slots__ = (
        "_body",
        "_canonical",
        "chunks",
        "created",
        "files",
        "format",
        "hash_alg",
        "name",
        "origins",
        "release_id",
        "seq",
        "signature",
        "target",
        "total_size",
        "version",
    )

    def __init__(self, body: dict[str, Any], signature: tuple[bytes, bytes] | None = None):
        try:
            parsed = msgspec.convert(body, _Body)
        except msgspec.ValidationError as e:
            raise DecodeError(f"bad manifest: {e}") from e
        self._body = body
        self._canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        self.release_id: str = blake3.blake3(self._canonical).hexdigest()
        self.format = parsed.format
        self.name = parsed.name
        self.version = parsed.version
        self.target = Target(parsed.target.site, dict(parsed.target.tags))
        self.files: tuple[FileEntry, ...] = tuple(
            FileEntry(f.path, f.mode, f.size, tuple(f.chunks)) for f in parsed.files
        )
        self.chunks: dict[str, int] = dict(parsed.chunks)
        self.total_size = parsed.total_size
        self.hash_alg = parsed.hash
        self.origins: tuple[str, ...] = tuple(parsed.origins)
        self.created = parsed.created  # informational only: never used to order releases
        self.seq = parsed.seq
        self.signature = signature  # (public key, signature)

    # --- building and encoding ---------------------------------------------------------------

    @classmethod
    def build(
        cls,
        name: str,
        version: str,
        tree: ChunkedTree,
        *,
        created: float,
        seq: int = 0,
        site: str | None = None,
        tags: Mapping[str, str] | None = None,
        origins: Sequence[str] = (),
    ) -> Manifest:
        body: dict[str, Any] = {
            "format": FORMAT,
            "name": name,
            "version": version,
            "target": {"site": site, "tags": dict(tags or {})},
            "files": [
                {"path": f.path, "mode": f.mode, "size": f.size, "chunks": list(f.chunks)} for f in tree.files
            ],
            "chunks": dict(tree.chunk_sizes),
            "total_size": tree.total_size,
            "hash": HASH_ALG,
            "origins": list(origins),
            "created": _iso(created),
        }
        if seq:
            body["seq"] = seq
        return cls(body)

    def canonical_bytes(self) -> bytes:
        """The signed bytes; the release id is their BLAKE3."""
        return self._canonical

    def sign(self, signer: Signer | nacl.signing.SigningKey) -> Manifest:
        if isinstance(signer, nacl.signing.SigningKey):
            signer = NaclSigner(signer)
        self.check()  # never sign something every node would refuse
        sig = signer.sign(self._canonical)
        return Manifest(self._body, (bytes(signer.public_key), bytes(sig)))

    def to_bytes(self) -> bytes:
        sig = None
        if self.signature is not None:
            sig = {"key": _b64(self.signature[0]), "sig": _b64(self.signature[1])}
        return orjson.dumps({"manifest": self._body, "signature": sig}, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits = DEFAULT_LIMITS) -> Manifest:
        if len(data) > limits.max_bytes:
            raise DecodeError(f"manifest of {len(data)} bytes exceeds {limits.max_bytes}")
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise DecodeError(f"manifest is not valid JSON: {e}") from e
        try:
            doc = msgspec.convert(raw, _Doc)
        except msgspec.ValidationError as e:
            raise DecodeError(f"bad manifest document: {e}") from e
        signature = None
        if doc.signature is not None:
            signature = (
                _unb64(doc.signature.key, KEY_SIZE, "signature key"),
                _unb64(doc.signature.sig, SIG_SIZE, "signature"),
            )
        return cls(doc.manifest, signature)

    # --- checks ------------------------------------------------------------------------------

    def verify(self, trusted: Iterable[bytes], limits: Limits = DEFAULT_LIMITS) -> None:
        """Signature by one of `trusted` (raw 32-byte keys), then check(); IntegrityError."""
        trusted_set = {bytes(k) for k in trusted}
        if self.signature is None:
            raise IntegrityError(f"release {self.name} {self.version}: manifest is unsigned")
        key, sig = self.signature
        if key not in trusted_set:
            why = "no publisher key is trusted" if not trusted_set else "key not trusted"
            raise IntegrityError(f"release {self.name} {self.version}: signed by {_b64(key)} ({why})")
        try:
            nacl.signing.VerifyKey(key).verify(self._canonical, sig)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError) as e:
            raise IntegrityError(f"release {self.name} {self.version}: bad signature by {_b64(key)}") from e
        self.check(limits)

    def check(self, limits: Limits = DEFAULT_LIMITS) -> None:
        """Every rule except the signature; IntegrityError naming the first broken one."""
        where = f"release {self.name!r} {self.version!r}"
        if self.format != FORMAT:
            raise IntegrityError(f"{where}: unsupported manifest format {self.format}")
        if self.hash_alg != HASH_ALG:
            raise IntegrityError(f"{where}: unsupported hash algorithm {self.hash_alg!r}")
        if not NAME_RE.fullmatch(self.name):
            raise IntegrityError(f"{where}: name must match {NAME_RE.pattern}")
        if not NAME_RE.fullmatch(self.version) or self.version in RESERVED_VERSIONS:
            raise IntegrityError(f"{where}: version must match {NAME_RE.pattern}, not 'current'")
        if len(self.files) > limits.max_files:
            raise IntegrityError(f"{where}: {len(self.files)} files, limit {limits.max_files}")
        if len(self.chunks) > limits.max_chunks:
            raise IntegrityError(f"{where}: {len(self.chunks)} chunks, limit {limits.max_chunks}")
        if not self.files:
            raise IntegrityError(f"{where}: no files")
        if not 0 <= self.seq <= MAX_SEQ:
            raise IntegrityError(f"{where}: seq {self.seq} outside 0..{MAX_SEQ}")
        self._check_target(where, limits)
        self._check_files(where, limits)

    def _check_target(self, where: str, limits: Limits) -> None:
        if len(self.target.tags or {}) > limits.max_tags:
            raise IntegrityError(f"{where}: more than {limits.max_tags} target tags")
        if len(self.origins) > limits.max_origins:
            raise IntegrityError(f"{where}: more than {limits.max_origins} origin URLs")
        for url in self.origins:
            if len(url) > limits.max_url_len or not url.startswith(("http://", "https://")):
                raise IntegrityError(f"{where}: origin URL {url[:80]!r} is not http(s)")

    def _check_files(self, where: str, limits: Limits) -> None:
        for cid, size in self.chunks.items():
            if not is_chunk_id(cid):
                raise IntegrityError(f"{where}: chunk id {cid[:80]!r} is not 64 lowercase hex")
            if not 0 < size <= MAX_SIZE:
                raise IntegrityError(f"{where}: chunk {cid[:16]} has size {size}")
        used: set[str] = set()
        refs = 0
        total = 0
        previous = ""
        paths: set[str] = set()
        for f in self.files:
            check_release_path(f.path, limits)
            if f.path <= previous:
                raise IntegrityError(f"{where}: files not sorted or duplicated at {f.path!r}")
            previous = f.path
            paths.add(f.path)
            if not 0 <= f.mode <= MODE_MASK:
                raise IntegrityError(f"{where}: {f.path}: mode {f.mode:#o} outside 0o777")
            refs += len(f.chunks)
            if refs > limits.max_chunks:
                raise IntegrityError(f"{where}: more than {limits.max_chunks} chunk references")
            got = 0
            for cid in f.chunks:
                csize = self.chunks.get(cid)
                if csize is None:
                    raise IntegrityError(f"{where}: {f.path}: chunk {cid[:16]} missing from the chunk table")
                got += csize
                used.add(cid)
            if got != f.size:
                raise IntegrityError(
                    f"{where}: {f.path}: chunks add up to {got} bytes, file size is {f.size}"
                )
            total += f.size
        if used != set(self.chunks):
            raise IntegrityError(f"{where}: chunk table lists {len(set(self.chunks) - used)} unused chunks")
        if total != self.total_size:
            raise IntegrityError(f"{where}: files add up to {total}, total_size {self.total_size}")
        for p in paths:  # a file may not also be a directory of another file
            parts = p.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in paths:
                    raise IntegrityError(f"{where}: {p!r} is under file {'/'.join(parts[:i])!r}")

    # --- views --------------------------------------------------------------------------------

    def matches(self, site: str, tags: Mapping[str, str]) -> bool:
        """Whether a node of `site` with `tags` is a target of this release."""
        return self.target.matches(site, tags)

    def unique_chunks(self) -> list[str]:
        """Distinct chunk ids in first-appearance order (the index order of have-bitmaps)."""
        return list(dict.fromkeys(cid for f in self.files for cid in f.chunks))

    @property
    def single_file(self) -> bool:
        return len(self.files) == 1 and "/" not in self.files[0].path

    def __repr__(self) -> str:
        return f"Manifest({self.name} {self.version} {self.release_id[:16]})"


def check_release_path(path: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """A relative POSIX path that stays inside the release folder; IntegrityError otherwise."""
    if not path:
        raise IntegrityError("empty path in manifest")
    if "\x00" in path:
        raise IntegrityError(f"path {path[:80]!r} contains NUL")
    if len(path.encode("utf-8", "surrogatepass")) > limits.max_path_bytes:
        raise IntegrityError(f"path {path[:80]!r}... longer than {limits.max_path_bytes} bytes")
    if path.startswith("/"):
        raise IntegrityError(f"absolute path {path[:80]!r} escapes the release folder")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise IntegrityError(f"path {path[:80]!r} has a {part or 'empty'!r} component")
        if len(part.encode("utf-8", "surrogatepass")) > limits.max_component_bytes:
            raise IntegrityError(f"path {path[:80]!r} has a component over 255 bytes")
