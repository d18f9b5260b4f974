"""Content-addressed chunk store and manifest store in the data dir.

Layout:
    <data_dir>/chunks/ab/cdef...   stored form of chunk abcdef... (header byte + raw or lz4)
    <data_dir>/chunks/packs/<n>.pack   the chunks of one fetched piece (put_many), see below
    <data_dir>/manifests/<release id>.json   signed manifest documents

A pack: b"MDK1", u32 count, count x (32-byte chunk id, u32 stored length), then the stored
forms back to back (u32s little-endian). One file, one fdatasync and one rename per piece,
instead of a file and a rename per chunk and two syncfs barriers (every file of the file system)
per piece: 12 writers storing the same pieces on one ext4 used 4.5 times less CPU. Packs are
indexed in memory (their headers are read at startup); a chunk deleted from a pack is forgotten
there and the pack removed with its last live chunk, so a chunk deleted and then found again in
its pack after a restart is simply held until the next gc (every read verifies it either way).

Lent chunks: a chunk a fetch wrote raw into the release being assembled (release/assembly.py),
or that lies in an installed release's files, is not copied into the store: the store is lent
its place, (file, offset, length) of the raw bytes, and reads it from there as the stored form
FLAG_RAW + bytes. Every byte of a fetched release is then written once, where it is installed,
instead of into a pack and again into the release at activation. The store never writes or
deletes a lent file: delete() and gc() forget the place, and a read that does not verify drops
it like a damaged chunk. Lent places are not persisted: the service lends them again at startup
from the installed releases and the assemblies it resumes.

Rules:
- Writes are atomic: temp file (".tmp-*") in the target directory, write, fsync, rename, fsync
  the directory. A crash leaves either no chunk or a whole one; leftover temp files are removed
  by clean_temp() (call it at startup).
- put() decodes and hashes before anything is written: wrong bytes never reach the disk.
- get() verifies on every read; a damaged chunk is deleted and IntegrityError raised, so the
  caller fetches it again (has() is then False). Reads for a peer too: trusting a chunk once
  verified saved little (blake3 is a few percent of a fetch) and a node with bit rot then kept
  serving it, banned by every peer and never repairing it.
- A full disk raises DiskFullError (a StoreError), any other write error StoreError, each with
  a clear message; the temp file is removed and the chunk is simply absent, so the store stays
  consistent. A piece is stored whole or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from meshd.core.counters import Counters
from meshd.errors import IntegrityError, MeshError
from meshd.release.chunker import (
    FLAG_RAW,
    HEADER_SIZE,
    ID_LEN,
    decode_and_verify,
    encode_chunk,
    is_chunk_id,
    verify_stored,
)
from meshd.release.chunker import chunk_id as hash_chunk

T = TypeVar("T")
# Writes raw chunks where they belong and says where: [(id, raw bytes)] -> [(id, file, offset, length)]
Place = Callable[[list[tuple[str, memoryview]]], list[tuple[str, str, int, int]]]
_RAW_HEAD = bytes([FLAG_RAW])
Loc = tuple[str, int, int]  # (file, offset, length)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_LENT_FLAGS = _READ_FLAGS | getattr(os, "O_NOFOLLOW", 0)  # a release file swapped for a link is not read
TEMP_PREFIX = ".tmp-"
PACK_DIR = "packs"
PACK_SUFFIX = ".pack"
PACK_MAGIC = b"MDK1"
_PACK_ENTRY = struct.Struct("<32sI")  # chunk id (binary), stored length
_PACK_MAX_ENTRIES = 65536  # a piece names at most 1,024; a header claiming more is not ours
_PACK_MIN_LIVE = 0.5  # gc rewrites a pack whose live chunks are less than this share of it
log = logging.getLogger("meshd.release")


class StoreError(MeshError):
    """The store could not write or read (disk full, permissions, I/O error)."""


class DiskFullError(StoreError):
    """A write found no room (ENOSPC, EDQUOT): a state that passes when space is freed, so the
    fetch waits for free space (release/space.py) rather than treating it as a fault."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_error(e: OSError, what: str, folder: Path) -> StoreError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full: cannot store {what} in {folder} ({e.strerror})")
    return StoreError(f"cannot store {what} in {folder}: {e.strerror or e}")


@dataclass
class _PackUse:
    """A pack's live chunks and bytes, against the stored bytes it holds."""

    chunks: int = 0
    live: int = 0
    size: int = 0


@dataclass
class PutResult:
    """What put_many did: chunks now in the store, chunks refused (wrong hash), the write
    error (then none of the piece's new chunks was stored)."""

    stored: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    error: StoreError | None = None


def atomic_write(path: Path, data: bytes, *, fsync: bool = True, what: str = "file") -> None:
    """Write `data` to `path` atomically; StoreError (temp file removed) on any OSError."""
    folder = path.parent
    tmp: str | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        if fsync:
            fsync_dir(folder)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"disk full: cannot store {what} in {folder} ({e.strerror})") from e
        raise StoreError(f"cannot store {what} in {folder}: {e.strerror or e}") from e


class ChunkStore:
    def __init__(self, data_dir: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(data_dir)
        self.chunk_dir = self.root / "chunks"
        self.manifest_dir = self.root / "manifests"
        self.fsync = fsync
        self.pack_dir = self.chunk_dir / PACK_DIR
        self.counters = Counters({"chunks.damaged": 0, "chunks.rejected": 0, "packs.damaged": 0})
        self._chunk_prefix = str(self.chunk_dir) + os.sep  # paths as strings: pathlib cost 5% of a fetch
        self._pack_prefix = str(self.pack_dir) + os.sep
        # Packed chunks: id -> (pack path, offset, stored length); live chunks per pack. Worker
        # threads store, read and delete at once: changes are made under the lock.
        self._packed: dict[str, tuple[str, int, int]] = {}
        self._live: dict[str, _PackUse] = {}
        # Lent chunks: id -> its places, (file, offset, raw length), the one read first; a tuple
        # replaced whole under the lock, so a reader never sees it change under it.
        self._lent: dict[str, tuple[Loc, ...]] = {}
        self._lock = threading.Lock()
        self._next_pack = 0
        try:
            self.chunk_dir.mkdir(parents=True, exist_ok=True)
            self.manifest_dir.mkdir(parents=True, exist_ok=True)
            self.pack_dir.mkdir(exist_ok=True)
            self._load_packs()
        except OSError as e:
            raise StoreError(f"cannot create the store in {self.root}: {e.strerror or e}") from e

    # --- chunks ------------------------------------------------------------------------------

    def path_for(self, cid: str) -> Path:
        return Path(self._chunk_path(cid))

    def _chunk_path(self, cid: str) -> str:
        if not is_chunk_id(cid):
            raise IntegrityError(f"not a chunk id: {cid[:80]!r}")
        return f"{self._chunk_prefix}{cid[:2]}{os.sep}{cid[2:]}"

    def has(self, cid: str) -> bool:
        return cid in self._packed or cid in self._lent or os.path.isfile(self._chunk_path(cid))

    def locate(self, cid: str) -> tuple[Path, int, int]:
        """Where a chunk's stored form lies: (file, offset, length); of a lent chunk, where its
        raw bytes lie. KeyError when absent."""
        loc = self._packed.get(cid) or self._lent_at(cid)
        if loc is not None:
            return Path(loc[0]), loc[1], loc[2]
        path = self._chunk_path(cid)
        try:
            return Path(path), 0, os.stat(path).st_size
        except FileNotFoundError as e:
            raise KeyError(cid) from e

    def missing(self, ids: Iterable[str]) -> list[str]:
        """The ids not in the store, in the given order (duplicates kept once)."""
        return [cid for cid in dict.fromkeys(ids) if not self.has(cid)]

    def put(self, cid: str, stored: bytes) -> int:
        """Store a chunk received in stored form; verified first. Returns its uncompressed size.

        IntegrityError (nothing written) when it does not hash to `cid`; StoreError on write.
        """
        path = self.path_for(cid)
        try:
            data = decode_and_verify(cid, stored)
        except IntegrityError:
            self.counters["chunks.rejected"] += 1
            raise
        if not path.is_file():
            atomic_write(path, bytes(stored), fsync=self.fsync, what=f"chunk {cid[:16]}")
        return len(data)

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]], *, verify: bool = True) -> PutResult:
        """Store chunks received in stored form (a fetched piece), each verified first, in one
        pack: written under a temp name, one data barrier, renamed, the folder synced. A crash
        leaves the whole piece or none of it, and every chunk in `stored` is durable when this
        returns. verify=False only for what the chunker just made (its id is computed from the
        same bytes), as put_stored_unchecked."""
        out = PutResult()
        new: list[tuple[str, bytes | memoryview]] = []
        held: set[str] = set()
        for cid, stored in items:
            path = self._chunk_path(cid)  # refuses a malformed id
            try:
                if verify:
                    verify_stored(cid, stored)
            except IntegrityError:
                self.counters["chunks.rejected"] += 1
                out.bad.append(cid)
                continue
            if cid not in held and not (cid in self._packed or cid in self._lent or os.path.isfile(path)):
                new.append((cid, stored))
            held.add(cid)
            out.stored.append(cid)
        if new:
            try:
                self._write_pack(new)
            except OSError as e:
                out.error = _store_error(e, f"a piece of {len(new)} chunks", self.pack_dir)
                fresh = {cid for cid, _ in new}
                out.stored = [cid for cid in out.stored if cid not in fresh]
        return out

    def put_placed(self, items: Sequence[tuple[str, memoryview]], place: Place) -> PutResult:
        """put_many for raw stored forms that have a place outside the store (a release being
        assembled): each verified, then `place` writes the raw bytes (after the header byte)
        where they belong and says where; the store is lent those places (durable or not is
        the place's business: release/assembly.py). A write error: none of them is lent."""
        out = PutResult()
        new: list[tuple[str, memoryview]] = []
        for cid, stored in items:
            self._chunk_path(cid)  # refuses a malformed id
            try:
                verify_stored(cid, stored)
            except IntegrityError:
                self.counters["chunks.rejected"] += 1
                out.bad.append(cid)
                continue
            new.append((cid, stored[HEADER_SIZE:]))
            out.stored.append(cid)
        if new:
            try:
                places = place(new)
            except OSError as e:
                out.error = _store_error(e, f"a piece of {len(new)} chunks", self.root)
                out.stored = []
                return out
            self.lend(places)
            out.stored = [cid for cid, *_ in places]
        return out

    def lend(self, places: Iterable[tuple[str, str, int, int]]) -> None:
        """Read these chunks from where they lie raw, (id, file, offset, length) each, before
        their other places: a chunk two installed releases share has a place in each, and
        keeps one when the older release goes."""
        with self._lock:
            for cid, path, offset, length in places:
                loc = (path, offset, length)
                self._lent[cid] = (loc, *(p for p in self._lent.get(cid, ()) if p != loc))

    def forget_lent(self, prefix: str) -> int:
        """Stop reading chunks from files under `prefix` (a release retired or dropped, before its
        files go); returns how many places were forgotten."""
        gone = 0
        with self._lock:
            for cid, places in list(self._lent.items()):
                kept = tuple(p for p in places if not p[0].startswith(prefix))
                gone += len(places) - len(kept)
                if not kept:
                    del self._lent[cid]
                elif len(kept) != len(places):
                    self._lent[cid] = kept
        return gone

    def only_lent_from(self, cid: str, prefix: str) -> bool:
        """Whether every copy of `cid` lies in files under `prefix` (none in the store's own)."""
        places = self._lent.get(cid, ())
        if not places or cid in self._packed or os.path.isfile(self._chunk_path(cid)):
            return False
        return all(p[0].startswith(prefix) for p in places)

    def _lent_at(self, cid: str) -> Loc | None:
        places = self._lent.get(cid)
        return places[0] if places else None

    def _write_pack(self, items: list[tuple[str, bytes | memoryview]]) -> None:
        head = PACK_MAGIC + struct.pack("<I", len(items))
        head += b"".join(_PACK_ENTRY.pack(bytes.fromhex(cid), len(stored)) for cid, stored in items)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        while True:
            with self._lock:
                number = self._next_pack
                self._next_pack += 1
            final = f"{self._pack_prefix}{number:016x}{PACK_SUFFIX}"
            tmp = f"{self._pack_prefix}{TEMP_PREFIX}{os.getpid()}-{number:016x}"
            try:
                fd = os.open(tmp, flags, 0o600)
                break
            except FileExistsError:  # left by a crashed process that had this pid: the next name
                continue
        try:
            try:
                for part in (head, *(stored for _, stored in items)):
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view) :]
                if self.fsync:
                    getattr(os, "fdatasync", os.fsync)(fd)  # (macOS has no fdatasync)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fsync:
            fsync_dir(self.pack_dir)  # the new name (the bytes are in before the rename)
        self._index_pack(final, [(cid, len(stored)) for cid, stored in items], len(head))

    def _index_pack(self, path: str, entries: list[tuple[str, int]], at: int) -> None:
        emptied: list[str] = []
        with self._lock:
            use = self._live.setdefault(path, _PackUse())
            for cid, offset, length in _spans(entries, at):
                old = self._packed.get(cid)
                if old is not None:  # held twice (a restart found both, gc moved it): the new copy
                    gone = self._forget(cid, old)
                    if gone is not None and gone != path:
                        emptied.append(gone)
                self._packed[cid] = (path, offset, length)
                use.chunks += 1
                use.live += length
                use.size += length
        for p in emptied:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    def _forget(self, cid: str, loc: tuple[str, int, int]) -> str | None:
        """Drop `cid` from its pack's index (under the lock); the pack's path when it has no
        live chunk left (the caller removes it)."""
        del self._packed[cid]
        use = self._live.get(loc[0])
        if use is None:
            return None
        use.chunks -= 1
        use.live -= loc[2]
        if use.chunks > 0:
            return None
        del self._live[loc[0]]
        return loc[0]

    def _compact(self) -> int:
        """Rewrite the packs gc left mostly dead (a retired release's chunks gone, the ones a
        later release shares kept): their live chunks into a new pack, read and verified, then
        the old pack goes. Returns how many packs were rewritten."""
        with self._lock:
            sparse = {p for p, u in self._live.items() if u.live < u.size * _PACK_MIN_LIVE}
            moving: dict[str, list[str]] = {p: [] for p in sparse}
            for cid, loc in self._packed.items():
                if loc[0] in sparse:
                    moving[loc[0]].append(cid)
        done = 0
        for path, ids in sorted(moving.items()):
            items: list[tuple[str, bytes | memoryview]] = []
            for cid in ids:
                try:
                    items.append((cid, self.get_stored(cid)))
                except (KeyError, IntegrityError, StoreError):
                    continue  # gone meanwhile, or damaged (dropped and counted): not moved
            try:
                if items:
                    self._write_pack(items)  # points them at the new pack; the old one empties
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            except OSError as e:
                log.warning("chunk pack %s not compacted: %s", path, e.strerror or e)
                continue
            done += 1
        return done

    def _load_packs(self) -> None:
        """Index the packs on disk (at startup); a pack whose header is not one is removed."""
        numbers = [-1]
        for path, number, head in _packs_in(self.pack_dir):
            if number is not None:
                numbers.append(number)
            if isinstance(head, Exception):
                self.counters["packs.damaged"] += 1
                log.warning("removing chunk pack %s: %s", path, head)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            self._index_pack(path, *head)
        self._next_pack = max(numbers) + 1

    @staticmethod
    def scan(data_dir: str | os.PathLike[str]) -> dict[str, tuple[Path, int, int]]:
        """Where each chunk of a store lies, (file, offset, length), read without opening the
        store or changing anything (tools and tests looking at a running node's store)."""
        chunk_dir = Path(data_dir) / "chunks"
        found: dict[str, tuple[Path, int, int]] = {}
        for cid, f in _chunk_files(chunk_dir):
            with contextlib.suppress(OSError):
                found[cid] = (f, 0, f.stat().st_size)
        for path, _, head in _packs_in(chunk_dir / PACK_DIR):
            if not isinstance(head, Exception):
                for cid, offset, length in _spans(*head):
                    found[cid] = (Path(path), offset, length)
        return found

    def put_data(self, data: bytes) -> str:
        """Store uncompressed bytes (publishing); returns the chunk id."""
        cid = hash_chunk(data)
        path = self.path_for(cid)
        if not path.is_file():
            atomic_write(path, encode_chunk(data), fsync=self.fsync, what=f"chunk {cid[:16]}")
        return cid

    def put_stored_unchecked(self, cid: str, stored: bytes) -> None:
        """Store a chunk the chunker just produced (its id is computed from the same bytes)."""
        path = self.path_for(cid)
        if not path.is_file():
            atomic_write(path, stored, fsync=self.fsync, what=f"chunk {cid[:16]}")

    def _reading(self, cid: str, read: Callable[[int, int, int, bool], T]) -> T:
        """read(fd, offset, length, raw) on the file holding `cid`: its own (offset 0 and its
        size), its pack, or (raw True) the file it is lent, where the bytes after the stored
        form's header lie. KeyError when absent, StoreError when unreadable. A pack rewritten
        by gc meanwhile: the chunk is read where it is now."""
        for _ in range(3):
            loc = self._packed.get(cid)
            raw = loc is None and cid in self._lent
            if raw:
                loc = self._lent_at(cid)
            try:
                fd = os.open(loc[0] if loc else self._chunk_path(cid), _LENT_FLAGS if raw else _READ_FLAGS)
            except (FileNotFoundError, NotADirectoryError) as e:
                if loc is None:
                    raise KeyError(cid) from e
                if raw and loc is not None and self._lent_at(cid) == loc:
                    self._drop_lent(cid, loc)  # its file went (the release was removed)
                    if cid not in self._lent:
                        raise KeyError(cid) from e
                    continue  # read from its next place
                if not raw and self._packed.get(cid) == loc:
                    raise KeyError(cid) from e
                continue
            except OSError as e:
                raise StoreError(f"cannot read chunk {cid[:16]}: {e.strerror or e}") from e
            try:
                offset, length = (loc[1], loc[2]) if loc else (0, os.fstat(fd).st_size)
                return read(fd, offset, length, raw)
            except OSError as e:
                raise StoreError(f"cannot read chunk {cid[:16]}: {e.strerror or e}") from e
            finally:
                os.close(fd)
        raise KeyError(cid)

    def _drop_lent(self, cid: str, loc: Loc) -> None:
        with self._lock:
            kept = tuple(p for p in self._lent.get(cid, ()) if p != loc)
            if kept:
                self._lent[cid] = kept
            else:
                self._lent.pop(cid, None)

    def _read(self, cid: str) -> bytes:
        # Short if the file was cut: then it fails to verify.
        def read(fd: int, offset: int, length: int, raw: bool) -> bytes:
            data = os.pread(fd, length, offset)
            return _RAW_HEAD + data if raw else data

        return self._reading(cid, read)

    def _verified(self, cid: str) -> tuple[bytes, bytes]:
        stored = self._read(cid)
        try:
            return stored, decode_and_verify(cid, stored)
        except IntegrityError as e:
            self.discard_damaged(cid)
            raise IntegrityError(f"damaged chunk {cid[:16]} removed from the store: {e}") from e

    def get(self, cid: str) -> bytes:
        """Uncompressed bytes, verified. KeyError when absent; IntegrityError when damaged
        (the chunk is deleted so that it is fetched again)."""
        return self._verified(cid)[1]

    def get_view(self, cid: str) -> bytes | memoryview:
        """get() without copying a raw chunk out of its stored form (verified in place):
        activation writes 40 MB this way on every node at the same moment."""
        stored = self.get_stored(cid)
        if len(stored) > HEADER_SIZE and stored[0] == FLAG_RAW:
            return memoryview(stored)[HEADER_SIZE:]
        return decode_and_verify(cid, stored)  # lz4: decoded (and hashed) once more

    def get_stored(self, cid: str) -> bytes:
        """The stored form (what peers are sent), verified like get() (hashed in place)."""
        stored = self._read(cid)
        self.check_stored(cid, stored)
        return stored

    def stored_size(self, cid: str) -> int:
        """Bytes of a chunk's stored form on disk. KeyError when absent, StoreError."""
        loc = self._packed.get(cid)
        if loc is not None:
            return loc[2]
        lent = self._lent_at(cid)
        if lent is not None:
            return lent[2] + HEADER_SIZE
        try:
            return os.stat(self._chunk_path(cid)).st_size
        except FileNotFoundError as e:
            raise KeyError(cid) from e
        except OSError as e:
            raise StoreError(f"cannot read chunk {cid[:16]}: {e.strerror or e}") from e

    def read_stored_into(self, cid: str, span: memoryview) -> None:
        """Read a chunk's stored form into `span` (its size, from stored_size) and verify it
        there. KeyError when absent; IntegrityError when it is not the chunk or no longer that
        size (it is dropped and counted, like a damaged one); StoreError when unreadable."""

        def fill(fd: int, offset: int, length: int, raw: bool) -> int:
            into = span
            if raw:  # the header byte is not in the file: written here, then the bytes after it
                span[0] = FLAG_RAW
                into = span[HEADER_SIZE:]
            got = 0
            if length == len(into):
                while got < length and (n := os.preadv(fd, [into[got:]], offset + got)):
                    got += n
            return got + (HEADER_SIZE if raw else 0)

        got = self._reading(cid, fill)
        if got != len(span):
            self.discard_damaged(cid)
            raise IntegrityError(f"chunk {cid[:16]} is not the size it had a moment ago")
        self.check_stored(cid, span)

    def check_stored(self, cid: str, stored: bytes | bytearray | memoryview) -> None:
        """Verify a stored form read from the store; a damaged one is deleted (so that it is
        fetched again), counted, and IntegrityError raised."""
        try:
            verify_stored(cid, stored)
        except IntegrityError as e:
            self.discard_damaged(cid)
            raise IntegrityError(f"damaged chunk {cid[:16]} removed from the store: {e}") from e

    def discard_damaged(self, cid: str) -> None:
        """A chunk read back wrong: counted and deleted, so that it is fetched again."""
        self.counters["chunks.damaged"] += 1
        self.delete(cid)

    def delete(self, cid: str) -> None:
        path = self._chunk_path(cid)
        empty = None
        with self._lock:
            self._lent.pop(cid, None)  # its file is not ours: only forgotten
            loc = self._packed.get(cid)
            if loc is not None:
                empty = self._forget(cid, loc)
        if empty is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(empty)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def ids(self) -> Iterator[str]:
        """Every chunk held, in id order (packed, lent or in a file of its own)."""
        with self._lock:
            held = set(self._packed).union(self._lent)
        yield from sorted(held.union(cid for cid, _ in _chunk_files(self.chunk_dir)))

    def gc(self, keep: set[str]) -> int:
        """Delete every chunk not in `keep`; returns how many were removed."""
        removed = 0
        for cid in list(self.ids()):
            if cid not in keep:
                self.delete(cid)
                removed += 1
        # The fan-out folders stay (256 at most): removing an empty one raced with a put in
        # another thread between its mkdir and its temp file (ENOENT, a failed chunk).
        self._compact()
        return removed

    def clean_temp(self) -> int:
        """Remove temp files left by a crash mid-write. Returns how many were removed."""
        removed = 0
        for folder in (self.manifest_dir, self.chunk_dir, *self.chunk_dir.iterdir()):
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                if f.name.startswith(TEMP_PREFIX):
                    with contextlib.suppress(OSError):
                        f.unlink()
                        removed += 1
        return removed

    def size_bytes(self) -> int:
        """Bytes of the chunks the store holds itself (stored forms; a pack's header, dead chunks
        and lent chunks, which are a release's files, not counted)."""
        total = 0
        for cid in self.ids():
            if cid not in self._lent or cid in self._packed:
                with contextlib.suppress(KeyError, StoreError):
                    total += self.stored_size(cid)
        return total

    # --- manifests ---------------------------------------------------------------------------

    def _manifest_path(self, release_id: str) -> Path:
        if not is_chunk_id(release_id):
            raise IntegrityError(f"not a release id: {release_id[:80]!r}")
        return self.manifest_dir / f"{release_id}.json"

    def put_manifest(self, release_id: str, document: bytes) -> None:
        atomic_write(
            self._manifest_path(release_id),
            document,
            fsync=self.fsync,
            what=f"manifest {release_id[:16]}",
        )

    def get_manifest(self, release_id: str) -> bytes:
        try:
            return self._manifest_path(release_id).read_bytes()
        except FileNotFoundError as e:
            raise KeyError(release_id) from e

    def has_manifest(self, release_id: str) -> bool:
        return self._manifest_path(release_id).is_file()

    def manifests(self) -> list[str]:
        out = []
        for f in sorted(self.manifest_dir.glob("*.json")):
            if is_chunk_id(f.stem):
                out.append(f.stem)
        return out

    def delete_manifest(self, release_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._manifest_path(release_id).unlink()


def _packs_in(
    pack_dir: Path,
) -> Iterator[tuple[str, int | None, tuple[list[tuple[str, int]], int] | Exception]]:
    """Each pack file of `pack_dir` in number order: (path, its number or None, its header's
    (entries, where the stored forms start) or why it is not a pack)."""
    try:
        names = sorted(os.listdir(pack_dir))
    except FileNotFoundError:
        return
    for entry in names:
        if not entry.endswith(PACK_SUFFIX) or entry.startswith(TEMP_PREFIX):
            continue
        number: int | None = None
        with contextlib.suppress(ValueError):
            number = int(entry[: -len(PACK_SUFFIX)], 16)
        path = os.path.join(pack_dir, entry)
        try:
            yield path, number, _read_pack_head(path)
        except (OSError, ValueError) as e:
            yield path, number, e


def _read_pack_head(path: str) -> tuple[list[tuple[str, int]], int]:
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        top = f.read(8)
        if len(top) != 8 or top[:4] != PACK_MAGIC:
            raise ValueError("not a chunk pack")
        (count,) = struct.unpack("<I", top[4:])
        if count > _PACK_MAX_ENTRIES:
            raise ValueError(f"header claims {count} chunks")
        table = f.read(count * _PACK_ENTRY.size)
    if len(table) != count * _PACK_ENTRY.size:
        raise ValueError("truncated header")
    entries = [(raw.hex(), n) for raw, n in _PACK_ENTRY.iter_unpack(table)]
    at = 8 + len(table)
    if at + sum(n for _, n in entries) > size:
        raise ValueError("shorter than its header says")
    return entries, at


def _chunk_files(chunk_dir: Path) -> Iterator[tuple[str, Path]]:
    """(id, path) of every chunk stored in a file of its own under `chunk_dir` (none if absent)."""
    if not chunk_dir.is_dir():
        return
    for sub in chunk_dir.iterdir():
        if not (sub.is_dir() and len(sub.name) == 2):
            continue
        for f in sub.iterdir():
            cid = sub.name + f.name
            if len(f.name) == ID_LEN - 2 and is_chunk_id(cid):
                yield cid, f


def _spans(entries: list[tuple[str, int]], at: int) -> Iterator[tuple[str, int, int]]:
    """(id, offset, length) of a pack's chunks, from its header's entries and where they start."""
    for cid, length in entries:
        yield cid, at, length
        at += length
