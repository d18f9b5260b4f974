"""Manifest intake: an announced release becomes a verified manifest the policy has judged.

Members' announcements are gathered by name (OfferIndex). For each name the adoption policy
(meshd.core.adoption) picks the newest release on offer that orders after what this node holds;
the intake GETs its manifest from a member holding it (another one on each retry), checks
that it is well formed and for the announced id, verifies its signature against the trusted
publisher keys (here, in the shell: nacl), and lets the policy judge it (targeting, newer than
the current release of its name, version taken). What passes is handed to `adopt`; what does
not is counted, logged and remembered by the policy (ignored for good, or backed off). A
back-off ends on a timer (`_arm`), not on the next member event: a quiet mesh converges too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

import aiohttp

from meshd.core.adoption import (
    AdoptionPolicy,
    Offer,
    OrderKey,
    Verdict,
    release_order,
)
from meshd.core.counters import Counters
from meshd.errors import DecodeError, IntegrityError
from meshd.release.announce import RID_PREFIX, Member, OfferIndex
from meshd.release.manifest import Manifest
from meshd.release.peer import PeerProtocolError
from meshd.release.peer_client import PeerFetcher

log = logging.getLogger("meshd.release")

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]
Emit = Callable[[Manifest, str, str], None]


class ManifestIntake:
    """Fetches, verifies and judges the manifests of releases members announce."""

    def __init__(
        self,
        *,
        site: str,
        trusted: Iterable[bytes],
        policy: AdoptionPolicy,
        client: PeerFetcher,
        counters: Counters,
        members: Mapping[str, Member],
        held: Callable[[], Mapping[str, Manifest]],
        newest_held: Callable[[str], Manifest | None],
        current: Callable[[str], Manifest | None],
        adopt: Callable[[Manifest], Awaitable[None]],
        emit: Emit,
        spawn: Spawn,
        now: Callable[[], float],
        closed: Callable[[], bool],
    ) -> None:
        self.site = site
        self.trusted = list(trusted)
        self.policy = policy
        self.client = client
        self.counters = counters
        self._members = members
        self.offers = OfferIndex()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._held = held
        self._newest_held = newest_held
        self._current = current
        self._adopt = adopt
        self._emit = emit
        self._spawn = spawn
        self.now = now
        self._closed = closed

    def _held_order(self, name: str) -> OrderKey | None:
        top = self._newest_held(name)
        return release_order(top) if top is not None else None

    def member_changed(self, mem: Member) -> None:
        """A member's announcements changed: look at the names whose offers did."""
        for name in self.offers.update(mem.name, mem.entries if mem.up else {}):
            self.consider(name)

    def reconsider(self) -> None:
        """Look at every offered name again (the retry timer, or a release finished here)."""
        for name in self.offers.names():
            self.consider(name)

    def consider(self, name: str) -> None:
        """Fetch the manifest of the newest release of `name` on offer, when the policy says so."""
        if self._closed():
            return
        now = self.now()
        known = {rid[:RID_PREFIX] for rid in self._held()}
        offer = self.policy.pick(self.offers.offers(name), self._held_order(name), now, known)
        if offer is None:  # (else it is marked as being discovered until _discover ends)
            self._arm(now)
            return
        holders = self.offers.holders(name, offer.rid16)
        if not holders:
            self.policy.discovered(offer.rid16)
            return
        # Another holder on each retry: one that cannot serve it does not hold it back.
        source = self._members.get(holders[self.policy.failures.get(offer.rid16, 0) % len(holders)])
        if source is None:
            self.policy.discovered(offer.rid16)
            return
        self._spawn(self._discover(offer, source))

    def _arm(self, now: float) -> None:
        """Keep a timer on the policy's earliest back-off: every retry runs on a timer."""
        at = self.policy.next_deadline(now)
        if at is None:
            return
        if self._timer is not None:
            if self._timer_at <= at and not self._timer.cancelled():
                return
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = at
        self._timer = loop.call_at(loop.time() + max(0.0, at - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.reconsider()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _discover(self, offer: Offer, mem: Member) -> None:
        rid16 = offer.rid16
        try:
            try:
                doc = await self.client.manifest(mem.addr, rid16, to=mem.node_id)
            except (PeerProtocolError, aiohttp.ClientError, TimeoutError, OSError) as e:
                self.counters.inc("discover.errors")
                log.info("manifest %s of %s from %s: %s; retrying on a timer", rid16, offer.name, mem.name, e)
                self.policy.unanswered(rid16, self.now())
                return
            if doc is None:
                self.policy.unanswered(rid16, self.now())
                return
            manifest = self.check(doc, rid16, mem.name)
            if manifest is None or self._closed() or manifest.release_id in self._held():
                return
            if (manifest.seq, manifest.version) != (offer.seq, offer.version):
                self.counters.inc("announce.mismatch")  # the signed manifest decides
            await self._adopt(manifest)
        finally:
            self.policy.discovered(rid16)
            if not self._closed():
                self._arm(self.now())
                self.consider(offer.name)

    def check(self, doc: bytes, rid16: str, source: str) -> Manifest | None:
        """Parse and verify a manifest a peer served, then let the policy judge it; None
        (counted) when it is not for us."""
        try:
            manifest = Manifest.from_bytes(doc)
        except DecodeError as e:
            self.counters.inc("manifests.invalid")
            log.warning("manifest %s from %s is malformed: %s", rid16, source, e)
            self.policy.refused(rid16, self.now())
            return None
        if not manifest.release_id.startswith(rid16):
            self.counters.inc("manifests.invalid")
            log.warning("%s served manifest %s for release %s", source, manifest.release_id[:16], rid16)
            self.policy.refused(rid16, self.now())
            return None
        try:
            manifest.verify(self.trusted)
        except IntegrityError as e:
            self.counters.inc("manifests.refused")
            log.warning("refusing release from %s: %s", source, e)
            self._emit(manifest, "refused", str(e))
            self.policy.refused(rid16, self.now())
            return None
        verdict = self.policy.judge(
            rid16,
            manifest,
            self._current(manifest.name),
            self._held().values(),
            self._newest_held(manifest.name),
        )
        if verdict is Verdict.NOT_TARGETED:
            self.counters.inc("releases.ignored")
            log.info(
                "release %s %s is not targeted at this node (site %s); ignored",
                manifest.name,
                manifest.version,
                self.site,
            )
            return None
        if verdict is Verdict.OLDER:
            self.counters.inc("releases.older")
            return None
        if verdict is Verdict.CONFLICT:
            self.counters.inc("releases.conflict")
            log.warning(
                "release %s %s (%s) conflicts with an installed one of the same version",
                manifest.name,
                manifest.version,
                rid16,
            )
            return None
        return manifest
