"""Manifest intake: an announced release becomes a verified manifest the policy has judged.

When a member announces a release id this node does not hold, and the adoption policy
(meshd.core.adoption) says to look at it, the intake GETs the manifest from that member, checks
that it is well formed and for the announced id, verifies its signature against the trusted
publisher keys (here, in the shell: nacl), and lets the policy judge it (targeting, newer than
the current release of its name, version taken). What passes is handed to `adopt`; what does
not is counted, logged and remembered by the policy (ignored for good, or backed off).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

import aiohttp

from meshd.core.adoption import AdoptionPolicy, Discovery, Verdict
from meshd.core.counters import Counters
from meshd.errors import DecodeError, IntegrityError
from meshd.release.announce import Announce, Member
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
        held: Callable[[], Mapping[str, Manifest]],
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
        self._held = held
        self._current = current
        self._adopt = adopt
        self._emit = emit
        self._spawn = spawn
        self.now = now
        self._closed = closed

    def _known(self, rid16: str) -> bool:
        return any(rid.startswith(rid16) for rid in self._held())

    def announced(self, entry: Announce, mem: Member) -> None:
        """A member announces a release: fetch its manifest when the policy says so."""
        # A failed discovery is asked for again only here, on a member event after its back-off
        # (policy.next_deadline() says when that is, for a timer to drive it one day).
        decision = self.policy.announced(entry.rid16, entry.have, self.now(), known=self._known(entry.rid16))
        if decision is Discovery.FETCH_MANIFEST:
            self._spawn(self._discover(entry, mem))

    async def _discover(self, entry: Announce, mem: Member) -> None:
        rid16 = entry.rid16
        try:
            try:
                doc = await self.client.manifest(mem.addr, rid16, to=mem.node_id)
            except (PeerProtocolError, aiohttp.ClientError, TimeoutError, OSError) as e:
                self.counters.inc("discover.errors")
                log.debug("manifest %s from %s: %s", rid16, mem.name, e)
                self.policy.unanswered(rid16, self.now())
                return
            if doc is None:
                self.policy.unanswered(rid16, self.now())
                return
            manifest = self.check(doc, rid16, mem.name)
            if manifest is None or self._closed() or manifest.release_id in self._held():
                return
            await self._adopt(manifest)
        finally:
            self.policy.discovered(rid16)

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
        verdict = self.policy.judge(rid16, manifest, self._current(manifest.name), self._held().values())
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
