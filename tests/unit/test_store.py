"""Chunk store: layout, verification on write and read, bit rot, full disk, gc, manifests."""

from __future__ import annotations

import errno
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


def packs(store: ChunkStore) -> list[str]:
    return sorted(p.name for p in store.pack_dir.iterdir())


def test_put_many_stores_a_piece_in_one_pack_with_one_data_barrier(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = stored_pairs()
    first = store.put_data(CHUNKS[0])  # already held: counted as stored, not written again
    wrong = chunk_id(b"something else")
    at_barrier: list[list[str]] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    fsyncs = [0]

    def fdatasync(fd: int) -> None:
        at_barrier.append(packs(store))
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        fsyncs[0] += 1
        real_fsync(fd)

    monkeypatch.setattr(store_mod.os, "fdatasync", fdatasync)
    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    res = store.put_many([*pairs, (wrong, encode_chunk(CHUNKS[1])), pairs[2]])
    monkeypatch.undo()
    assert res.error is None
    assert res.bad == [wrong]
    assert res.stored == [cid for cid, _ in pairs] + [pairs[2][0]]  # in the order asked
    # One barrier for the bytes, under a temp name; then one for the folder (the new name).
    assert len(at_barrier) == 1
    assert [n.startswith(store_mod.TEMP_PREFIX) for n in at_barrier[0]] == [True]
    assert fsyncs[0] == 1
    (pack,) = packs(store)
    assert pack.endswith(".pack")
    assert store.locate(pairs[1][0])[0] == store.pack_dir / pack
    assert store.locate(first)[0] == store.path_for(first)  # not written twice
    for (cid, stored), c in zip(pairs, CHUNKS, strict=True):
        assert store.get(cid) == c
        assert store.get_stored(cid) == stored
        span = memoryview(bytearray(store.stored_size(cid)))
        store.read_stored_into(cid, span)
        assert span == stored
    assert not store.has(wrong)
    assert store.counters["chunks.rejected"] == 1
    assert list(store.ids()) == sorted(cid for cid, _ in pairs)
    assert store.size_bytes() == sum(len(stored) for _, stored in pairs)


def test_put_many_full_disk_stores_none_of_the_piece_and_leaves_no_temp(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = stored_pairs()
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
    assert "disk full" in str(res.error)
    assert res.stored == []
    assert not any(store.has(cid) for cid, _ in pairs)
    assert packs(store) == []


def test_put_many_failed_barrier_names_nothing(store: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_mod.os, "fdatasync", broken)
    res = store.put_many(stored_pairs())
    monkeypatch.undo()
    assert isinstance(res.error, StoreError)
    assert not isinstance(res.error, DiskFullError)
    assert res.stored == []
    assert packs(store) == []  # bytes not known durable: no pack, no temp


def test_packs_are_found_again_after_a_restart_and_a_broken_one_is_removed(tmp_path: Path) -> None:
    a = ChunkStore(tmp_path)
    pairs = stored_pairs()
    assert a.put_many(pairs[:3]).stored == [cid for cid, _ in pairs[:3]]
    assert a.put_many(pairs[3:]).error is None
    first, second = packs(a)
    (a.pack_dir / "00000000000000ff.pack").write_bytes(b"not a pack at all")
    cut = (a.pack_dir / second).read_bytes()
    (a.pack_dir / "0000000000000100.pack").write_bytes(cut[:-10])  # shorter than its header says
    seen = ChunkStore.scan(tmp_path)  # read-only: the broken packs are still there after it
    assert len(packs(a)) == 4
    b = ChunkStore(tmp_path)
    assert all(b.get(cid) == c for (cid, _), c in zip(pairs, CHUNKS, strict=True))
    assert seen == {cid: b.locate(cid) for cid, _ in pairs}
    assert packs(b) == [first, second]  # the two broken ones removed, and counted
    assert b.counters["packs.damaged"] == 2
    b.put_many([(chunk_id(NOISE), encode_chunk(NOISE))])
    assert packs(b)[-1] == "0000000000000101.pack"  # numbered after every pack seen


def test_a_pack_goes_with_its_last_chunk_and_gc_rewrites_a_mostly_dead_one(store: ChunkStore) -> None:
    pairs = stored_pairs()
    store.put_many(pairs[:3])
    store.put_many(pairs[3:])
    first, second = packs(store)
    store.delete(pairs[0][0])
    store.delete(pairs[1][0])
    assert packs(store) == [first, second]  # one live chunk left in it
    assert store.get(pairs[2][0]) == CHUNKS[2]
    store.delete(pairs[2][0])
    assert packs(store) == [second]
    # A release retired: gc drops two chunks of three; the one a later release shares is
    # rewritten into a pack of its own and the mostly dead pack goes.
    assert store.gc(keep={pairs[4][0]}) == 2
    (third,) = packs(store)
    assert third > second
    assert store.locate(pairs[4][0])[0].name == third
    assert store.get(pairs[4][0]) == CHUNKS[4]
    assert store.size_bytes() == len(pairs[4][1])
    assert store.gc(keep=set()) == 1
    assert packs(store) == []
    assert list(store.ids()) == []


def test_a_chunk_read_while_gc_rewrites_its_pack_is_read_where_it_went(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = stored_pairs()
    store.put_many(pairs)
    for cid, _ in pairs[1:]:
        store.delete(cid)
    old = store.locate(pairs[0][0])[0]
    real_open = os.open
    raced: list[int] = []

    def racing_open(path: str, flags: int, mode: int = 0o777) -> int:
        if path == str(old) and not raced:
            raced.append(0)
            raced[0] = store._compact()  # the rewrite lands between the lookup and the open
        return real_open(path, flags, mode)

    monkeypatch.setattr(store_mod.os, "open", racing_open)
    assert store.get(pairs[0][0]) == CHUNKS[0]
    monkeypatch.undo()
    assert raced == [1]
    assert not old.exists()
    assert store.locate(pairs[0][0])[0] != old


def test_bit_rot_in_a_pack_drops_that_chunk_only(store: ChunkStore) -> None:
    pairs = stored_pairs()
    store.put_many(pairs)
    victim = pairs[3][0]
    path, offset, length = store.locate(victim)
    data = bytearray(path.read_bytes())
    data[offset + length // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="damaged"):
        store.get(victim)
    assert not store.has(victim)
    assert store.counters["chunks.damaged"] == 1
    assert all(store.get(cid) == c for (cid, _), c in zip(pairs, CHUNKS, strict=True) if cid != victim)
    assert store.put_many([pairs[3]]).stored == [victim]  # fetched again: a pack of its own
    assert store.get(victim) == CHUNKS[3]
    assert len(packs(store)) == 2


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


def test_a_stale_temp_name_is_skipped(store: ChunkStore) -> None:
    cid = chunk_id(NOISE)
    stale = store.pack_dir / f"{store_mod.TEMP_PREFIX}{os.getpid()}-{0:016x}"
    stale.write_bytes(b"left by a crashed process with our pid")
    assert store.put_many([(cid, encode_chunk(NOISE))]).stored == [cid]
    assert store.get(cid) == NOISE
    assert stale.read_bytes().startswith(b"left")  # not overwritten; clean_temp removes it
    assert store.clean_temp() == 1
    assert store.get(cid) == NOISE
