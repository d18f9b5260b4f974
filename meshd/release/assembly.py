"""A release written where it will be installed while it is fetched: each byte written once.

<data_dir>/releases/<name>/.part-<release id>/ holds the release's files at their full size
(sparse until written). Each raw chunk a fetch stores is written at every offset the manifest
gives it (pwrite) and the store is lent the chunk's first place (ChunkStore.put_placed) to serve
it from. Activation writes in what the fetch did not (chunks the store already held), sets the
modes, syncs every file and folder and renames the folder to <name>/<version>. Before, a fetched
piece went into a pack and activation wrote the whole release again: in a 32-host lab that
second write was a sixth of every node's CPU, and every installed release was on disk twice.

Durability: a piece is not synced on its own (as aria2c and Syncthing do not sync each block):
what is lost in a crash is found by the restart, which resumes an assembly by hashing each
chunk's places again; the chunks whose every place holds them count as written, the others are
fetched again. The release is made durable once, whole, before it is renamed into place. An
assembly of a release that is dropped is deleted; the store forgets its places first.

Every file is opened with O_NOFOLLOW under a folder only meshd writes; paths come from a
manifest whose check() refused absolute paths and '..' (checked again here).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

from meshd.errors import DecodeError, IntegrityError
from meshd.release.chunker import chunk_id
from meshd.release.manifest import Manifest
from meshd.release.store import fsync_dir

PART_PREFIX = ".part-"
_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def part_folder(base: Path, release_id: str) -> Path:
    """Where the release `release_id` of the release folder `base` is assembled."""
    return base / f"{PART_PREFIX}{release_id}"


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class Assembly:
    """One release's files, filled in place by a fetch and finished by activation.

    Worker threads place pieces at once: files are created under a lock, and each piece writes
    its own chunks' places."""

    def __init__(self, folder: Path, manifest: Manifest, *, fsync: bool = True) -> None:
        manifest.check()  # IntegrityError for a path that is absolute or climbs out
        self.folder = folder
        self.manifest = manifest
        self.fsync = fsync
        self.prefix = str(folder) + os.sep
        self._paths: list[str] = []
        self._sizes: list[int] = []
        self._places: dict[str, list[tuple[int, int]]] = {}  # chunk id -> [(file no, offset)]
        for no, entry in enumerate(manifest.files):
            target = folder.joinpath(*entry.path.split("/"))
            if folder not in target.parents:
                raise IntegrityError(f"path {entry.path!r} escapes the release folder")
            self._paths.append(str(target))
            self._sizes.append(entry.size)
            at = 0
            for cid in entry.chunks:
                self._places.setdefault(cid, []).append((no, at))
                at += manifest.chunks[cid]
        self.written: set[str] = set()  # chunks at every one of their places
        self.closed = False  # renamed into place: a late piece (endgame) writes nothing
        self._made: set[int] = set()  # files created (at their size) by this object
        self._lock = threading.Lock()

    def fits(self, cid: str, size: int) -> bool:
        """Whether a chunk of `size` raw bytes has places here (the manifest's size for it)."""
        return cid in self._places and self.manifest.chunks.get(cid) == size

    def _open(self, no: int) -> int | None:
        """The file `no`, created at its size if this assembly has not made it yet; None once
        the assembly is closed (its folder may be gone: nothing is created again)."""
        path = self._paths[no]
        with self._lock:
            if self.closed:
                return None
            if no not in self._made:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, _FLAGS | os.O_CREAT, 0o600)
                try:
                    if os.fstat(fd).st_size != self._sizes[no]:
                        os.ftruncate(fd, self._sizes[no])
                except BaseException:
                    os.close(fd)
                    raise
                self._made.add(no)
                return fd
        return os.open(path, _FLAGS)

    def place(self, items: list[tuple[str, memoryview]]) -> list[tuple[str, str, int, int]]:
        """Write raw chunks (each checked with fits()) at all their places (not synced: see the
        module docstring); returns where the store may read each: (id, file, offset, length).
        OSError as it comes."""
        fds: dict[int, int] = {}
        out: list[tuple[str, str, int, int]] = []
        try:
            for cid, raw in items:
                spots = self._places[cid]
                for no, offset in spots:
                    fd = fds.get(no)
                    if fd is None:
                        opened = self._open(no)
                        if opened is None:
                            return out  # installed meanwhile: the chunk is there already
                        fd = fds[no] = opened
                    _pwrite_all(fd, raw, offset)
                no, offset = spots[0]
                out.append((cid, self._paths[no], offset, len(raw)))
        finally:
            for fd in fds.values():
                os.close(fd)
        with self._lock:
            self.written.update(cid for cid, *_ in out)
        return out

    def places(self, under: Path | None = None) -> Iterator[tuple[str, str, int, int]]:
        """Every chunk's first place, (id, file, offset, length), as ChunkStore.lend takes them;
        `under`: as if the folder were there (the installed release, after the rename)."""
        prefix = self.prefix if under is None else str(under) + os.sep
        for cid, spots in self._places.items():
            no, offset = spots[0]
            yield cid, prefix + self._paths[no][len(self.prefix) :], offset, self.manifest.chunks[cid]

    def resume(self) -> list[tuple[str, str, int, int]]:
        """After a restart: hash every chunk's places in the files on disk; those whose every
        place holds them count as written. Returns their first places (to lend)."""
        out: list[tuple[str, str, int, int]] = []
        fds: dict[int, int | None] = {}
        try:
            for cid, spots in self._places.items():
                size = self.manifest.chunks[cid]
                ok = True
                for no, offset in spots:
                    if no not in fds:
                        try:
                            fds[no] = os.open(self._paths[no], _FLAGS)
                        except OSError:
                            fds[no] = None
                    fd = fds[no]
                    if fd is None or chunk_id(os.pread(fd, size, offset)) != cid:
                        ok = False
                        break
                if ok:
                    no, offset = spots[0]
                    out.append((cid, self._paths[no], offset, size))
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)
        # Files found are not marked made: the first write opens each at its size again (a file
        # a crash left short or long ends exactly as the manifest says).
        self.written.update(cid for cid, *_ in out)
        return out

    def complete(self, read: Callable[[str], bytes | memoryview]) -> None:
        """Write in every chunk the fetch did not place (read(cid): its bytes, verified, from
        the store), set each file's mode and sync the files and folders: the release is whole
        and durable, ready to be renamed into place."""
        dirs = {self.folder}
        for no, entry in enumerate(self.manifest.files):
            fd = self._open(no)
            if fd is None:
                raise FileNotFoundError(errno.ENOENT, "assembly already installed", str(self.folder))
            try:
                at = 0
                for cid in entry.chunks:
                    if cid not in self.written:
                        _pwrite_all(fd, read(cid), at)
                    at += self.manifest.chunks[cid]
                os.fchmod(fd, entry.mode)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            parent = Path(self._paths[no]).parent
            while parent != self.folder and parent not in dirs:
                dirs.add(parent)
                parent = parent.parent
        self.folder.mkdir(parents=True, exist_ok=True)  # a release of no files is a folder too
        if self.fsync:
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(d)

    def close(self) -> None:
        """No more writes (the folder is about to be renamed into place)."""
        with self._lock:
            self.closed = True

    def discard(self) -> None:
        """Delete the files (a release dropped before it was installed)."""
        self.remove(self.folder)

    @staticmethod
    def remove(folder: Path) -> None:
        """Delete an assembly's folder, whatever it holds."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(folder)


def held_places(data_dir: str | os.PathLike[str]) -> dict[str, tuple[Path, int, int]]:
    """Where the chunks of a data dir's installed releases and assemblies lie raw, (file,
    offset, length), read without opening a store or changing anything (tools and tests looking
    at a running node, with ChunkStore.scan for the chunks the store holds itself)."""
    root = Path(data_dir)
    found: dict[str, tuple[Path, int, int]] = {}
    folders: list[tuple[Path, str]] = []
    for meta in sorted(root.glob("releases/*/.meta/*.json")):
        with contextlib.suppress(OSError, orjson.JSONDecodeError, AttributeError):
            rid = orjson.loads(meta.read_bytes()).get("release_id")
            if isinstance(rid, str):
                folders.append((meta.parent.parent / meta.stem, rid))
    for part in sorted(root.glob(f"releases/*/{PART_PREFIX}*")):
        folders.append((part, part.name[len(PART_PREFIX) :]))
    for folder, rid in folders:
        try:
            manifest = Manifest.from_bytes((root / "manifests" / f"{rid}.json").read_bytes())
            places = list(Assembly(folder, manifest).places())
        except (OSError, DecodeError, IntegrityError):
            continue
        for cid, path, offset, length in places:
            if os.path.isfile(path):
                found.setdefault(cid, (Path(path), offset, length))
    return found
