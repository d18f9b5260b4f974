"""Where the registry finds manifests and blobs: the `BlobSource` protocol, the catalog of image
releases this node holds (the release-backed source), and the digest check of every file served.

Tag resolution (only through signed, complete, installed image releases): among the releases
whose `oci/image.json` names the repository and tag, the newest by release order (seq, as the
adoption policy orders releases) wins; with two versions of a release installed at once (the
`keep` rule keeps old ones), the tag follows the newer one while the older one's blobs stay
servable by digest. Two different releases naming the same repository and tag: the newest by
release order too, then the release name, so every node of a mesh answers alike.

A second source of blobs (a pull-through cache) plugs in as another `BlobSource`: the registry
asks each source in turn for a digest and serves the first whose file passes the digest check.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meshd.core.adoption import release_order
from meshd.errors import IntegrityError
from meshd.registry.image import IMAGE_INDEX_PATH, Descriptor, ImageIndex, blob_path, parse_image_index
from meshd.release.manifest import Manifest

log = logging.getLogger("meshd.registry")
_READ = 1024 * 1024
MAX_IMAGE_INDEX = 1024 * 1024


@dataclass(frozen=True)
class BlobFile:
    """A file said to hold a blob (not yet checked against the digest)."""

    path: Path
    size: int


class BlobSource(Protocol):
    """Something that may hold blobs by digest: release files, a pull-through cache, ..."""

    def open(self, digest: str) -> BlobFile | None: ...


@dataclass(frozen=True)
class HeldRelease:
    """A signed, complete release installed on this node, and the directory it is in."""

    manifest: Manifest
    root: Path


@dataclass(frozen=True)
class ImageRelease:
    release: HeldRelease
    index: ImageIndex

    @property
    def name(self) -> str:
        return self.release.manifest.name

    @property
    def version(self) -> str:
        return self.release.manifest.version


@dataclass(frozen=True)
class Resolved:
    descriptor: Descriptor
    image: ImageRelease


def is_image_release(manifest: Manifest) -> bool:
    return any(f.path == IMAGE_INDEX_PATH for f in manifest.files)


class ReleaseImages:
    """The image releases among what `held()` lists; their indexes read once per release id."""

    def __init__(self, held: Callable[[], Iterable[HeldRelease]]) -> None:
        self._held = held
        self._indexes: dict[str, ImageIndex | None] = {}

    def images(self) -> list[ImageRelease]:
        out = []
        live = set()
        for rel in self._held():
            rid = rel.manifest.release_id
            live.add(rid)
            if not is_image_release(rel.manifest):
                continue
            if rid not in self._indexes:
                self._indexes[rid] = self._read_index(rel)
            index = self._indexes[rid]
            if index is not None:
                out.append(ImageRelease(rel, index))
        for rid in set(self._indexes) - live:
            del self._indexes[rid]
        return out

    @staticmethod
    def _read_index(rel: HeldRelease) -> ImageIndex | None:
        entry = next(f for f in rel.manifest.files if f.path == IMAGE_INDEX_PATH)
        try:
            data = (rel.root / IMAGE_INDEX_PATH).read_bytes()[: MAX_IMAGE_INDEX + 1]
            if len(data) != entry.size:  # the signed manifest says how big it is
                raise IntegrityError(f"{IMAGE_INDEX_PATH} has {len(data)} bytes, not {entry.size}")
            return parse_image_index(data)
        except (OSError, IntegrityError) as e:
            log.warning(
                "release %s %s: not served as an image: %s", rel.manifest.name, rel.manifest.version, e
            )
            return None

    def resolve(self, repository: str, tag: str) -> Resolved | None:
        hits = [
            (release_order(img.release.manifest), img.name, img)
            for img in self.images()
            if img.index.repository == repository and tag in img.index.tags
        ]
        if not hits:
            return None
        _, _, img = max(hits, key=lambda h: (h[0], h[1]))
        return Resolved(img.index.tags[tag], img)

    def tags(self, repository: str) -> list[str]:
        """Every tag a signed image release held here names for `repository`."""
        return sorted(
            {t for img in self.images() if img.index.repository == repository for t in img.index.tags}
        )

    def open(self, digest: str) -> BlobFile | None:
        """The release file of `digest`, in the newest release holding it (BlobSource)."""
        rel_path = blob_path(digest)
        for img in sorted(self.images(), key=lambda i: release_order(i.release.manifest), reverse=True):
            for f in img.release.manifest.files:
                if f.path == rel_path:
                    return BlobFile(img.release.root / rel_path, f.size)
        return None


class VerifiedFiles:
    """Which files were hashed and matched their digest, keyed by what a change would alter
    (path, inode, size, mtime_ns): a file is hashed once, not at every pull."""

    def __init__(self, max_entries: int = 65536) -> None:
        self._ok: dict[tuple[str, int, int, int], str] = {}
        self.max_entries = max_entries
        self.mismatches = 0

    @staticmethod
    def key(path: Path, st: os.stat_result) -> tuple[str, int, int, int]:
        return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)

    def known(self, key: tuple[str, int, int, int], digest: str) -> bool:
        return self._ok.get(key) == digest

    def mark(self, path: Path, digest: str) -> None:
        """`path` was hashed as it was written (a pull-through fetch): no need to hash it again."""
        try:
            key = self.key(path, path.stat())
        except OSError:
            return
        if len(self._ok) >= self.max_entries:
            self._ok.pop(next(iter(self._ok)))
        self._ok[key] = digest

    def check(self, key: tuple[str, int, int, int], digest: str, f: _Readable) -> bool:
        """Hash the open file; remember a match, count a mismatch (blocking: run in a thread)."""
        h = hashlib.sha256()
        f.seek(0)
        while block := f.read(_READ):
            h.update(block)
        f.seek(0)
        if "sha256:" + h.hexdigest() != digest:
            self.mismatches += 1
            self._ok.pop(key, None)
            return False
        if len(self._ok) >= self.max_entries:
            self._ok.pop(next(iter(self._ok)))
        self._ok[key] = digest
        return True


class _Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...

    def seek(self, offset: int, whence: int = ..., /) -> int: ...
