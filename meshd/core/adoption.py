"""Sans-IO release adoption policy: which announced release to look at, adopt, or leave alone.

The shell (meshd.release.service) tells it what members announce, what became of each manifest
fetch, and the verdict of parsing and signature checks (those need msgspec and nacl and stay in
the shell). The policy answers with decisions and keeps the retry timers. `now` is passed to
every entry point that reads the clock; nothing here does I/O.

Rules (each has a test in tests/unit/test_adoption.py):

| rule            | when                                       | decision                          |
|-----------------|--------------------------------------------|-----------------------------------|
| one at a time   | the manifest is being fetched already      | BUSY                              |
| ignored         | judged not for us before (targeting,       | IGNORED, for good                 |
|                 | older, conflicting version)                |                                   |
| known           | a release id we hold starts with the rid16 | KNOWN                             |
| back off        | its fetch failed (DISCOVER_RETRY) or it    | BACKING_OFF until the retry time  |
|                 | was refused (REJECT_RETRY) recently        |                                   |
| nothing yet     | the announcer has no chunk of it           | NOTHING_YET (its next update has) |
| discover        | otherwise                                  | FETCH_MANIFEST                    |
| targeting       | manifest.matches(site, tags) is false      | NOT_TARGETED (ignored)            |
| newer only      | not published after the current release    | OLDER (ignored)                   |
| one content per | another held release has the same name and | CONFLICT (ignored)                |
| version         | version                                    |                                   |

A failed fetch is not retried by the policy itself: today the shell asks again on the next
member event that announces the release. `next_deadline()` says when the earliest back-off ends,
so that a timer can drive the retry instead.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from typing import Protocol

REJECT_RETRY = 30.0  # a manifest that failed to verify (or to be stored) is asked for again after this
DISCOVER_RETRY = 3.0  # ... or this, when the peer simply did not answer


class Release(Protocol):
    """What the policy needs from a manifest."""

    @property
    def release_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def created(self) -> str: ...  # ISO 8601 UTC ("2026-01-31T12:00:00Z"): sorts as text
    def matches(self, site: str, tags: Mapping[str, str]) -> bool: ...


class Discovery(enum.Enum):
    """What to do about an announced release."""

    FETCH_MANIFEST = "fetch_manifest"
    BUSY = "busy"
    IGNORED = "ignored"
    KNOWN = "known"
    BACKING_OFF = "backing_off"
    NOTHING_YET = "nothing_yet"


class Verdict(enum.Enum):
    """The judgement of a verified manifest."""

    ADOPT = "adopt"
    NOT_TARGETED = "not_targeted"
    OLDER = "older"
    CONFLICT = "conflict"


def natural_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural version order: digit runs compare as numbers ("1.10" after "1.9")."""
    parts = re.split(r"(\d+)", version, flags=re.ASCII)
    return tuple((0, int(p)) if p.isascii() and p.isdigit() else (1, p) for p in parts if p)


def publish_order(r: Release) -> tuple[str, tuple[tuple[int, int | str], ...]]:
    """Sort key of releases of one name: creation time, then natural version order."""
    return (r.created, natural_key(r.version))


def newer(a: Release, b: Release) -> bool:
    """Whether `a` was published after `b` (creation time, then natural version order)."""
    return publish_order(a) > publish_order(b)


class AdoptionPolicy:
    """Decides, for one node, which announced releases to fetch and which to adopt."""

    def __init__(self, site: str, tags: Mapping[str, str]) -> None:
        self.site = site
        self.tags = dict(tags)
        self.discovering: set[str] = set()  # rid16 whose manifest is being fetched
        self.ignored: dict[str, str] = {}  # rid16 -> why (not targeted, older, conflict)
        self.retry_at: dict[str, float] = {}  # rid16 -> not asked for again before this

    # --- discovery ---------------------------------------------------------------------------

    def announced(self, rid16: str, have: int, now: float, *, known: bool) -> Discovery:
        """A member announces `rid16` holding `have` chunks; `known`: we hold a release with
        that prefix. FETCH_MANIFEST marks it as being discovered until `discovered()`."""
        if rid16 in self.discovering:
            return Discovery.BUSY
        if rid16 in self.ignored:
            return Discovery.IGNORED
        if known:
            return Discovery.KNOWN
        if self.retry_at.get(rid16, 0.0) > now:
            return Discovery.BACKING_OFF
        if have == 0:
            return Discovery.NOTHING_YET  # its manifest comes with its next update
        self.discovering.add(rid16)
        return Discovery.FETCH_MANIFEST

    def unanswered(self, rid16: str, now: float) -> None:
        """The peer did not serve the manifest (error, timeout, 404)."""
        self.retry_at[rid16] = now + DISCOVER_RETRY

    def refused(self, rid16: str, now: float) -> None:
        """The manifest was malformed, for another release, badly signed, or not storable."""
        self.retry_at[rid16] = now + REJECT_RETRY

    def discovered(self, rid16: str) -> None:
        """The discovery of `rid16` is over, whatever came of it."""
        self.discovering.discard(rid16)

    # --- judgement -----------------------------------------------------------------------------

    def judge(
        self, rid16: str, manifest: Release, current: Release | None, held: Iterable[Release]
    ) -> Verdict:
        """A verified manifest: adopt it, or ignore `rid16` for good (with the reason kept).

        `current` is the installed current release of its name, `held` every release we hold."""
        verdict = self.activation(manifest, current)
        if verdict is Verdict.NOT_TARGETED:
            self.ignored[rid16] = "not targeted at this node"
        elif verdict is Verdict.OLDER:
            assert current is not None
            self.ignored[rid16] = f"not newer than current {current.version}"
        elif any(
            m.name == manifest.name and m.version == manifest.version and m.release_id != manifest.release_id
            for m in held
        ):
            verdict = Verdict.CONFLICT
            self.ignored[rid16] = "version already installed with other content"
        return verdict

    def activation(self, manifest: Release, current: Release | None) -> Verdict:
        """Whether a complete release should become current: targeted here and newer."""
        if not manifest.matches(self.site, self.tags):
            return Verdict.NOT_TARGETED
        if current is not None and not newer(manifest, current):
            return Verdict.OLDER
        return Verdict.ADOPT

    # --- timers --------------------------------------------------------------------------------

    def next_deadline(self, now: float) -> float | None:
        """When the earliest back-off still running ends (None: none is); ended ones are dropped."""
        for rid16 in [r for r, at in self.retry_at.items() if at <= now]:
            del self.retry_at[rid16]
        return min(self.retry_at.values(), default=None)
