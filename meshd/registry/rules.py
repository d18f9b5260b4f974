"""The OCI Distribution rules the registry follows, without I/O (h11-style: rules, then functions).

Rules (distribution-spec v1.1, what containerd 1.6 and skopeo send):
  * A repository name is path components joined by "/", each `[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*`,
    at most 255 characters: "..", "%2e", a leading "/", backslashes never match (NAME_INVALID).
  * A reference is a tag `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}` or a digest `sha256:<64 lowercase hex>`;
    other algorithms are refused (DIGEST_INVALID), a bad tag is MANIFEST_INVALID.
  * Routes: GET /v2/, GET|HEAD /v2/<name>/manifests/<reference>, GET|HEAD /v2/<name>/blobs/<digest>,
    GET /v2/<name>/tags/list (skopeo inspect lists tags; no pagination: tags are few).
    The name may contain "/", so the path tail is split at the last "/manifests/" or "/blobs/".
  * Range: one range of bytes ("bytes=a-b", "bytes=a-", "bytes=-n"); several ranges or another
    unit are ignored (a full 200 answer, as RFC 9110 allows); unsatisfiable ones are 416.
  * Errors: {"errors": [{"code", "message", "detail"}]} with the status of the code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from meshd.errors import MeshError

NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{NAME_COMPONENT}(?:/{NAME_COMPONENT})*")
MAX_NAME = 255
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # what registries accept; a bigger one is refused
API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")

# Media types of what a tag may point at (a manifest's own mediaType is its Content-Type).
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST})
OCTET_STREAM = "application/octet-stream"


class ErrorCode(Enum):
    """Distribution error codes used here (the value is the code's name in error bodies)."""

    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    NAME_INVALID = "NAME_INVALID"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    DIGEST_INVALID = "DIGEST_INVALID"
    UNSUPPORTED = "UNSUPPORTED"
    RANGE_INVALID = "RANGE_INVALID"  # not in the spec's table; the status is what clients read

    @property
    def status(self) -> int:
        return _STATUS[self]


_STATUS = {
    ErrorCode.BLOB_UNKNOWN: 404,
    ErrorCode.MANIFEST_UNKNOWN: 404,
    ErrorCode.MANIFEST_INVALID: 400,
    ErrorCode.NAME_INVALID: 400,
    ErrorCode.NAME_UNKNOWN: 404,
    ErrorCode.DIGEST_INVALID: 400,
    ErrorCode.UNSUPPORTED: 405,
    ErrorCode.RANGE_INVALID: 416,
}


class RegistryError(MeshError):
    """A request the registry answers with an OCI error body."""

    def __init__(self, code: ErrorCode, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)


def error_body(code: ErrorCode, message: str, detail: Any = None) -> bytes:
    return orjson.dumps({"errors": [{"code": code.name, "message": message, "detail": detail}]})


# --- names and references -------------------------------------------------------------------


def check_name(name: str) -> str:
    """The repository name, or NAME_INVALID (path tricks never match the grammar)."""
    if len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise RegistryError(ErrorCode.NAME_INVALID, "invalid repository name", {"name": name[:MAX_NAME]})
    return name


def is_digest(reference: str) -> bool:
    return DIGEST_RE.fullmatch(reference) is not None


def check_digest(value: str) -> str:
    """A sha256 digest, or DIGEST_INVALID (other algorithms are not served)."""
    if not is_digest(value):
        raise RegistryError(
            ErrorCode.DIGEST_INVALID, "invalid or unsupported digest", {"digest": value[:100]}
        )
    return value


@dataclass(frozen=True)
class Reference:
    tag: str | None = None
    digest: str | None = None


def parse_reference(reference: str) -> Reference:
    """A tag or a sha256 digest; DIGEST_INVALID or MANIFEST_INVALID (400) otherwise."""
    if ":" in reference:
        return Reference(digest=check_digest(reference))
    if TAG_RE.fullmatch(reference):
        return Reference(tag=reference)
    raise RegistryError(ErrorCode.MANIFEST_INVALID, "invalid tag", {"reference": reference[:128]})


# --- routes ---------------------------------------------------------------------------------


class Kind(Enum):
    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"


@dataclass(frozen=True)
class Route:
    kind: Kind
    name: str = ""
    reference: str = ""  # tag or digest (manifests), digest (blobs)


def parse_path(path: str) -> Route:
    """The request path (raw, still percent-encoded) -> Route; NAME_INVALID / NAME_UNKNOWN.

    The raw path is parsed: "%2e%2e" stays as written and fails the name grammar, and
    nothing is ever resolved against the file system.
    """
    if path in ("/v2/", "/v2"):
        return Route(Kind.BASE)
    if not path.startswith("/v2/"):
        raise RegistryError(ErrorCode.NAME_UNKNOWN, "not a registry path")
    tail = path[len("/v2/") :]
    if tail.endswith("/tags/list"):
        return Route(Kind.TAGS, check_name(tail.removesuffix("/tags/list")))
    for marker, kind in (("/manifests/", Kind.MANIFEST), ("/blobs/", Kind.BLOB)):
        at = tail.rfind(marker)
        if at > 0:
            name, reference = tail[:at], tail[at + len(marker) :]
            check_name(name)
            if kind is Kind.BLOB:
                check_digest(reference)
            else:
                parse_reference(reference)
            return Route(kind, name, reference)
    raise RegistryError(ErrorCode.NAME_UNKNOWN, "unknown registry route")


# --- Accept ---------------------------------------------------------------------------------


def accepts(accept_headers: list[str], media_type: str) -> bool:
    """Whether a manifest of `media_type` may be answered to these Accept headers.

    No Accept header (or */*) takes anything. Old Docker clients that send nothing get what is
    stored, as every registry does; a client that lists types gets only one of those.
    """
    listed: list[str] = []
    for header in accept_headers:
        for part in header.split(","):
            item = part.split(";", 1)[0].strip().lower()
            if item:
                listed.append(item)
    if not listed:
        return True
    return media_type.lower() in listed or "*/*" in listed or "application/*" in listed


# --- Range ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


_RANGE_RE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range asked for, None for the whole blob; RANGE_INVALID when unsatisfiable.

    A header this does not understand (another unit, several ranges) is ignored: the whole
    blob, 200, as RFC 9110 allows.
    """
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise _unsatisfiable(size)
        return ByteRange(max(0, size - n), size - 1)
    start = int(first)
    end = size - 1 if not last else min(int(last), size - 1)
    if last and int(last) < start:
        return None  # syntactically invalid: ignored
    if start >= size:
        raise _unsatisfiable(size)
    return ByteRange(start, end)


def _unsatisfiable(size: int) -> RegistryError:
    return RegistryError(ErrorCode.RANGE_INVALID, "range not satisfiable", {"size": size})
