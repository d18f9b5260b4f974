"""Materialise verified releases and switch between them atomically.

Layout under <data_dir>/releases/<name>/:
    <version>/            a complete release (built in ".tmp-*" then renamed: never partial)
    current -> <version>  relative symlink, replaced atomically (symlink to a temp name, rename)
    .meta/<version>.json  {"release_id", "seq"}; seq orders versions by activation
    .meta/pending.json    {"version", "previous"} while the activation hook runs

Crash safety, step by step (a kill at any instant):
  build in .tmp-*   -> current untouched; recover() deletes the temp dir
  rename to <ver>   -> <ver> is complete or absent
  write pending     -> current untouched
  switch current    -> rename is atomic: old or new, both complete
  hook runs         -> current = new (complete); recover() sees pending and rolls back to the
                       previous version, since the hook never confirmed the new one
  retire old dirs   -> renamed to .trash-* first, so a listed version is always complete

A single-file release becomes <version>/<file name>. Manifests must be verified by the caller;
paths are checked again here (manifest.check()) before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from meshd.errors import DecodeError, IntegrityError, MeshError
from meshd.release.assembly import Assembly
from meshd.release.manifest import NAME_RE, Manifest
from meshd.release.store import ChunkStore, StoreError, atomic_write, fsync_dir

CURRENT = "current"
META = ".meta"
PENDING = "pending.json"
TEMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_HOOK_OUTPUT_TAIL = 400  # what an error message quotes of the hook's output
_HOOK_READ = 65536  # one read of the hook's pipe; with the tail, all the memory its output costs


class ActivationError(MeshError):
    """A release could not be materialised or its activation hook failed (rolled back)."""


class ActivationDiskFull(ActivationError):
    """No room to materialise the release: a state to wait out, not a failed release."""


@dataclass(frozen=True)
class ActivationResult:
    name: str
    version: str
    path: Path
    previous: str | None
    changed: bool  # False when this version was already current
    retired: list[str] = field(default_factory=list)
    kept_chunks: set[str] = field(default_factory=set)  # referenced by installed versions


def _check_name(value: str, what: str) -> None:
    if not NAME_RE.fullmatch(value) or value == CURRENT:
        raise ActivationError(f"invalid release {what} {value!r}")


def _read_tail(
    fd: int, deadline: float, keep: int, clock: Callable[[], float] = time.monotonic
) -> tuple[bytes, bool]:
    """Read `fd` to EOF or until `deadline` (on `clock`); (its last `keep` bytes, whether EOF
    came in time).

    Incremental, so a hook that writes gigabytes costs one read buffer and the tail, not its
    whole output (communicate() would keep all of it).
    """
    tail = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - clock()
            if left <= 0:
                return bytes(tail), False
            if not sel.select(left):
                continue  # woke without data: the loop re-checks the deadline
            chunk = os.read(fd, _HOOK_READ)
            if not chunk:
                return bytes(tail), True
            tail += chunk
            del tail[:-keep]


def _write_error(manifest: Manifest, e: OSError) -> ActivationError:
    """What an OSError while materialising is: a disk to wait on when full, else a failure."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    why = "disk full" if full else (e.strerror or str(e))
    error = ActivationDiskFull if full else ActivationError
    return error(f"cannot materialise {manifest.name} {manifest.version}: {why}")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class Releases:
    """Installed releases of one node: materialise, activate with hook and rollback, retire."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        store: ChunkStore,
        *,
        keep: int = 3,
        hook: Sequence[str] | None = None,
        hook_timeout: float = 60.0,
        fsync: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root = Path(data_dir) / "releases"
        self.store = store
        self.keep = keep
        self.hook = list(hook) if hook else None
        self.hook_timeout = hook_timeout
        self.fsync = fsync
        self.env = dict(env) if env is not None else None
        self.root.mkdir(parents=True, exist_ok=True)

    # --- views -------------------------------------------------------------------------------

    def base(self, name: str) -> Path:
        _check_name(name, "name")
        return self.root / name

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))

    def current(self, name: str) -> str | None:
        """The version `current` points at, or None."""
        try:
            target = os.readlink(self.base(name) / CURRENT)
        except OSError:
            return None
        return target if (self.base(name) / target).is_dir() else None

    def _meta(self, name: str, version: str) -> dict[str, object] | None:
        try:
            raw = (self.base(name) / META / f"{version}.json").read_bytes()
            meta = orjson.loads(raw)
        except (OSError, orjson.JSONDecodeError):
            return None
        return meta if isinstance(meta, dict) else None

    def installed(self, name: str) -> list[str]:
        """Complete versions of `name`, least recently activated first."""
        base = self.base(name)
        if not base.is_dir():
            return []
        found = []
        for p in base.iterdir():
            if p.name == CURRENT or not NAME_RE.fullmatch(p.name):
                continue
            if p.is_dir() and not p.is_symlink():
                seq = (self._meta(name, p.name) or {}).get("seq", 0)
                found.append((seq if isinstance(seq, int) else 0, p.name))
        return [v for _, v in sorted(found)]

    def release_id(self, name: str, version: str) -> str | None:
        rid = (self._meta(name, version) or {}).get("release_id")
        return rid if isinstance(rid, str) else None

    def referenced_chunks(self) -> set[str]:
        """Chunk ids of every installed version whose manifest is in the store."""
        keep: set[str] = set()
        for name in self.names():
            for version in self.installed(name):
                rid = self.release_id(name, version)
                if rid is None:
                    continue
                try:
                    manifest = Manifest.from_bytes(self.store.get_manifest(rid))
                except (KeyError, DecodeError, IntegrityError):
                    continue
                keep.update(manifest.chunks)
        return keep

    # --- materialise -------------------------------------------------------------------------

    def _write_meta(self, name: str, version: str, release_id: str, seq: int) -> None:
        data = orjson.dumps({"release_id": release_id, "seq": seq})
        atomic_write(self.base(name) / META / f"{version}.json", data, fsync=self.fsync, what="meta")

    def _next_seq(self, name: str) -> int:
        seqs = [(self._meta(name, v) or {}).get("seq", 0) for v in self.installed(name)]
        return max([s for s in seqs if isinstance(s, int)], default=0) + 1

    def materialise(self, manifest: Manifest, assembly: Assembly | None = None) -> Path:
        """Build <name>/<version>/ from the store (once); returns its path. With the `assembly`
        a fetch filled in place, that is finished and renamed instead (see release/assembly.py),
        and the store then reads the release's chunks from their installed places.

        KeyError-free: a missing chunk gives ActivationError; a damaged one IntegrityError (the
        store has dropped it, fetch it again). Nothing is left behind on failure, but for an
        assembly, which is kept for the next try.
        """
        try:
            manifest.check()
        except IntegrityError as e:
            raise ActivationError(f"refusing to materialise: {e}") from e
        base = self.base(manifest.name)
        final = base / manifest.version
        if final.is_dir():
            installed = self.release_id(manifest.name, manifest.version)
            if installed is not None and installed != manifest.release_id:
                raise ActivationError(
                    f"{manifest.name} {manifest.version} is already installed with other content "
                    f"(release {installed[:16]}, not {manifest.release_id[:16]}); "
                    "publish a new version instead"
                )
            return final
        base.mkdir(parents=True, exist_ok=True)
        if assembly is not None:
            return self._install_assembly(manifest, assembly, final)
        tmp = base / f"{TEMP_PREFIX}{manifest.version}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            self._build(manifest, tmp)
            self._write_meta(manifest.name, manifest.version, manifest.release_id, 0)
            os.rename(tmp, final)
            if self.fsync:
                fsync_dir(base)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (IntegrityError, ActivationError, StoreError)):
                raise
            if isinstance(e, OSError):
                raise _write_error(manifest, e) from e
            raise
        return final

    def _install_assembly(self, manifest: Manifest, assembly: Assembly, final: Path) -> Path:
        base = final.parent
        try:
            assembly.complete(lambda cid: self._chunk_of(manifest, cid))
            self._write_meta(manifest.name, manifest.version, manifest.release_id, 0)
            assembly.close()
            try:
                os.rename(assembly.folder, final)
            except BaseException:
                assembly.closed = False  # still where it was: a later try goes on with it
                raise
            if self.fsync:
                fsync_dir(base)
        except OSError as e:
            raise _write_error(manifest, e) from e
        # Every chunk of the release is read from its installed place from now on (those it
        # shares with an older version too: that one may be retired).
        self.store.lend(assembly.places(final))
        return final

    def _chunk_of(self, manifest: Manifest, cid: str) -> bytes | memoryview:
        try:
            return self.store.get_view(cid)
        except KeyError as e:
            raise ActivationError(
                f"cannot materialise {manifest.name} {manifest.version}: chunk {cid[:16]} is not in the store"
            ) from e

    def _build(self, manifest: Manifest, tmp: Path) -> None:
        dirs = {tmp}
        for entry in manifest.files:
            target = tmp.joinpath(*entry.path.split("/"))
            # Defence in depth: manifest.check() already refused '..' and absolute paths.
            if tmp not in target.parents:
                raise ActivationError(f"path {entry.path!r} escapes the release folder")
            parent = target.parent
            parent.mkdir(parents=True, exist_ok=True)
            while parent != tmp:
                dirs.add(parent)
                parent = parent.parent
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(target, flags, 0o600)
            try:
                for cid in entry.chunks:
                    view = memoryview(self._chunk_of(manifest, cid))
                    while view:
                        view = view[os.write(fd, view) :]
                os.fchmod(fd, entry.mode)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        if self.fsync:
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(d)

    # --- switching ---------------------------------------------------------------------------

    def _switch(self, name: str, version: str | None) -> None:
        """Point current at `version` atomically (None removes the link)."""
        base = self.base(name)
        link = base / CURRENT
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
        else:
            tmp = base / f"{TEMP_PREFIX}{CURRENT}-{secrets.token_hex(4)}"
            os.symlink(version, tmp)
            try:
                os.replace(tmp, link)
            except Exception:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        if self.fsync:
            fsync_dir(base)

    def _pending_path(self, name: str) -> Path:
        return self.base(name) / META / PENDING

    def activate(self, manifest: Manifest, assembly: Assembly | None = None) -> ActivationResult:
        """Materialise, switch current, run the hook (roll back on failure), retire old versions."""
        name, version = manifest.name, manifest.version
        path = self.materialise(manifest, assembly)
        previous = self.current(name)
        if previous == version:
            return ActivationResult(name, version, path, previous, False, [], self.referenced_chunks())
        if self.hook:
            pending = orjson.dumps({"version": version, "previous": previous})
            atomic_write(self._pending_path(name), pending, fsync=self.fsync, what="pending")
        self._switch(name, version)
        if self.hook:
            failure = self._run_hook(manifest, path, previous)
            if failure is not None:
                self._switch(name, previous)
                self._pending_path(name).unlink(missing_ok=True)
                back = f"rolled back to {previous}" if previous else "no version is current"
                raise ActivationError(f"activation hook for {name} {version} failed: {failure}; {back}")
            self._pending_path(name).unlink(missing_ok=True)
        self._write_meta(name, version, manifest.release_id, self._next_seq(name))
        retired = self.retire(name)
        return ActivationResult(name, version, path, previous, True, retired, self.referenced_chunks())

    def _hook_env(self, manifest: Manifest, path: Path, previous: str | None) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        env.update(
            MESHD_RELEASE_NAME=manifest.name,
            MESHD_RELEASE_VERSION=manifest.version,
            MESHD_RELEASE_ID=manifest.release_id,
            MESHD_RELEASE_DIR=str(path),
            MESHD_RELEASE_CURRENT=str(self.base(manifest.name) / CURRENT),
            MESHD_RELEASE_PREVIOUS=previous or "",
        )
        return env

    def _run_hook(self, manifest: Manifest, path: Path, previous: str | None) -> str | None:
        """Run the hook; None on success, else a one-line reason."""
        assert self.hook is not None
        try:
            proc = subprocess.Popen(  # noqa: S603 - the operator's configured hook, no shell
                self.hook,
                cwd=path,
                env=self._hook_env(manifest, path, previous),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so a timeout kills the hook's children too
            )
        except OSError as e:
            return f"cannot run {self.hook[0]}: {e.strerror or e}"
        assert proc.stdout is not None
        deadline = time.monotonic() + self.hook_timeout
        try:
            out, finished = _read_tail(proc.stdout.fileno(), deadline, _HOOK_OUTPUT_TAIL)
            if finished:
                # EOF: the hook (and whatever shared its output) is done writing; it may still
                # take a moment to exit, within what is left of the timeout.
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    finished = False
        except BaseException:
            _kill_group(proc.pid)  # interrupted: leave no hook behind
            raise
        finally:
            proc.stdout.close()
        if not finished:
            _kill_group(proc.pid)
            proc.wait()
            return f"{self.hook[0]} timed out after {self.hook_timeout:g}s"
        if proc.returncode != 0:
            tail = out.decode("utf-8", "replace").strip()
            return f"{self.hook[0]} exited with {proc.returncode}" + (f": {tail}" if tail else "")
        return None

    # --- retiring and recovery ---------------------------------------------------------------

    def retire(self, name: str, keep: int | None = None) -> list[str]:
        """Remove all but the current and the most recently activated versions (keep in total).

        Manifests of retired versions are deleted from the store; call
        store.gc(referenced_chunks() | chunks of releases still downloading) afterwards.
        """
        keep = self.keep if keep is None else keep
        current = self.current(name)
        versions = [v for v in self.installed(name) if v != current]
        budget = max(0, keep - (1 if current else 0))
        doomed = versions[: max(0, len(versions) - budget)]
        base = self.base(name)
        for version in doomed:
            rid = self.release_id(name, version)
            trash = base / f"{TRASH_PREFIX}{version}-{secrets.token_hex(4)}"
            self.store.forget_lent(str(base / version) + os.sep)  # its files go
            os.rename(base / version, trash)
            (base / META / f"{version}.json").unlink(missing_ok=True)
            shutil.rmtree(trash, ignore_errors=True)
            if rid is not None:
                self.store.delete_manifest(rid)
        return doomed

    def recover(self) -> list[str]:
        """Clean up after a crash; returns what was done (for the log). Call at startup."""
        actions: list[str] = []
        for name in self.names():
            base = self.base(name)
            for p in base.iterdir():
                if p.name.startswith((TEMP_PREFIX, TRASH_PREFIX)):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                    actions.append(f"removed {name}/{p.name}")
            pending = self._pending_path(name)
            if pending.exists():
                try:
                    info = orjson.loads(pending.read_bytes())
                    prev = info.get("previous") if isinstance(info, dict) else None
                except (OSError, orjson.JSONDecodeError):
                    prev = None
                if prev is not None and not (isinstance(prev, str) and (base / prev).is_dir()):
                    prev = None
                self._switch(name, prev)
                pending.unlink(missing_ok=True)
                actions.append(f"{name}: hook never confirmed; current -> {prev or 'none'}")
            meta_dir = base / META
            if meta_dir.is_dir():
                for m in meta_dir.iterdir():
                    if m.name.startswith(TEMP_PREFIX):
                        m.unlink(missing_ok=True)
                    elif m.suffix == ".json" and m.name != PENDING and not (base / m.stem).is_dir():
                        m.unlink(missing_ok=True)
                        actions.append(f"removed stale meta {name}/{m.name}")
            link = base / CURRENT
            if link.is_symlink() and self.current(name) is None:
                link.unlink()
                actions.append(f"{name}: removed dangling current")
        return actions
