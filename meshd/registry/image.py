"""Image documents without I/O: OCI/Docker manifests and indexes, and the image index a release
carries (`oci/image.json`), which is what makes a release an image release.

An image release's files:

    blobs/sha256/<hex>   every blob of the image: indexes, manifests, configs, layers
    oci/image.json       {"format": 1, "repository": str,
                          "tags": {tag: {"digest", "mediaType", "size"}}}

The release is signed, so a tag resolves only through a signed release: a node that serves a
blob cannot repoint a tag, and every blob is checked against its digest when served.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

from meshd.errors import IntegrityError
from meshd.registry.rules import (
    DIGEST_RE,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    NAME_RE,
    TAG_RE,
)

IMAGE_INDEX_PATH = "oci/image.json"
BLOBS_DIR = "blobs/sha256"
FORMAT = 1
MAX_TAGS = 256


def blob_path(digest: str) -> str:
    """Where a blob is inside an image release (and an OCI layout)."""
    return f"{BLOBS_DIR}/{digest.removeprefix('sha256:')}"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


class _Desc(msgspec.Struct, frozen=True):
    digest: str
    size: int
    mediaType: str = ""
    annotations: dict[str, str] = {}


class _Doc(msgspec.Struct, frozen=True):
    schemaVersion: int = 2
    mediaType: str = ""
    config: _Desc | None = None
    layers: list[_Desc] = []
    manifests: list[_Desc] = []


def _descriptor(d: _Desc, where: str) -> Descriptor:
    if not DIGEST_RE.fullmatch(d.digest):
        raise IntegrityError(f"{where}: digest {d.digest[:80]!r} is not sha256:<64 hex>")
    if d.size < 0:
        raise IntegrityError(f"{where}: negative size for {d.digest}")
    return Descriptor(d.mediaType, d.digest, d.size)


@dataclass(frozen=True)
class ManifestDoc:
    """A parsed manifest or index: its media type and the blobs it references."""

    media_type: str
    children: tuple[Descriptor, ...]  # an index's manifests
    blobs: tuple[Descriptor, ...]  # a manifest's config and layers

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def parse_manifest(data: bytes, where: str, media_type: str = "") -> ManifestDoc:
    """A manifest or index blob; IntegrityError when it is too big, not JSON or of no known type.

    The type is the document's own mediaType, else the descriptor's, else guessed from its shape
    (an OCI layout's index.json children may omit neither, but Docker ones do).
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{where}: manifest of {len(data)} bytes is over {MAX_MANIFEST_BYTES}")
    try:
        doc = msgspec.json.decode(data, type=_Doc)
    except msgspec.DecodeError as e:
        raise IntegrityError(f"{where}: not a manifest: {e}") from None
    kind = doc.mediaType or media_type
    if not kind:
        kind = "application/vnd.oci.image.index.v1+json" if doc.manifests else ""
        kind = kind or "application/vnd.oci.image.manifest.v1+json"
    if kind not in MANIFEST_TYPES:
        raise IntegrityError(f"{where}: unsupported manifest media type {kind[:100]!r}")
    if kind in INDEX_TYPES:
        return ManifestDoc(kind, tuple(_descriptor(d, where) for d in doc.manifests), ())
    if doc.config is None:
        raise IntegrityError(f"{where}: image manifest without a config")
    blobs = [_descriptor(doc.config, where)] + [_descriptor(d, where) for d in doc.layers]
    return ManifestDoc(kind, (), tuple(blobs))


def image_closure(
    root: Descriptor, read: Callable[[str], bytes | None], sizes: Mapping[str, int]
) -> Iterator[Descriptor]:
    """Every blob a tag needs, root first; IntegrityError naming the first one missing or wrong.

    `read(digest)` gives a manifest's bytes (already checked against the digest), `sizes` every
    blob present with its size.
    """
    todo = [(root, "tag")]
    seen: set[str] = set()
    while todo:
        desc, parent = todo.pop()
        if desc.digest in seen:
            continue
        seen.add(desc.digest)
        size = sizes.get(desc.digest)
        if size is None:
            raise IntegrityError(f"{parent} references blob {desc.digest}, which the image lacks")
        if size != desc.size:
            raise IntegrityError(f"{parent} says {desc.digest} has {desc.size} bytes; it has {size}")
        yield desc
        if desc.media_type in MANIFEST_TYPES or desc is root:
            data = read(desc.digest)
            if data is None:
                raise IntegrityError(f"{parent} references manifest {desc.digest}, which the image lacks")
            doc = parse_manifest(data, f"manifest {desc.digest}", desc.media_type)
            where = f"manifest {desc.digest}"
            todo += [(d, where) for d in reversed(doc.children + doc.blobs)]


# --- the image index of a release -----------------------------------------------------------


@dataclass(frozen=True)
class ImageIndex:
    """What `oci/image.json` of an image release says: repository and tag -> root descriptor."""

    repository: str
    tags: Mapping[str, Descriptor]

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "repository": self.repository,
            "tags": {t: d.to_json() for t, d in sorted(self.tags.items())},
        }
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"


class _IndexDoc(msgspec.Struct, frozen=True):
    format: int
    repository: str
    tags: dict[str, _Desc]


def parse_image_index(data: bytes) -> ImageIndex:
    """`oci/image.json`; IntegrityError for anything the publisher could not have written."""
    try:
        doc = msgspec.json.decode(data, type=_IndexDoc)
    except msgspec.DecodeError as e:
        raise IntegrityError(f"{IMAGE_INDEX_PATH}: {e}") from None
    if doc.format != FORMAT:
        raise IntegrityError(f"{IMAGE_INDEX_PATH}: unsupported format {doc.format}")
    check_repository(doc.repository)
    if len(doc.tags) > MAX_TAGS:
        raise IntegrityError(f"{IMAGE_INDEX_PATH}: more than {MAX_TAGS} tags")
    tags = {}
    for tag, d in doc.tags.items():
        check_tag(tag)
        desc = _descriptor(d, IMAGE_INDEX_PATH)
        if desc.media_type not in MANIFEST_TYPES:
            raise IntegrityError(f"{IMAGE_INDEX_PATH}: tag {tag} points at a {desc.media_type!r}")
        tags[tag] = desc
    return ImageIndex(doc.repository, tags)


def check_repository(name: str) -> str:
    if len(name) > 255 or not NAME_RE.fullmatch(name):
        raise IntegrityError(f"repository name {name[:100]!r} is not a valid OCI name")
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise IntegrityError(f"tag {tag[:130]!r} is not a valid OCI tag")
    return tag
