"""Chunker: FastCDC cut points, BLAKE3 ids, lz4-or-raw stored form, tree walk rules."""

from __future__ import annotations

import io
import os
import random
import resource
import stat
from pathlib import Path

import pytest

from meshd.errors import IntegrityError
from meshd.release import chunker
from meshd.release.chunker import (
    FLAG_LZ4,
    FLAG_RAW,
    MAX_SIZE,
    MIN_SIZE,
    PublishError,
    StoredChunk,
    chunk_id,
    chunk_stream,
    chunk_tree,
    decode_and_verify,
    decode_chunk,
    encode_chunk,
)


def semi_compressible(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    words = [rng.randbytes(rng.randint(3, 12)) for _ in range(200)]
    while len(out) < n:
        if rng.random() < 0.5:
            out += rng.randbytes(4096)
        else:
            out += b" ".join(rng.choice(words) for _ in range(400))
    return bytes(out[:n])


def test_chunk_sizes_respect_bounds_and_concatenate_back() -> None:
    data = random.Random(2).randbytes(3 * 1024 * 1024)
    got: list[StoredChunk] = []
    size, ids, _ = chunk_stream(io.BytesIO(data), got.append, {})
    assert size == len(data)
    assert len(ids) > 5
    lengths = [c.size for c in got]
    assert all(MIN_SIZE <= n <= MAX_SIZE for n in lengths[:-1])
    assert b"".join(decode_chunk(c.stored) for c in got) == data
    assert [c.id for c in got] == ids  # random data: no repeats
    for c in got:
        assert c.id == chunk_id(decode_chunk(c.stored))


def test_content_defined_cuts_survive_an_insertion() -> None:
    data = random.Random(3).randbytes(2 * 1024 * 1024)
    _, before, _ = chunk_stream(io.BytesIO(data), None, {})
    edited = data[:1000] + b"inserted bytes" + data[1000:]
    _, after, _ = chunk_stream(io.BytesIO(edited), None, {})
    # Only the chunk(s) around the edit change: this is what makes delta updates cheap.
    assert len(set(before) - set(after)) <= 2
    assert len(set(before) & set(after)) >= len(before) - 2


def test_compressible_chunk_is_lz4_and_random_is_raw() -> None:
    text = b"hello gateway " * 5000
    stored = encode_chunk(text)
    assert stored[0] == FLAG_LZ4
    assert len(stored) < len(text) // 4
    assert decode_chunk(stored) == text
    noise = random.Random(4).randbytes(50_000)
    raw = encode_chunk(noise)
    assert raw[0] == FLAG_RAW
    assert raw[1:] == noise


def test_lz4_kept_only_when_it_saves_a_32nd() -> None:
    rng = random.Random(5)
    # ~2% compressible: lz4 may shave a little, but not 1/32, so it stays raw.
    data = bytearray(rng.randbytes(64_000))
    data[:1200] = b"\0" * 1200
    assert encode_chunk(bytes(data))[0] == FLAG_RAW


@pytest.mark.parametrize(
    "stored",
    [
        b"",
        b"\x07abc",  # unknown flag
        bytes([FLAG_LZ4]) + b"\x01",  # truncated size
        bytes([FLAG_LZ4]) + (MAX_SIZE + 1).to_bytes(4, "little") + b"\0" * 10,  # bomb claim
        bytes([FLAG_LZ4]) + (100).to_bytes(4, "little") + b"\xff" * 10,  # corrupt block
        bytes([FLAG_RAW]) + b"x" * (MAX_SIZE + 1),
    ],
)
def test_malformed_stored_forms_raise_integrity_error(stored: bytes) -> None:
    with pytest.raises(IntegrityError):
        decode_chunk(stored)


def test_decode_and_verify_rejects_wrong_bytes() -> None:
    good = encode_chunk(b"a" * 1000)
    cid = chunk_id(b"a" * 1000)
    assert decode_and_verify(cid, good) == b"a" * 1000
    with pytest.raises(IntegrityError, match="wrong bytes"):
        decode_and_verify(cid, encode_chunk(b"b" * 1000))


def test_tree_walk_sorted_modes_dedup(tmp_path: Path) -> None:
    root = tmp_path / "rel"
    (root / "bin").mkdir(parents=True)
    (root / "etc" / "conf.d").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    blob = semi_compressible(300_000)
    (root / "bin" / "tool").write_bytes(blob)
    (root / "bin" / "tool").chmod(0o4755)  # setuid is dropped
    (root / "etc" / "conf.d" / "a.conf").write_bytes(b"x=1\n")
    (root / "etc" / "copy").write_bytes(blob)  # identical content: chunks shared
    (root / "zero").write_bytes(b"")
    sunk: list[StoredChunk] = []
    tree = chunk_tree(root, sunk.append)
    assert [f.path for f in tree.files] == ["bin/tool", "etc/conf.d/a.conf", "etc/copy", "zero"]
    modes = {f.path: f.mode for f in tree.files}
    assert modes["bin/tool"] == 0o755
    assert tree.files[0].chunks == tree.files[2].chunks
    assert len(sunk) == len(tree.chunk_sizes)  # each distinct chunk sunk once
    assert tree.files[3].size == 0
    assert tree.files[3].chunks == []
    assert tree.total_size == 2 * len(blob) + 4
    assert tree.stored_bytes == sum(len(c.stored) for c in sunk)
    assert tree.stored_bytes < len(blob)  # semi-compressible data did compress


def test_single_file_is_named_by_base_name(tmp_path: Path) -> None:
    f = tmp_path / "firmware.bin"
    f.write_bytes(b"abc" * 100)
    tree = chunk_tree(f)
    assert [x.path for x in tree.files] == ["firmware.bin"]
    assert tree.files[0].size == 300


def test_symlinks_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "rel"
    root.mkdir()
    (root / "a").write_bytes(b"a")
    os.symlink("/etc/passwd", root / "escape")
    with pytest.raises(PublishError, match="symlink"):
        chunk_tree(root)


def test_root_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(PublishError):
        chunk_tree(tmp_path / "link")


def test_special_files_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "rel"
    root.mkdir()
    os.mkfifo(root / "fifo")
    with pytest.raises(PublishError, match="special"):
        chunk_tree(root)


def test_socket_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    os.mknod(root / "s", stat.S_IFSOCK | 0o600)  # the inode a bound unix socket leaves
    with pytest.raises(PublishError):
        chunk_tree(root)


def test_missing_path_is_a_publish_error(tmp_path: Path) -> None:
    with pytest.raises(PublishError):
        chunk_tree(tmp_path / "nope")


def test_streaming_does_not_hold_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads go through a bounded buffer: no single read asks for more than ~2 max chunks."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for i in range(24):
            f.write(random.Random(i).randbytes(1 << 20))
    biggest = 0
    real_open = open

    class Spy(io.RawIOBase):
        def __init__(self, inner: io.RawIOBase) -> None:
            self.inner = inner

        def readinto(self, b: memoryview) -> int:  # type: ignore[override]
            nonlocal biggest
            biggest = max(biggest, len(b))
            return self.inner.readinto(b) or 0

        def fileno(self) -> int:
            return self.inner.fileno()

        def close(self) -> None:
            self.inner.close()

    def spy_open(path: object, mode: str = "r", buffering: int = -1) -> object:
        inner = real_open(path, mode, buffering=buffering)  # type: ignore[call-overload]
        return Spy(inner) if "b" in mode else inner

    monkeypatch.setattr(chunker, "open", spy_open, raising=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tree = chunk_tree(big)
    assert tree.total_size == 24 << 20
    assert 0 < biggest <= 2 * MAX_SIZE + 8192
    # Peak RSS did not grow by anything like the file size (24 MiB).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 16 * 1024
