"""Free space on the data dir: a release is fetched when it fits, and waits for room when not.

A full disk is a state, not a loop. Before a release is fetched (adopted, or resumed at start)
the free space of the data dir's file system is compared with what the release needs: its
missing chunks at their uncompressed size (an upper bound for the store: a stored chunk is
lz4 or raw plus one byte), plus its total size (materialised into releases/<name>/<version>),
plus the [dist] `min_free` margin. When it does not fit, the release is not started: its row
in GET /v1/releases shows state "waiting" with `error: "disk full: needs X MiB, Y MiB free"`,
a "disk full" release event is emitted, `space.full` counted, one WARNING logged.

A complete release that could not be materialised for want of room waits the same way
(materialise_when_room) and is activated again once its folder fits.

A fetch already running whose chunks cannot be stored (the store raised DiskFullError) is
reported the same way. Its sources cool down as after any failure (the swarm's back-off: no
request storm), and the gate watches free space once a second; as soon as the release fits, a
waiting release is started, or the stalled fetch's cool-downs are cleared (Swarm.retry_now) so
chunks flow again within a second or two instead of after a back-off of up to a minute. A
stalled fetch that stalls again without any progress since its last resume (statvfs says there
is room, the writes say otherwise: a quota) is resumed after a doubling delay, logged once.

SpaceWaits is the sans-IO part (who waits, for how much, who may go now). SpaceGate is its
shell: statvfs runs in a thread of its own with a timeout, one at a time (a dead network mount
can hang it: a hung call ties up one daemon thread, never a shared worker, and never a second
one), and the poll runs only while something waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd.core.counters import Counters
from meshd.release.fetch import FetchDriver, ReleaseFetch, Spawn
from meshd.release.manifest import Manifest

log = logging.getLogger("meshd.release")

MiB = 1024 * 1024
POLL_INTERVAL = 1.0  # how often free space is read while a release waits for it
PROBE_TIMEOUT = 5.0  # a statvfs slower than this counts as "unknown" (a hung mount)
RETRY_MAX = 60.0  # cap of the delay between resumes that made no progress

FreeSpace = Callable[[Path], int]
Emit = Callable[[Manifest, str, str], None]  # (manifest, state, detail): ReleaseService._emit


def statvfs_free(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def space_needed(manifest: Manifest, missing: Iterable[str]) -> int:
    """Bytes a release still needs on disk, margin not included: its missing chunks (each once)
    at their uncompressed size, plus its total size for the materialised release folder."""
    chunks = sum(manifest.chunks.get(cid, 0) for cid in set(missing))
    return chunks + manifest.total_size


def mib(n: int) -> str:
    return f"{n / MiB:.0f}" if n >= 10 * MiB else f"{n / MiB:.1f}"


def describe(need: int, free: int | None) -> str:
    """The row's error text: what is needed (margin included) and what is free."""
    if free is None:
        return f"disk full: needs {mib(need)} MiB"
    return f"disk full: needs {mib(need)} MiB, {mib(free)} MiB free"


@dataclass
class Wait:
    rid: str
    need: int  # bytes, margin not included
    started: bool  # True: a running fetch stalled on a full disk; False: not started yet
    since: float
    not_before: float  # no resume before this (a resume that made no progress backs off)
    progress: int  # chunks held when it stalled
    streak: int  # resumes in a row that made no progress


class SpaceWaits:
    """Sans-IO: the releases waiting for free space, and which of them may go now."""

    def __init__(
        self, margin: int, *, retry_base: float = POLL_INTERVAL, retry_max: float = RETRY_MAX
    ) -> None:
        self.margin = margin
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.free: int | None = None  # the last free space read
        self._waits: dict[str, Wait] = {}
        self._resumed: dict[str, tuple[int, int]] = {}  # rid -> (progress, streak) at its resume

    def __contains__(self, rid: object) -> bool:
        return rid in self._waits

    def __len__(self) -> int:
        return len(self._waits)

    def fits(self, need: int, free: int) -> bool:
        return need + self.margin <= free

    def hold(self, rid: str, need: int, now: float, *, started: bool, progress: int = 0) -> bool:
        """`rid` waits for room. True when that is news to report (log, event, counter): not
        when it waits already, nor when it stalls again without progress since its resume."""
        w = self._waits.get(rid)
        if w is not None:
            w.need = need
            return False
        streak = 0
        last = self._resumed.pop(rid, None)
        if last is not None and progress <= last[0]:
            streak = last[1] + 1
        delay = min(self.retry_max, self.retry_base * 2**streak) if streak else 0.0
        self._waits[rid] = Wait(rid, need, started, now, now + delay, progress, streak)
        return streak == 0

    def ready(self, free: int, now: float) -> list[Wait]:
        """Record the free space read; the waits that fit now (first come first served, each
        counted against what those before it take), removed from the waiting set."""
        self.free = free
        out: list[Wait] = []
        used = 0
        for w in list(self._waits.values()):
            if w.not_before > now or not self.fits(used + w.need, free):
                continue
            used += w.need
            out.append(w)
            del self._waits[w.rid]
            self._resumed[w.rid] = (w.progress, w.streak)
        return out

    def drop(self, rid: str) -> None:
        """It no longer waits (finished, cancelled): forget it altogether."""
        self._waits.pop(rid, None)
        self._resumed.pop(rid, None)

    def forget_except(self, rids: Iterable[str]) -> None:
        """Forget the resume history of releases no longer fetched (bounded state)."""
        keep = set(rids) | set(self._waits)
        for rid in [r for r in self._resumed if r not in keep]:
            del self._resumed[rid]

    def error(self, rid: str) -> str | None:
        w = self._waits.get(rid)
        return describe(w.need + self.margin, self.free) if w is not None else None

    def rids(self) -> list[str]:
        return list(self._waits)


class SpaceGate:
    """Starts a release only when it fits; watches free space while any release waits for it."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        driver: FetchDriver,
        margin: int,
        counters: Counters,
        emit: Emit,
        spawn: Spawn,
        free_space: FreeSpace | None = None,
        interval: float = POLL_INTERVAL,
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self.driver = driver
        self.counters = counters
        self._emit = emit
        self._spawn = spawn
        self.free_space = free_space or statvfs_free
        self.interval = interval
        self.timeout = timeout
        self.waits = SpaceWaits(margin, retry_base=interval)
        self._pending: dict[str, tuple[Manifest, list[str]]] = {}  # not started yet
        self._stalled: dict[str, ReleaseFetch] = {}  # started, stalled on a full disk
        self._unpacking: dict[str, Callable[[], object]] = {}  # complete, no room to materialise
        self._probing: asyncio.Future[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    # --- inputs ------------------------------------------------------------------------------

    async def start(self, manifest: Manifest, missing: Sequence[str]) -> bool:
        """Fetch `missing` of `manifest` if it fits (or nothing is missing: complete at once);
        else it waits for room and starts by itself. True when started now."""
        rid = manifest.release_id
        if not missing:
            self.driver.start(manifest, missing)
            return True
        need = space_needed(manifest, missing)
        free = await self._probe()
        if self.driver.closed or rid in self.driver.fetches or rid in self._pending:
            return False
        # Unknown free space (statvfs failed or hangs) does not block: the store reports a
        # full disk anyway, and the fetch then waits here like any stalled one.
        if free is None or self.waits.fits(need, free):
            self.driver.start(manifest, missing)
            return True
        self.waits.free = free
        self._pending[rid] = (manifest, list(missing))
        self._hold(manifest, need, started=False, progress=len(manifest.chunks) - len(missing))
        return False

    def stalled(self, fetch: ReleaseFetch) -> None:
        """The driver could not store a chunk of `fetch`: the disk is full (DiskFullError)."""
        if fetch.closed or self.driver.closed:
            return
        self._stalled[fetch.rid] = fetch
        self.waits.free = None  # what was read before is stale now: unknown until the next poll
        need = space_needed(fetch.manifest, fetch.swarm.missing_ids())
        self._hold(fetch.manifest, need, started=True, progress=fetch.swarm.progress().have_chunks)

    def materialise_when_room(self, manifest: Manifest, then: Callable[[], object]) -> None:
        """A complete release could not be materialised for want of room: wait (reported like
        any wait) until its folder fits, then call `then` (the service activates it again)."""
        if manifest.release_id in self._unpacking:
            return
        self._unpacking[manifest.release_id] = then
        self.waits.free = None  # the disk just said full: unknown until the next poll
        self._hold(manifest, manifest.total_size, started=False, progress=0)

    def cancel(self, rid: str) -> None:
        """The release is no longer wanted (superseded, removed): it waits no more."""
        self._pending.pop(rid, None)
        self._stalled.pop(rid, None)
        self._unpacking.pop(rid, None)
        self.waits.drop(rid)

    # --- views -------------------------------------------------------------------------------

    def waiting(self, rid: str) -> bool:
        return rid in self.waits

    def error(self, rid: str) -> str | None:
        return self.waits.error(rid)

    # --- the watch ---------------------------------------------------------------------------

    def _hold(self, manifest: Manifest, need: int, *, started: bool, progress: int) -> None:
        rid = manifest.release_id
        if self.waits.hold(rid, need, self.driver.now(), started=started, progress=progress):
            detail = describe(need + self.waits.margin, self.waits.free)
            self.counters["space.full"] += 1
            log.warning(
                "%s %s: %s on %s; %s until there is room",
                manifest.name,
                manifest.version,
                detail,
                self.path,
                "paused" if started else "not fetched",
            )
            self._emit(manifest, "disk full", detail)
        if self._watcher is None:
            self._watcher = self._spawn(self._watch())

    async def _watch(self) -> None:
        try:
            while len(self.waits) and not self.driver.closed:
                await asyncio.sleep(self.interval)
                await self.poll()
        finally:
            self._watcher = None

    async def poll(self) -> None:
        """One look at free space (the watch runs it every `interval` while anything waits):
        start or resume what fits now."""
        self._prune()
        if not len(self.waits):
            return
        free = await self._probe()
        if free is None or self.driver.closed:
            return
        for w in self.waits.ready(free, self.driver.now()):
            await self._resume(w, free)

    def _prune(self) -> None:
        """Stalled fetches that ended meanwhile (completed, stopped) wait no more."""
        for rid, fetch in list(self._stalled.items()):
            if fetch.closed or self.driver.fetches.get(rid) is not fetch:
                self.cancel(rid)
        self.waits.forget_except([*self.driver.fetches, *self._pending, *self._unpacking])

    async def _resume(self, w: Wait, free: int) -> None:
        then = self._unpacking.pop(w.rid, None)
        if then is not None:
            self.counters["space.resumed"] += 1
            then()
            return
        pending = self._pending.pop(w.rid, None)
        if pending is not None:
            manifest, missing = pending
            # Chunks may have arrived meanwhile (shared with another release).
            missing = await asyncio.to_thread(self.driver.store.missing, missing)
            if self.driver.closed or w.rid in self.driver.fetches:
                return
            self.counters["space.resumed"] += 1
            log.info("%s %s: %s MiB free; fetching", manifest.name, manifest.version, mib(free))
            self._emit(manifest, "downloading", "")
            self.driver.start(manifest, missing)
            return
        fetch = self._stalled.pop(w.rid, None)
        if fetch is None or fetch.closed or self.driver.fetches.get(w.rid) is not fetch:
            return
        self.counters["space.resumed"] += 1
        log.info("%s %s: %s MiB free; fetching again", fetch.manifest.name, fetch.manifest.version, mib(free))
        self.driver.retry_now(fetch)

    async def _probe(self) -> int | None:
        """Free bytes of the data dir, or None when unknown: statvfs failed, did not answer
        within the timeout, or an earlier one still hangs (never two in flight)."""
        if self._probing is not None:
            self.counters["space.probe_busy"] += 1
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._probing = fut

        def done(result: object) -> None:
            self._probing = None
            if not fut.done():
                fut.set_result(result)

        def run() -> None:
            result: object
            try:
                result = self.free_space(self.path)
            except Exception as e:  # handed to the loop: reported there
                result = e
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(done, result)

        # A daemon thread of its own: a hung statvfs must not hold a shared worker, nor exit.
        threading.Thread(target=run, name="meshd-statvfs", daemon=True).start()
        try:
            result = await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except TimeoutError:
            self.counters["space.probe_timeouts"] += 1
            log.warning(
                "free space of %s: no answer within %.0fs (hung file system?)", self.path, self.timeout
            )
            return None
        if isinstance(result, Exception):
            self.counters["space.probe_errors"] += 1
            log.warning("free space of %s: %s", self.path, result)
            return None
        return int(result)


__all__ = [
    "FreeSpace",
    "SpaceGate",
    "SpaceWaits",
    "Wait",
    "describe",
    "space_needed",
    "statvfs_free",
]
