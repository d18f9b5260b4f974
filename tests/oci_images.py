"""Container images written by tests: OCI layouts (config + gzipped layer tars), archives of
them and `docker save` archives, built from bytes with their digests computed here."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class OciImage:
    manifest: bytes
    config: bytes
    layers: list[bytes]  # as stored (gzipped tars)
    tag: str = "v1"
    extra: dict[str, bytes] = field(default_factory=dict)

    @property
    def manifest_digest(self) -> str:
        return sha(self.manifest)

    def blobs(self) -> dict[str, bytes]:
        out = {sha(b): b for b in [self.manifest, self.config, *self.layers]}
        out.update(self.extra)
        return out


def make_image(
    seed: int = 1, layer_sizes: tuple[int, ...] = (3000, 70_000), tag: str = "v1", compresslevel: int = 9
) -> OciImage:
    """A runnable-shaped OCI image: gzipped layer tars of random files and a config naming them
    (compresslevel 1 for big random layers: gzip stores them as they are, quickly)."""
    rnd = __import__("random").Random(seed)
    raw_layers = [layer_tar({f"data/file{i}.bin": rnd.randbytes(n)}) for i, n in enumerate(layer_sizes)]
    layers = [gzip.compress(t, compresslevel=compresslevel, mtime=0) for t in raw_layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in raw_layers]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(b), "size": len(b)}
                for b in layers
            ],
        },
        sort_keys=True,
    ).encode()
    return OciImage(manifest, config, layers, tag)


def write_layout(root: Path, image: OciImage, *, skip: tuple[str, ...] = ()) -> Path:
    """An OCI image layout of `image` (blobs whose digest is in `skip` left out)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for digest, data in image.blobs().items():
        if digest not in skip:
            (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": len(image.manifest),
                "annotations": {"org.opencontainers.image.ref.name": image.tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    return root


def tar_dir(src: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(src)), recursive=False)
    return out


def write_docker_archive(out: Path, image: OciImage, repo_tag: str) -> Path:
    """A `docker save` archive (Docker before 25): manifest.json, the config, layer tars."""
    work = out.with_suffix(".d")
    work.mkdir()
    config_name = image.manifest_digest.removeprefix("sha256:")[:12] + ".json"
    (work / config_name).write_bytes(image.config)
    names = []
    for i, layer in enumerate(image.layers):
        (work / f"l{i}").mkdir()
        (work / f"l{i}" / "layer.tar").write_bytes(gzip.decompress(layer))
        names.append(f"l{i}/layer.tar")
    (work / "manifest.json").write_text(
        json.dumps([{"Config": config_name, "RepoTags": [repo_tag], "Layers": names}])
    )
    tar_dir(work, out)
    return out


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path)


DOCKER_MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
