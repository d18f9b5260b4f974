"""Read an image to publish (an OCI layout directory, an oci-archive tar, a `docker save` tar),
verify every blob it needs, and stage it as the directory an image release is made of
(meshd/registry/image.py): blobs/sha256/<hex> + oci/image.json. Blocking file work.

Which tags: `tags` if given (each names a ref.name of the layout's index.json, or any tag when
the layout holds a single image), else the layout's ref.name annotations, else `default_tag`.
A docker archive (without an OCI layout inside, as Docker before 25 writes) is converted: its
config and layer tars become the blobs of an OCI image manifest written here; its RepoTags give
the tags.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import orjson

from meshd.errors import IntegrityError
from meshd.registry.image import (
    IMAGE_INDEX_PATH,
    Descriptor,
    ImageIndex,
    blob_path,
    check_repository,
    check_tag,
    digest_of,
    image_closure,
    parse_manifest,
)
from meshd.registry.rules import DIGEST_RE, MAX_MANIFEST_BYTES, OCI_MANIFEST

REF_NAME = "org.opencontainers.image.ref.name"
_READ = 1024 * 1024
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


class ImageSourceError(IntegrityError):
    """An image that cannot be published as it is; the message says what to fix."""


@dataclass(frozen=True)
class StagedImage:
    index: ImageIndex
    blobs: int
    size: int


def file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(_READ):
            h.update(block)
            size += len(block)
    return "sha256:" + h.hexdigest(), size


class _Layout:
    """Blobs of an OCI layout directory, each hashed once when first needed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sizes: dict[str, int] = {}
        folder = root / "blobs" / "sha256"
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and not p.is_symlink() and DIGEST_RE.fullmatch(f"sha256:{p.name}"):
                    self.sizes[f"sha256:{p.name}"] = p.stat().st_size
        self._verified: set[str] = set()

    def path(self, digest: str) -> Path:
        return self.root / blob_path(digest)

    def verify(self, digest: str) -> None:
        if digest in self._verified:
            return
        got, _ = file_digest(self.path(digest))
        if got != digest:
            raise ImageSourceError(f"blob {digest} in {self.root} has the content of {got}")
        self._verified.add(digest)

    def read(self, digest: str) -> bytes | None:
        if digest not in self.sizes:
            return None
        if self.sizes[digest] > MAX_MANIFEST_BYTES:
            raise ImageSourceError(f"manifest {digest} is over {MAX_MANIFEST_BYTES} bytes")
        self.verify(digest)
        return self.path(digest).read_bytes()


def _ref_tag(ref: str) -> str:
    """A ref.name is a tag ("v1") or a whole reference ("example.com/app:v1")."""
    tail = ref.rsplit("/", 1)[-1]
    return tail.rsplit(":", 1)[-1] if ":" in tail else tail


def _layout_tags(layout: _Layout, wanted: Sequence[str], default_tag: str) -> dict[str, Descriptor]:
    try:
        raw = (layout.root / "index.json").read_bytes()
    except OSError as e:
        raise ImageSourceError(f"{layout.root}: no index.json ({e.strerror})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ImageSourceError(f"{layout.root}/index.json is over {MAX_MANIFEST_BYTES} bytes")
    index = parse_manifest(raw, f"{layout.root}/index.json", "application/vnd.oci.image.index.v1+json")
    annotations = _annotations(raw)
    named: dict[str, Descriptor] = {}
    for desc, notes in zip(index.children, annotations, strict=False):
        if REF_NAME in notes:
            named.setdefault(_ref_tag(notes[REF_NAME]), desc)
    if not index.children:
        raise ImageSourceError(f"{layout.root}/index.json lists no image")
    if wanted:
        out = {}
        for tag in wanted:
            if tag in named:
                out[tag] = named[tag]
            elif len(index.children) == 1:
                out[tag] = index.children[0]
            else:
                raise ImageSourceError(f"{layout.root}: no image named {tag!r} (has {sorted(named)})")
        return out
    if named:
        return named
    if len(index.children) == 1:
        return {default_tag: index.children[0]}
    raise ImageSourceError(f"{layout.root} holds several images and none is named: give --image-tag")


class _Annotated(msgspec.Struct):
    annotations: dict[str, str] = {}


class _AnnotatedIndex(msgspec.Struct):
    manifests: list[_Annotated] = []


def _annotations(raw: bytes) -> list[dict[str, str]]:
    try:
        return [m.annotations for m in msgspec.json.decode(raw, type=_AnnotatedIndex).manifests]
    except msgspec.DecodeError:
        return []


def _docker_archive(root: Path, work: Path) -> Path:
    """A `docker save` tree -> an OCI layout under `work` (layer tars kept as they are), each
    image named by the tags it had (RepoTags)."""

    class _Entry(msgspec.Struct):
        Config: str
        Layers: list[str]
        RepoTags: list[str] | None = None

    try:
        entries = msgspec.json.decode((root / "manifest.json").read_bytes(), type=list[_Entry])
    except (OSError, msgspec.DecodeError) as e:
        raise ImageSourceError(f"{root}/manifest.json: {e}") from None
    layout = work / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def add(path: Path, media_type: str) -> Descriptor:
        if not path.is_file() or path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
            raise ImageSourceError(f"docker archive: {path.name} is missing or not a file")
        digest, size = file_digest(path)
        target = blobs / digest.removeprefix("sha256:")
        if not target.exists():
            _link_or_copy(path, target)
        return Descriptor(media_type, digest, size)

    children = []
    for entry in entries:
        config = add(root / entry.Config, OCI_CONFIG)
        layers = []
        for name in entry.Layers:
            with (root / name).open("rb") as f:
                gz = f.read(2) == b"\x1f\x8b"
            layers.append(add(root / name, OCI_LAYER_GZIP if gz else OCI_LAYER))
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [d.to_json() for d in layers],
        }
        data = orjson.dumps(doc)
        digest = digest_of(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        for ref in entry.RepoTags or [""]:
            note = {REF_NAME: _ref_tag(ref)} if ref else {}
            children.append({**Descriptor(OCI_MANIFEST, digest, len(data)).to_json(), "annotations": note})
    (layout / "oci-layout").write_bytes(b'{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_bytes(orjson.dumps({"schemaVersion": 2, "manifests": children}))
    return layout


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _unpack(archive: Path, work: Path) -> Path:
    out = work / "archive"
    out.mkdir()
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(out, filter="data")  # no links out, no absolute paths, no devices
    except (tarfile.TarError, OSError) as e:
        raise ImageSourceError(f"{archive}: cannot unpack: {e}") from None
    return out


def stage_image(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    repository: str,
    *,
    tags: Sequence[str] = (),
    default_tag: str = "latest",
) -> StagedImage:
    """Verify the image at `source` and write the image release's tree into `out_dir` (empty).

    ImageSourceError (an IntegrityError) for anything wrong with the image: a blob whose content
    is not its digest, a manifest naming a blob the image lacks, a manifest over 4 MiB, ...
    """
    check_repository(repository)
    for tag in tags:
        check_tag(tag)
    src = Path(source)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix=".meshd-image-", dir=out.parent) as tmp:
        work = Path(tmp)
        root = src if src.is_dir() else _unpack(src, work) if src.is_file() else None
        if root is None:
            raise ImageSourceError(f"{src}: no such file or directory")
        if not (root / "index.json").is_file():
            if not (root / "manifest.json").is_file():
                raise ImageSourceError(f"{src}: neither an OCI layout (index.json) nor a docker archive")
            root = _docker_archive(root, work)
        layout = _Layout(root)
        roots = _layout_tags(layout, tags, default_tag)
        for tag in roots:
            check_tag(tag)
        needed: dict[str, Descriptor] = {}
        for desc in roots.values():
            for d in image_closure(desc, layout.read, layout.sizes):
                needed[d.digest] = d
        total = 0
        for digest in needed:
            layout.verify(digest)
            target = out / blob_path(digest)
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(layout.path(digest), target)
            total += layout.sizes[digest]
        index = ImageIndex(repository, roots)
        (out / IMAGE_INDEX_PATH).parent.mkdir(parents=True, exist_ok=True)
        (out / IMAGE_INDEX_PATH).write_bytes(index.to_bytes())
    return StagedImage(index, len(needed), total)
