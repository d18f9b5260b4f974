"""The publishing pipeline: chunk a path into the store (and an origin dir), build and sign
the manifest. Blocking work: the service runs it in a thread.

Origin dir layout (any static web server or object store can serve it; its URL, with a
trailing slash, is what the manifest's `origins` lists):

    <dir>/chunks/ab/cdef...          stored form of chunk abcdef... (as in the chunk store)
    <dir>/manifest.json              the latest signed manifest published into this dir
    <dir>/manifests/<release id>.json
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshd.crypto import load_publisher_private
from meshd.release.chunker import PublishError, StoredChunk, chunk_tree, walk
from meshd.release.manifest import Manifest, Signer
from meshd.release.store import ChunkStore, atomic_write

ProgressFn = Callable[[int, int], None]  # (bytes chunked, bytes in total)
PUBLISH_BATCH = 4 * 1024 * 1024  # stored bytes of new chunks per durability barrier


@dataclass(frozen=True)
class PublishResult:
    manifest: Manifest
    new_chunks: int  # chunks that were not in the store before
    stored_bytes: int  # stored bytes of the new chunks
    origin_dir: str | None


def origin_chunk_path(root: Path, cid: str) -> Path:
    return root / "chunks" / cid[:2] / cid[2:]


def export_origin(store: ChunkStore, manifest: Manifest, origin_dir: str | os.PathLike[str]) -> int:
    """Write a stored release as plain origin files; returns how many chunk files were written."""
    root = Path(origin_dir)
    written = 0
    for cid in manifest.unique_chunks():
        path = origin_chunk_path(root, cid)
        if not path.is_file():
            atomic_write(path, store.get_stored(cid), fsync=False, what=f"origin chunk {cid[:16]}")
            written += 1
    _write_origin_manifest(root, manifest)
    return written


def _write_origin_manifest(root: Path, manifest: Manifest) -> None:
    doc = manifest.to_bytes()
    atomic_write(root / "manifests" / f"{manifest.release_id}.json", doc, fsync=False, what="manifest")
    atomic_write(root / "manifest.json", doc, fsync=False, what="manifest")


def total_bytes(path: str | os.PathLike[str]) -> int:
    try:
        return sum(p.stat().st_size for p, _ in walk(Path(path)))
    except OSError as e:
        raise PublishError(f"cannot read {e.filename or path}: {e.strerror or e}") from e


def publish_tree(
    store: ChunkStore,
    path: str | os.PathLike[str],
    name: str,
    version: str,
    signer: Signer | str | os.PathLike[str],
    *,
    site: str | None = None,
    tags: Mapping[str, str] | None = None,
    origins: Sequence[str] = (),
    origin_dir: str | os.PathLike[str] | None = None,
    created: float | None = None,
    seq: int = 0,
    progress: ProgressFn | None = None,
) -> PublishResult:
    """Chunk `path` into the store, sign the manifest with `signer` (or a key file), store it.

    PublishError for an unpublishable path, ConfigError for a bad key file, IntegrityError for a
    manifest every node would refuse (bad name or version), StoreError when the disk is full.
    """
    if isinstance(signer, (str, os.PathLike)):
        signer = load_publisher_private(signer)
    origin_root = Path(origin_dir) if origin_dir is not None else None
    total = total_bytes(path) if progress is not None else 0
    done = 0
    new = 0
    new_stored = 0

    # New chunks are stored a batch at a time: one pair of durability barriers per batch
    # instead of two fsyncs per chunk (the publish is on the distribution clock).
    batch: dict[str, bytes] = {}
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch_bytes
        if batch:
            res = store.put_many(list(batch.items()), verify=False)
            batch.clear()
            batch_bytes = 0
            if res.error is not None:
                raise res.error

    def sink(chunk: StoredChunk) -> None:
        nonlocal done, new, new_stored, batch_bytes
        if chunk.id not in batch and not store.has(chunk.id):
            new += 1
            new_stored += len(chunk.stored)
            batch[chunk.id] = chunk.stored
            batch_bytes += len(chunk.stored)
            if batch_bytes >= PUBLISH_BATCH:
                flush()
        if origin_root is not None:
            opath = origin_chunk_path(origin_root, chunk.id)
            if not opath.is_file():
                atomic_write(opath, chunk.stored, fsync=False, what=f"origin chunk {chunk.id[:16]}")
        done += chunk.size
        if progress is not None:
            progress(done, total)

    tree = chunk_tree(path, sink)
    flush()  # every chunk is stored before the manifest that names it
    manifest = Manifest.build(
        name,
        version,
        tree,
        created=time.time() if created is None else created,
        seq=seq,
        site=site,
        tags=tags,
        origins=list(origins),
    ).sign(signer)
    store.put_manifest(manifest.release_id, manifest.to_bytes())
    if origin_root is not None:
        _write_origin_manifest(origin_root, manifest)
    if progress is not None:
        progress(tree.total_size, tree.total_size)
    return PublishResult(manifest, new, new_stored, str(origin_root) if origin_root else None)
