"""Chunk store: layout, verification on write and read, bit rot, full disk, gc, manifests."""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import random
from pathlib import Path

import pytest

from meshd.errors import IntegrityError, MeshError
from meshd.release import store as store_mod
from meshd.release.chunker import FLAG_LZ4, chunk_id, encode_chunk
from meshd.release.store import ChunkStore, DiskFullError, StoreError

TEXT = b"the gateway chunk store " * 400
NOISE = random.Random(7).randbytes(40_000)


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "data")


def tree_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_layout_and_roundtrip(store: ChunkStore) -> None:
    cid = chunk_id(TEXT)
    assert not store.has(cid)
    assert store.put(cid, encode_chunk(TEXT)) == len(TEXT)
    path = store.root / "chunks" / cid[:2] / cid[2:]
    assert path.is_file()
    assert path.read_bytes()[0] == FLAG_LZ4  # stored compressed, with its header byte
    assert store.has(cid)
    assert store.get(cid) == TEXT
    assert store.get_stored(cid) == encode_chunk(TEXT)
    assert list(store.ids()) == [cid]


def test_put_data_and_missing(store: ChunkStore) -> None:
    a = store.put_data(TEXT)
    b = chunk_id(NOISE)
    assert a == chunk_id(TEXT)
    assert store.missing([b, a, b]) == [b]
    assert store.get(a) == TEXT


def test_put_rejects_wrong_bytes_and_writes_nothing(store: ChunkStore) -> None:
    cid = chunk_id(TEXT)
    with pytest.raises(IntegrityError, match="wrong bytes"):
        store.put(cid, encode_chunk(NOISE))
    assert not store.has(cid)
    assert tree_files(store.root / "chunks") == []
    assert store.counters["chunks.rejected"] == 1


def test_put_rejects_malformed_stored_form(store: ChunkStore) -> None:
    cid = chunk_id(TEXT)
    with pytest.raises(IntegrityError):
        store.put(cid, b"\x01\xff\xff\xff\x7f garbage")
    assert not store.has(cid)


def test_bad_ids_are_refused(store: ChunkStore) -> None:
    for bad in ["../../etc/passwd", "AB" * 32, "ab" * 31, ""]:
        with pytest.raises(IntegrityError):
            store.has(bad)


def test_bit_rot_is_detected_and_the_chunk_dropped(store: ChunkStore) -> None:
    cid = store.put_data(NOISE)
    path = store.path_for(cid)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="damaged"):
        store.get(cid)
    assert not store.has(cid)  # so the caller fetches it again
    assert store.counters["chunks.damaged"] == 1
    with pytest.raises(KeyError):
        store.get(cid)


def test_truncated_chunk_is_damaged_too(store: ChunkStore) -> None:
    cid = store.put_data(TEXT)
    path = store.path_for(cid)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(IntegrityError):
        store.get_stored(cid)
    assert store.missing([cid]) == [cid]


def test_full_disk_gives_store_error_and_leaves_no_temp(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = store.put_data(TEXT)
    real_write = os.write

    def full(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(store_mod.os, "write", full)
    cid = chunk_id(NOISE)
    with pytest.raises(StoreError, match="disk full") as info:
        store.put(cid, encode_chunk(NOISE))
    assert isinstance(info.value, MeshError)
    assert isinstance(info.value, DiskFullError)  # told apart from other write errors
    monkeypatch.undo()
    assert not store.has(cid)
    files = tree_files(store.root / "chunks")
    assert files == [f"{good[:2]}/{good[2:]}"]  # no temp file, the old chunk intact
    assert store.get(good) == TEXT
    assert store.put(cid, encode_chunk(NOISE)) == len(NOISE)  # works once space is back


def test_failed_rename_cleans_temp(store: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(src: str, dst: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(store_mod.os, "replace", broken)
    with pytest.raises(StoreError, match="I/O error") as info:
        store.put_data(TEXT)
    assert not isinstance(info.value, DiskFullError)
    monkeypatch.undo()
    assert tree_files(store.root / "chunks") == []


def test_full_disk_on_fsync(store: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "fsync", full)
    with pytest.raises(StoreError, match="disk full"):
        store.put_manifest("ab" * 32, b"{}")
    monkeypatch.undo()
    assert not store.has_manifest("ab" * 32)
    assert tree_files(store.root / "manifests") == []


def test_clean_temp_after_crash(store: ChunkStore) -> None:
    cid = store.put_data(TEXT)
    (store.path_for(cid).parent / ".tmp-abc").write_bytes(b"partial")
    (store.root / "manifests" / ".tmp-x").write_bytes(b"partial")
    assert store.clean_temp() == 2
    assert list(store.ids()) == [cid]


def test_gc_keeps_only_the_kept(store: ChunkStore) -> None:
    ids = [store.put_data(bytes([i]) * 1000) for i in range(6)]
    removed = store.gc(set(ids[:2]))
    assert removed == 4
    assert sorted(store.ids()) == sorted(ids[:2])
    assert all(store.has(c) for c in ids[:2])
    assert not any(store.has(c) for c in ids[2:])


def test_manifests(store: ChunkStore) -> None:
    rid = "cd" * 32
    store.put_manifest(rid, b'{"x":1}')
    assert store.has_manifest(rid)
    assert store.get_manifest(rid) == b'{"x":1}'
    assert store.manifests() == [rid]
    store.delete_manifest(rid)
    assert store.manifests() == []
    with pytest.raises(KeyError):
        store.get_manifest(rid)
    with pytest.raises(IntegrityError):
        store.put_manifest("../x", b"")


def test_reopen_sees_the_same_chunks(tmp_path: Path) -> None:
    """Resume: verified chunks persist across restarts."""
    a = ChunkStore(tmp_path)
    cid = a.put_data(NOISE)
    b = ChunkStore(tmp_path)
    assert b.has(cid)
    assert b.get(cid) == NOISE
    assert b.size_bytes() == len(encode_chunk(NOISE))


# --- put_many: a fetched piece stored with one pair of barriers --------------------------------

CHUNKS = [random.Random(i).randbytes(20_000 + i) for i in range(6)]


def stored_pairs() -> list[tuple[str, bytes]]:
    return [(chunk_id(c), encode_chunk(c)) for c in CHUNKS]


class Barriers:
    """A fake syncfs: counts calls and what the chunk tree held at each."""

    def __init__(self, root: Path, fail_at: int | None = None) -> None:
        self.root = root
        self.seen: list[list[str]] = []
        self.fail_at = fail_at

    def __call__(self, fd: int) -> int:
        self.seen.append(tree_files(self.root))
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            ctypes.set_errno(errno.EIO)  # what the caller reads, as after a real failed syscall
            return -1
        return 0


def test_put_many_stores_a_piece_with_two_barriers_and_no_fsync(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = stored_pairs()
    first = store.put_data(CHUNKS[0])  # already held: counted as stored, not rewritten
    wrong = chunk_id(b"something else")
    barriers = Barriers(store.chunk_dir)
    monkeypatch.setattr(store_mod, "_SYNCFS", barriers)

    def no_fsync(fd: int) -> None:
        raise AssertionError("per-chunk fsync")

    monkeypatch.setattr(store_mod.os, "fsync", no_fsync)
    res = store.put_many([*pairs, (wrong, encode_chunk(CHUNKS[1]))])
    assert res.error is None
    assert res.bad == [wrong]
    assert sorted(res.stored) == sorted(cid for cid, _ in pairs)
    assert len(barriers.seen) == 2  # for 5 new chunks, not 10 fsyncs
    # Barrier 1: the new chunks' bytes, still under temp names (only the old chunk is named).
    named = [f for f in barriers.seen[0] if "/.tmp-" not in f]
    assert named == [f"{first[:2]}/{first[2:]}"]
    assert sum("/.tmp-" in f for f in barriers.seen[0]) == 5
    # Barrier 2: every chunk under its name, no temp left.
    assert all("/.tmp-" not in f for f in barriers.seen[1])
    monkeypatch.undo()
    for cid, c in zip((cid for cid, _ in pairs), CHUNKS, strict=True):
        assert store.get(cid) == c
    assert not store.has(wrong)
    assert store.counters["chunks.rejected"] == 1


def test_put_many_full_disk_keeps_the_chunks_before_it(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = stored_pairs()
    monkeypatch.setattr(store_mod, "_SYNCFS", Barriers(store.chunk_dir))
    real_write = os.write
    writes = [0]

    def full_after_two(fd: int, data: bytes | memoryview) -> int:
        writes[0] += 1
        if writes[0] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(store_mod.os, "write", full_after_two)
    res = store.put_many(pairs)
    monkeypatch.undo()
    assert isinstance(res.error, DiskFullError)
    assert res.stored == [cid for cid, _ in pairs[:2]]
    files = tree_files(store.chunk_dir)
    assert files == sorted(f"{cid[:2]}/{cid[2:]}" for cid in res.stored)  # no temp file left


def test_put_many_failed_barrier_names_nothing(store: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "_SYNCFS", Barriers(store.chunk_dir, fail_at=1))
    res = store.put_many(stored_pairs())
    monkeypatch.undo()
    assert isinstance(res.error, StoreError)
    assert not isinstance(res.error, DiskFullError)
    assert res.stored == []
    assert tree_files(store.chunk_dir) == []  # bytes not known durable: no chunk, no temp


def test_put_many_without_syncfs_fsyncs_each_chunk(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "_SYNCFS", None)
    synced = [0]
    real_fsync = os.fsync

    def count(fd: int) -> None:
        synced[0] += 1
        real_fsync(fd)

    monkeypatch.setattr(store_mod.os, "fsync", count)
    pairs = stored_pairs()
    res = store.put_many(pairs)
    monkeypatch.undo()
    assert res.error is None
    assert len(res.stored) == len(pairs)
    assert synced[0] >= len(pairs)  # each temp file, then each folder
    assert all(store.get(cid) for cid, _ in pairs)


def test_get_view_is_get_without_copying_a_raw_chunk(store: ChunkStore) -> None:
    raw = store.put_data(NOISE)  # incompressible: stored raw
    packed = store.put_data(TEXT)  # stored lz4
    view = store.get_view(raw)
    assert isinstance(view, memoryview)
    assert view == NOISE
    assert store.get_view(packed) == TEXT
    path = store.path_for(raw)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.get_view(raw)
    assert not store.has(raw)  # dropped, to be fetched again, as get() does


def test_a_stale_temp_name_is_skipped(store: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    cid = chunk_id(NOISE)
    folder = store.chunk_dir / cid[:2]
    folder.mkdir(parents=True)
    stale = folder / f"{store_mod.TEMP_PREFIX}{os.getpid()}-7"
    stale.write_bytes(b"left by a crashed process with our pid")
    monkeypatch.setattr(store_mod, "_temp_names", itertools.count(7))
    assert store.put_many([(cid, encode_chunk(NOISE))]).stored == [cid]
    assert store.get(cid) == NOISE
    assert stale.read_bytes().startswith(b"left")  # not overwritten; clean_temp removes it
    assert store.clean_temp() == 1
