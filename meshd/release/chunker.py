"""Cut a file or a directory tree into content-defined chunks, named and compressed.

- FastCDC-2020 (pyfastcdc) with min / avg / max = 16 / 64 / 256 KiB, casync's ratios. These are
  the FastCDC parameters; pyfastcdc's observed mean is a little above `avg` (its cut-point
  skipping starts at `min`).
- A chunk's id is the BLAKE3 hex of its *uncompressed* bytes, so compression never changes ids.
- Stored form (on disk and on the wire): one header byte, then the payload:
  `0x00` raw bytes; `0x01` a 4-byte little-endian uncompressed size and an lz4 block.
  lz4 is kept only when it saves at least 1/32 of the size (Syncthing's rule, PR #8133).
- Streaming: files are read through a bounded buffer (about 2 x max chunk); a chunk is hashed,
  compressed and handed to the sink before the next one is cut.

Tree rules (decided here, enforced again by manifest validation):
- Sorted walk; the release lists regular files only, as POSIX paths relative to the root, in
  sorted order. A single file becomes one entry named by its base name.
- Symlinks, devices, FIFOs and sockets are refused with PublishError: a link target could point
  out of the release folder, and activation only ever writes regular files.
- Empty directories are not kept (a release is its files).
- Modes keep the permission bits 0o777 only; setuid/setgid/sticky are dropped.
- Names must be valid UTF-8 (the manifest is JSON).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import lz4.block
from pyfastcdc import BinaryStreamReader, FastCDC

from meshd.errors import IntegrityError, MeshError

MIN_SIZE = 16 * 1024
AVG_SIZE = 48 * 1024  # pyfastcdc cuts at about AVG + MIN on average: 64 KiB, as designed
MAX_SIZE = 256 * 1024

FLAG_RAW = 0
FLAG_LZ4 = 1
HEADER_SIZE = 1
LZ4_SIZE_PREFIX = 4
MODE_MASK = 0o777
ID_LEN = 64  # hex chars of a 32-byte BLAKE3 digest


class PublishError(MeshError):
    """A path that cannot be published (symlink, special file, unreadable, bad name)."""


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """One chunk as produced by the chunker: id, uncompressed size and its stored form."""

    id: str
    size: int
    stored: bytes  # header byte + payload

    @property
    def compressed(self) -> bool:
        return self.stored[0] == FLAG_LZ4


@dataclass(slots=True)
class FileChunks:
    path: str  # POSIX, relative to the release root
    mode: int
    size: int
    chunks: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ChunkedTree:
    files: list[FileChunks]
    chunk_sizes: dict[str, int]  # id -> uncompressed size, first-appearance order
    stored_bytes: int = 0  # sum of stored forms of the distinct chunks

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


ChunkSink = Callable[[StoredChunk], None]


def chunk_id(data: bytes | bytearray | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


_HEX = frozenset("0123456789abcdef")


def is_chunk_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == ID_LEN and _HEX.issuperset(value)


def encode_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """The stored form of `data`: lz4 when it saves at least 1/32, raw otherwise."""
    n = len(data)
    packed = lz4.block.compress(data, store_size=False) if n else b""
    if n and len(packed) + LZ4_SIZE_PREFIX <= n - (n >> 5):
        return bytes([FLAG_LZ4]) + n.to_bytes(LZ4_SIZE_PREFIX, "little") + packed
    return bytes([FLAG_RAW]) + bytes(data)


def decode_chunk(stored: bytes | bytearray | memoryview, max_size: int = MAX_SIZE) -> bytes:
    """Uncompressed bytes of a stored form; IntegrityError when malformed or over max_size."""
    view = memoryview(stored)
    if len(view) < HEADER_SIZE:
        raise IntegrityError("empty chunk data")
    flag = view[0]
    if flag == FLAG_RAW:
        if len(view) - HEADER_SIZE > max_size:
            raise IntegrityError(f"chunk larger than {max_size} bytes")
        return bytes(view[HEADER_SIZE:])
    if flag == FLAG_LZ4:
        if len(view) < HEADER_SIZE + LZ4_SIZE_PREFIX:
            raise IntegrityError("truncated lz4 chunk header")
        size = int.from_bytes(view[HEADER_SIZE : HEADER_SIZE + LZ4_SIZE_PREFIX], "little")
        if size > max_size:
            raise IntegrityError(f"lz4 chunk claims {size} bytes, limit {max_size}")
        try:
            out = lz4.block.decompress(view[HEADER_SIZE + LZ4_SIZE_PREFIX :], uncompressed_size=size)
        except lz4.block.LZ4BlockError as e:
            raise IntegrityError(f"corrupt lz4 chunk: {e}") from e
        if len(out) != size:
            raise IntegrityError(f"lz4 chunk decoded to {len(out)} bytes, header says {size}")
        return bytes(out)
    raise IntegrityError(f"unknown chunk encoding flag {flag}")


def verify_stored(cid: str, stored: bytes | bytearray | memoryview) -> None:
    """decode_and_verify without keeping the bytes: a raw chunk (most of a compressed or
    media release) is hashed in place, not copied first. IntegrityError when wrong."""
    view = memoryview(stored)
    if len(view) > HEADER_SIZE and view[0] == FLAG_RAW:
        if len(view) - HEADER_SIZE > MAX_SIZE:
            raise IntegrityError(f"chunk larger than {MAX_SIZE} bytes")
        got = chunk_id(view[HEADER_SIZE:])
        if got != cid:
            raise IntegrityError(f"chunk {cid[:16]}... hashes to {got[:16]}... (wrong bytes)")
        return
    decode_and_verify(cid, view)


def decode_and_verify(cid: str, stored: bytes | bytearray | memoryview) -> bytes:
    """Decode a stored form and check it hashes to `cid`; IntegrityError otherwise."""
    data = decode_chunk(stored)
    got = chunk_id(data)
    if got != cid:
        raise IntegrityError(f"chunk {cid[:16]}... hashes to {got[:16]}... (wrong bytes)")
    return data


def new_cutter() -> FastCDC:
    return FastCDC(AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE)


def chunk_stream(
    reader: BinaryStreamReader,
    sink: ChunkSink | None,
    seen: dict[str, int],
    cutter: FastCDC | None = None,
) -> tuple[int, list[str], int]:
    """Chunk a binary reader. New ids (not in `seen`) are encoded and passed to `sink`.

    Returns (bytes read, ordered chunk ids, stored bytes of the new chunks). `seen` is updated.
    """
    cutter = cutter or new_cutter()
    size = 0
    ids: list[str] = []
    stored_total = 0
    for piece in cutter.cut_stream(reader):
        data = piece.data  # valid only until the next chunk is cut
        cid = chunk_id(data)
        ids.append(cid)
        size += piece.length
        if cid not in seen:
            seen[cid] = piece.length
            stored = encode_chunk(data)
            stored_total += len(stored)
            if sink is not None:
                sink(StoredChunk(cid, piece.length, stored))
    return size, ids, stored_total


def _posix_name(rel: Path) -> str:
    parts = []
    for part in rel.parts:
        try:
            part.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PublishError(f"{rel!s}: file name is not valid UTF-8") from e
        parts.append(part)
    return "/".join(parts)


def walk(root: Path) -> Iterator[tuple[Path, str]]:
    """(absolute path, release path) of each regular file under root, sorted by release path.

    Refuses symlinks and special files with PublishError.
    """
    st = os.lstat(root)
    if stat.S_ISREG(st.st_mode):
        yield root, _posix_name(Path(root.name))
        return
    if not stat.S_ISDIR(st.st_mode):
        raise PublishError(f"{root}: not a regular file or directory")
    found: list[tuple[str, Path]] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            path = Path(entry.path)
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise PublishError(f"{path}: symlinks are refused (a link could point out of the release)")
            if stat.S_ISDIR(mode):
                stack.append(path)
            elif stat.S_ISREG(mode):
                found.append((_posix_name(path.relative_to(root)), path))
            else:
                raise PublishError(f"{path}: special files (device, FIFO, socket) are refused")
    found.sort(key=lambda item: item[0])
    for rel, path in found:
        yield path, rel


def chunk_tree(root: str | os.PathLike[str], sink: ChunkSink | None = None) -> ChunkedTree:
    """Chunk a file or a directory tree; each distinct chunk goes once to `sink`.

    The sink typically writes into the chunk store (and the origin dir). Only about two
    max-size chunks of file data are in memory at any time.
    """
    root_path = Path(root)
    try:
        files: list[FileChunks] = []
        seen: dict[str, int] = {}
        stored_total = 0
        cutter = new_cutter()
        for path, rel in walk(root_path):
            with open(path, "rb", buffering=0) as f:
                mode = os.fstat(f.fileno()).st_mode & MODE_MASK
                size, ids, stored = chunk_stream(f, sink, seen, cutter)
            stored_total += stored
            files.append(FileChunks(rel, mode, size, ids))
    except OSError as e:
        raise PublishError(f"cannot read {e.filename or root_path}: {e.strerror or e}") from e
    return ChunkedTree(files, seen, stored_total)
