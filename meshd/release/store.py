"""Content-addressed chunk store and manifest store in the data dir.

Layout:
    <data_dir>/chunks/ab/cdef...   stored form of chunk abcdef... (header byte + raw or lz4)
    <data_dir>/manifests/<release id>.json   signed manifest documents

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
  consistent.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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

TEMP_PREFIX = ".tmp-"
_temp_names = itertools.count()  # with the pid, a temp name no other writer uses (O_EXCL checks)


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


def _find_syncfs() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _find_syncfs()


def sync_filesystem(folder: Path) -> bool:
    """One barrier for everything written to `folder`'s filesystem (Linux syncfs); False when
    the platform has none (the caller then fsyncs file by file). OSError when it fails."""
    if _SYNCFS is None:
        return False
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
    return True


def _store_error(e: OSError, what: str, folder: Path) -> StoreError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full: cannot store {what} in {folder} ({e.strerror})")
    return StoreError(f"cannot store {what} in {folder}: {e.strerror or e}")


@dataclass
class PutResult:
    """What put_many did: chunks now in the store, chunks refused (wrong hash), the first
    write error (the chunks after it were not written)."""

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
        self.counters = Counters({"chunks.damaged": 0, "chunks.rejected": 0})
        self._chunk_prefix = str(self.chunk_dir) + os.sep  # paths as strings: pathlib cost 5% of a fetch
        try:
            self.chunk_dir.mkdir(parents=True, exist_ok=True)
            self.manifest_dir.mkdir(parents=True, exist_ok=True)
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
        return os.path.isfile(self._chunk_path(cid))

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
        """Store chunks received in stored form, each verified first, with two durability
        barriers for the whole batch instead of two fsyncs per chunk.

        The same guarantee as put() one by one: a chunk reaches its name only after its bytes
        are on disk (temp files written, barrier, renames, barrier), so a crash leaves whole
        chunks or none, and every chunk in `stored` is durable when this returns. Per-chunk
        fsyncs were most of a fetching node's time on a busy disk (about 40 ms per 2 MiB piece
        idle, far more with many writers). verify=False only for what the chunker just made
        (its id is computed from the same bytes), as put_stored_unchecked."""
        out = PutResult()
        pending: list[tuple[str, str, str]] = []  # (cid, temp file, final path)
        done: list[tuple[str, str]] = []
        try:
            for cid, stored in items:
                path = self._chunk_path(cid)
                try:
                    if verify:
                        verify_stored(cid, stored)
                except IntegrityError:
                    self.counters["chunks.rejected"] += 1
                    out.bad.append(cid)
                    continue
                if os.path.isfile(path):
                    out.stored.append(cid)
                    continue
                folder = os.path.dirname(path)
                try:
                    tmp = self._write_temp(folder, stored, fsync=self.fsync and _SYNCFS is None)
                except OSError as e:
                    out.error = _store_error(e, f"chunk {cid[:16]}", Path(folder))
                    break
                pending.append((cid, tmp, path))
            if pending and self.fsync:
                sync_filesystem(self.chunk_dir)  # the temp files' bytes
            while pending:
                cid, tmp, path = pending[0]
                os.replace(tmp, path)
                pending.pop(0)
                done.append((cid, path))
            if done and self.fsync and not sync_filesystem(self.chunk_dir):  # the new names
                for folder in {os.path.dirname(p) for _, p in done}:
                    fsync_dir(Path(folder))
            out.stored.extend(cid for cid, _ in done)
        except OSError as e:
            out.error = out.error or _store_error(e, "chunks", self.chunk_dir)
            # Renamed but not known durable: those stay (whole, verified bytes); temps go.
            out.stored.extend(cid for cid, _ in done if cid not in out.stored)
        finally:
            for _, tmp, _ in pending:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return out

    @staticmethod
    def _write_temp(folder: str, data: bytes | memoryview, *, fsync: bool) -> str:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        while True:  # mkstemp's random names cost more than the write of a small chunk
            tmp = f"{folder}{os.sep}{TEMP_PREFIX}{os.getpid()}-{next(_temp_names)}"
            try:
                fd = os.open(tmp, flags, 0o600)
                break
            except FileNotFoundError:  # the fan-out folder's first chunk
                os.makedirs(folder, exist_ok=True)
            except FileExistsError:  # left by a crashed process that had this pid
                continue
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

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

    def _read(self, cid: str) -> bytes:
        try:
            with open(self._chunk_path(cid), "rb", buffering=0) as f:
                return f.read()
        except FileNotFoundError as e:
            raise KeyError(cid) from e
        except OSError as e:
            raise StoreError(f"cannot read chunk {cid[:16]}: {e.strerror or e}") from e

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
        got = 0
        try:
            with open(self._chunk_path(cid), "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size == len(span):
                    while got < len(span) and (n := f.readinto(span[got:])):
                        got += n
        except FileNotFoundError as e:
            raise KeyError(cid) from e
        except OSError as e:
            raise StoreError(f"cannot read chunk {cid[:16]}: {e.strerror or e}") from e
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._chunk_path(cid))

    def ids(self) -> Iterator[str]:
        for sub in sorted(self.chunk_dir.iterdir()):
            if not (sub.is_dir() and len(sub.name) == 2):
                continue
            for f in sorted(sub.iterdir()):
                cid = sub.name + f.name
                if len(f.name) == ID_LEN - 2 and is_chunk_id(cid):
                    yield cid

    def gc(self, keep: set[str]) -> int:
        """Delete every chunk not in `keep`; returns how many were removed."""
        removed = 0
        for cid in list(self.ids()):
            if cid not in keep:
                self.delete(cid)
                removed += 1
        # The fan-out folders stay (256 at most): removing an empty one raced with a put in
        # another thread between its mkdir and its temp file (ENOENT, a failed chunk).
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
        return sum(self.path_for(cid).stat().st_size for cid in self.ids())

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
