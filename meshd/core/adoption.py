"""Sans-IO release adoption policy: which announced release to look at, adopt, or leave alone.

The shell (meshd.release.intake and .service) tells it what members offer, what became of each
manifest fetch, and the verdict of parsing and signature checks (those need msgspec and nacl and
stay in the shell). The policy answers with decisions and keeps the retry timers. `now` and the
random source are passed in; nothing here does I/O or reads a clock.

Order. Releases of one name are ordered by `release_order`: the signed manifest's `seq` (the
publisher takes one above every seq it has seen for that name), then the natural order of the
version, then the release id. No wall clock takes part: a gateway whose clock is years off
publishes releases that order exactly like anyone else's.

Rules (each has a test in tests/unit/test_adoption.py):

| rule            | when                                       | decision                          |
|-----------------|--------------------------------------------|-----------------------------------|
| newest only     | another offer of the name orders after it, | not considered (pick() skips it)  |
|                 | or we hold a release of the name that does |                                   |
| one at a time   | the manifest is being fetched already      | BUSY                              |
| ignored         | judged not for us before (targeting,       | IGNORED, for good                 |
|                 | older, conflicting version)                |                                   |
| known           | a release id we hold starts with the rid16 | KNOWN                             |
| back off        | its fetch failed or was refused recently:  | BACKING_OFF until the retry time  |
|                 | exponential, jittered, capped              |                                   |
| nothing yet     | the announcer has no chunk of it           | NOTHING_YET (its next update has) |
| discover        | otherwise                                  | FETCH_MANIFEST                    |
| targeting       | manifest.matches(site, tags) is false      | NOT_TARGETED (ignored)            |
| newer only      | not after the current or a held release    | OLDER (ignored)                   |
| one content per | another held release has the same name and | CONFLICT (ignored)                |
| version         | version                                    |                                   |

A newest offer whose manifest nobody serves (FALLBACK_AFTER failures in a row) no longer holds
back the next one: a key holder announcing a release that does not exist cannot freeze a name.
`next_deadline()` says when the earliest back-off ends; the shell arms a timer on it, so a
failed first attempt converges in a quiet mesh too.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

DISCOVER_RETRY = 2.0  # first back-off after a manifest fetch failed, doubled per failure
DISCOVER_RETRY_MAX = 60.0
REJECT_RETRY = 30.0  # a manifest that failed to verify (or to be stored) is asked for again after this
JITTER = 0.2  # back-offs are spread by +-20%, so nodes that failed together do not retry together
FALLBACK_AFTER = 3  # failures of the newest offer before the next newest may be fetched

Version = tuple[tuple[int, int | str], ...]
OrderKey = tuple[int, Version, str]


class Release(Protocol):
    """What the policy needs from a manifest."""

    @property
    def release_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def seq(self) -> int: ...
    def matches(self, site: str, tags: Mapping[str, str]) -> bool: ...


@dataclass(frozen=True)
class Offer:
    """A release some member announces: enough to order it before its manifest is fetched."""

    name: str
    version: str
    seq: int
    rid16: str
    have: int  # the most chunks any announcer holds

    @property
    def order(self) -> OrderKey:
        return (self.seq, natural_key(self.version), self.rid16)


class Discovery(enum.Enum):
    """What to do about an announced release."""

    FETCH_MANIFEST = "fetch_manifest"
    BUSY = "busy"
    IGNORED = "ignored"
    KNOWN = "known"
    BACKING_OFF = "backing_off"
    NOTHING_YET = "nothing_yet"


R = TypeVar("R", bound=Release)


class Verdict(enum.Enum):
    """The judgement of a verified manifest."""

    ADOPT = "adopt"
    NOT_TARGETED = "not_targeted"
    OLDER = "older"
    CONFLICT = "conflict"


def natural_key(version: str) -> Version:
    """Natural version order: digit runs compare as numbers ("1.10" after "1.9")."""
    parts = re.split(r"(\d+)", version, flags=re.ASCII)
    return tuple((0, int(p)) if p.isascii() and p.isdigit() else (1, p) for p in parts if p)


def release_order(r: Release) -> OrderKey:
    """Sort key of releases of one name: seq, then natural version order, then release id."""
    return (r.seq, natural_key(r.version), r.release_id[:16])


def newer(a: Release, b: Release) -> bool:
    """Whether `a` orders after `b` (a release is not newer than itself)."""
    return release_order(a) > release_order(b)


def newest(releases: Iterable[R]) -> R | None:
    return max(releases, key=release_order, default=None)


class AdoptionPolicy:
    """Decides, for one node, which announced releases to fetch and which to adopt."""

    def __init__(self, site: str, tags: Mapping[str, str], rng: random.Random | None = None) -> None:
        self.site = site
        self.tags = dict(tags)
        self.rng = rng or random.Random()
        self.discovering: set[str] = set()  # rid16 whose manifest is being fetched
        self.ignored: dict[str, str] = {}  # rid16 -> why (not targeted, older, conflict)
        self.retry_at: dict[str, float] = {}  # rid16 -> not asked for again before this
        self.failures: dict[str, int] = {}  # rid16 -> manifest fetches failed in a row

    # --- discovery ---------------------------------------------------------------------------

    def pick(
        self, offers: Iterable[Offer], held: OrderKey | None, now: float, known: Container[str] = ()
    ) -> Offer | None:
        """Of the offers of one name, the one to look at now (None: wait).

        `held` orders the newest release of that name this node holds (current, installed or
        being fetched), `known` the rid16 of every release it holds. Only an offer after `held`
        counts, and of those the newest, unless that one has failed FALLBACK_AFTER times in a
        row: then the next is tried while it backs off. An offer already held is passed over:
        its announced seq was not its manifest's (a liar, or a stale entry). The offer returned
        is marked as being discovered (announced() said FETCH_MANIFEST for it)."""
        for offer in sorted(offers, key=lambda o: o.order, reverse=True):
            if held is not None and offer.order <= held:
                return None
            decision = self.announced(offer.rid16, offer.have, now, known=offer.rid16 in known)
            if decision is Discovery.FETCH_MANIFEST:
                return offer
            if decision in (Discovery.IGNORED, Discovery.KNOWN):
                continue
            if decision is Discovery.BACKING_OFF and self.failures.get(offer.rid16, 0) >= FALLBACK_AFTER:
                continue
            return None  # busy, backing off, nothing yet: wait for this one
        return None

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

    def _back_off(self, rid16: str, now: float, delay: float) -> None:
        self.retry_at[rid16] = now + delay * self.rng.uniform(1.0 - JITTER, 1.0 + JITTER)

    def unanswered(self, rid16: str, now: float) -> None:
        """The peer did not serve the manifest (error, timeout, 404)."""
        n = self.failures[rid16] = self.failures.get(rid16, 0) + 1
        self._back_off(rid16, now, min(DISCOVER_RETRY_MAX, DISCOVER_RETRY * 2 ** (n - 1)))

    def refused(self, rid16: str, now: float) -> None:
        """The manifest was malformed, for another release, badly signed, or not storable."""
        self.failures[rid16] = max(self.failures.get(rid16, 0) + 1, FALLBACK_AFTER)
        self._back_off(rid16, now, REJECT_RETRY)

    def discovered(self, rid16: str) -> None:
        """The discovery of `rid16` is over, whatever came of it."""
        self.discovering.discard(rid16)

    # --- judgement -----------------------------------------------------------------------------

    def judge(
        self,
        rid16: str,
        manifest: Release,
        current: Release | None,
        held: Iterable[Release],
        ahead: Release | None = None,
    ) -> Verdict:
        """A verified manifest: adopt it, or ignore `rid16` for good (with the reason kept).

        `current` is the installed current release of its name, `held` every release we hold,
        `ahead` the newest of its name we hold and would install (targeted here, trusted)."""
        self.failures.pop(rid16, None)
        self.retry_at.pop(rid16, None)
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
        elif ahead is not None and ahead.release_id != manifest.release_id and newer(ahead, manifest):
            verdict = Verdict.OLDER
            self.ignored[rid16] = f"not newer than held {ahead.version}"
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
