"""A release fetched in place (release/assembly.py) and the chunks the store is lent.

Each chunk is written once, at every place the manifest gives it; the store reads it from there
as its stored form, never writes or deletes the file, and drops a place that does not verify.
Activation finishes and renames the assembly; a restart resumes it from what verifies."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import orjson
import pytest

from meshd.errors import IntegrityError
from meshd.release.assembly import Assembly, part_folder
from meshd.release.chunker import FLAG_RAW, HEADER_SIZE, decode_chunk
from meshd.release.manifest import Manifest
from meshd.release.store import ChunkStore, DiskFullError
from tests.activation import NAME, Env, Killed, assert_current_complete, kill_at, read_tree, version_files
from tests.fakes import rot_chunk

# A chunk twice in one file and once in another: every place must be written.
DUP = bytes(range(256)) * 300
RND = random.Random(7)
FILES = {
    "bin/agent": b"head\n" + RND.randbytes(400_000),
    "share/a.bin": RND.randbytes(300_000),
}


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def raw(src: ChunkStore, cid: str) -> bytes:
    """A chunk's raw stored form (FLAG_RAW + bytes), as a peer sends incompressible data."""
    return bytes([FLAG_RAW]) + decode_chunk(src.get_stored(cid))


def raw_items(src: ChunkStore, m: Manifest, ids: list[str]) -> list[tuple[str, memoryview]]:
    """Chunks as a fetch holds them before storing a piece."""
    return [(cid, memoryview(raw(src, cid))) for cid in ids]


def node(env: Env, name: str = "node") -> ChunkStore:
    return ChunkStore(env.tmp / name, fsync=False)


def test_placed_chunks_are_written_at_every_place_and_read_as_stored_forms(env: Env) -> None:
    m = env.publish("1.0", {"a": DUP + DUP, "b": DUP + b"tail"})
    store = node(env)
    asm = Assembly(part_folder(env.tmp / "rel", m.release_id), m, fsync=True)
    ids = list(m.chunks)
    res = store.put_placed(raw_items(env.store, m, ids), asm.place)
    assert res.error is None
    assert res.bad == []
    assert sorted(res.stored) == sorted(ids)
    assert asm.written == set(ids)
    asm.complete(store.get_view)  # nothing left to copy in: every place was written
    assert read_tree(asm.folder) == {"a": DUP + DUP, "b": DUP + b"tail"}
    for cid in ids:
        want = raw(env.store, cid)
        assert store.get_stored(cid) == want
        assert store.stored_size(cid) == len(want)
        span = memoryview(bytearray(len(want)))
        store.read_stored_into(cid, span)
        assert bytes(span) == want
        path, _, length = store.locate(cid)
        assert str(path).startswith(asm.prefix)
        assert length == len(want) - HEADER_SIZE
    # The store owns none of these bytes: nothing in its own folders, none counted as its size.
    assert store.size_bytes() == 0
    assert not list((store.chunk_dir / "packs").iterdir())


def test_a_rotten_place_is_dropped_and_the_release_file_left_alone(env: Env) -> None:
    m = env.publish("1.0", FILES)
    store = node(env)
    asm = Assembly(part_folder(env.tmp / "rel", m.release_id), m, fsync=False)
    store.put_placed(raw_items(env.store, m, list(m.chunks)), asm.place)
    cid = m.files[0].chunks[1]
    rot_chunk(store, cid)  # the bytes in the release file change (an app wrote there)
    before = (asm.folder / "bin" / "agent").read_bytes()
    with pytest.raises(IntegrityError):
        store.get_stored(cid)
    assert not store.has(cid)
    assert store.counters["chunks.damaged"] == 1
    assert (asm.folder / "bin" / "agent").read_bytes() == before
    # delete and gc forget places, never files
    other = m.files[1].chunks[0]
    store.gc(set())
    assert not store.has(other)
    assert read_tree(asm.folder)["share/a.bin"] == FILES["share/a.bin"]


def test_wrong_bytes_and_a_full_disk_lend_nothing(env: Env) -> None:
    m = env.publish("1.0", FILES)
    store = node(env)
    asm = Assembly(part_folder(env.tmp / "rel", m.release_id), m, fsync=False)
    items = raw_items(env.store, m, list(m.chunks)[:3])
    bad = bytearray(items[0][1])
    bad[-1] ^= 1
    res = store.put_placed([(items[0][0], memoryview(bad)), *items[1:]], asm.place)
    assert res.bad == [items[0][0]]
    assert store.counters["chunks.rejected"] == 1
    assert not store.has(items[0][0])
    assert items[0][0] not in asm.written

    def full(_: list[tuple[str, memoryview]]) -> list[tuple[str, str, int, int]]:
        raise OSError(errno.ENOSPC, "No space left on device")

    fresh = raw_items(env.store, m, list(m.chunks)[3:5])
    res = store.put_placed(fresh, full)
    assert isinstance(res.error, DiskFullError)
    assert res.stored == []
    assert not any(store.has(cid) for cid, _ in fresh)


def test_resume_counts_only_chunks_whose_every_place_verifies(env: Env) -> None:
    m = env.publish("1.0", {"a": DUP + DUP, "b": RND.randbytes(300_000)})
    store = node(env)
    folder = part_folder(env.tmp / "rel", m.release_id)
    asm = Assembly(folder, m, fsync=True)
    store.put_placed(raw_items(env.store, m, list(m.chunks)), asm.place)
    dup = m.files[0].chunks[0]
    # A crash cut the second place of the duplicated chunk short, and one chunk of b.
    with open(folder / "a", "r+b") as f:
        f.seek(len(DUP) + 10)
        f.write(b"\0" * 10)
    cut = m.files[1].chunks[-1]
    os.truncate(folder / "b", len(read_tree(folder)["b"]) - 5)
    with open(folder / "a", "ab") as f:
        f.write(b"junk a crash left at the end")
    again = Assembly(folder, m)
    lent = again.resume()
    assert {cid for cid, *_ in lent} == set(m.chunks) - {dup, cut} == again.written
    fresh = node(env, "after-restart")
    fresh.lend(lent)
    assert fresh.missing(m.chunks) == sorted({dup, cut}, key=list(m.chunks).index)
    # What is fetched again completes it.
    fresh.put_placed(raw_items(env.store, m, [dup, cut]), again.place)
    again.complete(fresh.get_view)
    assert read_tree(folder)["a"] == DUP + DUP  # cut back to its size
    assert len(read_tree(folder)["b"]) == m.files[1].size


def test_escaping_paths_are_refused(env: Env) -> None:
    m = env.publish("1.0", FILES)
    body = orjson.loads(m.canonical_bytes())
    body["files"][0]["path"] = "../../escaped"
    with pytest.raises(IntegrityError):
        Assembly(env.tmp / "rel" / "x", Manifest(body))
    assert not (env.tmp / "rel").exists()


def test_activation_with_an_assembly(env: Env) -> None:
    m1 = env.publish("1.0", version_files(1))
    m2 = env.publish("2.0", version_files(2))
    source = ChunkStore(env.data, fsync=False)  # the publisher's chunks, read before they go
    new = [c for c in m2.chunks if c not in m1.chunks]
    items = raw_items(source, m2, new)
    rel = env.releases(fsync=True)
    rel.activate(m1)
    for cid in new:  # the node fetching 2.0 holds 1.0's chunks only
        env.store.delete(cid)
    base = env.data / "releases" / NAME
    asm = Assembly(part_folder(base, m2.release_id), m2, fsync=True)
    assert env.store.put_placed(items, asm.place).error is None
    res = rel.activate(m2, asm)
    assert res.changed
    assert res.path == base / "2.0"
    assert not asm.folder.exists()
    # An endgame duplicate that arrives after the rename writes nothing and makes no folder.
    assert env.store.put_placed(items[:1], asm.place).stored == []
    assert not asm.folder.exists()
    assert_current_complete(env, rel, {"2.0"})
    assert read_tree(base / "2.0") == version_files(2)
    assert (base / "2.0" / "bin" / "agent").stat().st_mode & 0o777 == m2.files[0].mode & 0o777
    # Every chunk of 2.0 is now read from 2.0's files, shared ones too: 1.0 can go.
    for cid in m2.chunks:
        path, _, _ = env.store.locate(cid)
        assert str(path).startswith(str(base / "2.0") + os.sep)
    rel.retire(NAME, keep=1)
    assert rel.installed(NAME) == ["2.0"]
    for cid in m2.chunks:
        assert env.store.get(cid)  # still there, verified


def test_kill_at_every_step_of_an_assembled_activation(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill -9 at every file operation of activating an assembly: current stays a complete
    version, and after recovery the assembly resumes and activates."""
    m1 = env.publish("1.0", version_files(1))
    m2 = env.publish("2.0", version_files(2))
    source = ChunkStore(env.data, fsync=False)
    new = [c for c in m2.chunks if c not in m1.chunks]
    items = raw_items(source, m2, new)
    base = env.data / "releases" / NAME
    n = 1
    while True:
        if base.exists():
            shutil.rmtree(base)
        rel = env.releases(fsync=True)
        rel.activate(m1)
        asm = Assembly(part_folder(base, m2.release_id), m2, fsync=True)
        env.store.put_placed(items, asm.place)
        count = kill_at(monkeypatch, n)
        try:
            rel.activate(m2, asm)
            killed = False
        except Killed:
            killed = True
        finally:
            count()
            monkeypatch.undo()
        assert_current_complete(env, rel, {"1.0", "2.0"})
        fresh = env.releases(fsync=True)
        fresh.recover()
        assert_current_complete(env, fresh, {"1.0", "2.0"})
        if fresh.current(NAME) == "1.0":
            again = Assembly(part_folder(base, m2.release_id), m2, fsync=True)
            env.store.lend(again.resume())
            fresh.activate(m2, again)
        assert_current_complete(env, fresh, {"2.0"})
        if not killed:
            break
        n += 1
    assert n > 5  # the activation has that many steps to be killed at


def test_a_chunk_two_releases_share_keeps_a_place_when_one_goes(env: Env) -> None:
    m = env.publish("1.0", FILES)
    store = node(env)
    old = Assembly(env.tmp / "rel" / "1.0", m, fsync=False)
    new = Assembly(env.tmp / "rel" / "2.0", m, fsync=False)
    items = raw_items(env.store, m, list(m.chunks))
    store.put_placed(items, old.place)
    store.put_placed(items, new.place)  # newest first
    cid = items[0][0]
    assert str(store.locate(cid)[0]).startswith(new.prefix)
    assert store.forget_lent(new.prefix) == len(m.chunks)
    assert str(store.locate(cid)[0]).startswith(old.prefix)
    assert store.get_stored(cid) == raw(env.store, cid)
    # A place whose file is gone is skipped for the next one; with none left, the chunk is gone.
    store.lend(new.places())
    shutil.rmtree(new.folder)
    assert store.get_stored(cid) == raw(env.store, cid)
    shutil.rmtree(old.folder)
    with pytest.raises(KeyError):
        store.get_stored(cid)
    assert not store.has(cid)
