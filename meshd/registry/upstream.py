"""The upstream registry, as the pull-through reads it: blobs and manifests by digest streamed to
the caller (who hashes them), manifests by tag whole. Anonymous bearer tokens (Docker Hub's
`WWW-Authenticate: Bearer realm=...`) are fetched when asked for; nothing else is sent."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from meshd.errors import MeshError
from meshd.net.body import BodyTooLarge, BodyTruncated, read_bounded
from meshd.registry.rules import MANIFEST_TYPES, MAX_MANIFEST_BYTES

log = logging.getLogger("meshd.registry.upstream")
_READ = 256 * 1024
MAX_TOKEN_BYTES = 64 * 1024
MANIFEST_ACCEPT = ", ".join(sorted(MANIFEST_TYPES))
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


class UpstreamError(MeshError):
    """The upstream did not give what was asked (an error status, too big). `final`: asking
    again would get the same answer (404, 401, 403, too big)."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


@dataclass(frozen=True)
class TagAnswer:
    body: bytes
    media_type: str
    digest: str  # upstream's Docker-Content-Digest ("" if none); the body's, once checked


class Upstream:
    """One upstream registry base URL, read over a shared session."""

    def __init__(
        self, base: str, session: Callable[[], aiohttp.ClientSession], timeout: float = 30.0
    ) -> None:
        self.base = base.rstrip("/")
        self._session = session
        self.timeout = timeout
        self._tokens: dict[str, str] = {}  # scope -> bearer token

    async def _get(self, path: str, repo: str, accept: str | None) -> aiohttp.ClientResponse:
        headers = {"Accept": accept} if accept else {}
        timeout = aiohttp.ClientTimeout(sock_connect=self.timeout, sock_read=self.timeout)
        url = self.base + path
        for attempt in range(2):
            token = self._tokens.get(repo)
            if token:
                headers["Authorization"] = f"Bearer {token}"
            resp = await self._session().get(url, headers=headers, timeout=timeout, allow_redirects=True)
            if resp.status == 401 and attempt == 0:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.release()
                if not challenge.lower().startswith("bearer "):
                    raise UpstreamError(f"{url}: 401 without a bearer challenge")
                self._tokens[repo] = await self._token(challenge, repo)
                continue
            return resp
        raise UpstreamError(f"{url}: still 401 with a token")

    async def _token(self, challenge: str, repo: str) -> str:
        fields = dict(_CHALLENGE_RE.findall(challenge))
        realm = fields.get("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise UpstreamError(f"bearer challenge without a usable realm: {challenge[:200]!r}")
        params = {"scope": fields.get("scope") or f"repository:{repo}:pull"}
        if "service" in fields:
            params["service"] = fields["service"]
        async with self._session().get(
            realm, params=params, timeout=aiohttp.ClientTimeout(total=self.timeout)
        ) as resp:
            if resp.status != 200:
                raise UpstreamError(f"token endpoint answered {resp.status}")
            try:
                doc = await resp.json(content_type=None)
            except ValueError:
                raise UpstreamError("token endpoint answer is not JSON") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise UpstreamError("token endpoint gave no token")
        return token

    async def stream(
        self, kind: str, repo: str, digest: str, limit: int, on_block: Callable[[bytes], Awaitable[None]]
    ) -> int:
        """GET /v2/<repo>/<kind>/<digest> into `on_block`; the bytes read. UpstreamError,
        aiohttp errors."""
        path = f"/v2/{quote(repo, safe='/')}/{kind}/{digest}"
        resp = await self._get(path, repo, MANIFEST_ACCEPT if kind == "manifests" else None)
        async with resp:
            if resp.status != 200:
                raise UpstreamError(f"{self.base}{path}: {resp.status}", resp.status in (401, 403, 404))
            if resp.content_length is not None and resp.content_length > limit:
                raise UpstreamError(f"{self.base}{path}: {resp.content_length} bytes, over {limit}", True)
            total = 0
            while block := await resp.content.read(_READ):
                total += len(block)
                if total > limit:
                    raise UpstreamError(f"{self.base}{path}: over {limit} bytes", True)
                await on_block(block)
            return total

    async def manifest_by_tag(self, repo: str, tag: str, accept: str) -> TagAnswer | None:
        """The manifest a tag points at upstream (None: 404). UpstreamError, aiohttp errors."""
        path = f"/v2/{quote(repo, safe='/')}/manifests/{quote(tag, safe='')}"
        resp = await self._get(path, repo, accept or MANIFEST_ACCEPT)
        async with resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise UpstreamError(f"{self.base}{path}: {resp.status}")
            try:
                body = await read_bounded(resp.content, resp.content_length, MAX_MANIFEST_BYTES)
            except (BodyTooLarge, BodyTruncated) as e:
                raise UpstreamError(f"{self.base}{path}: {e}") from None
            media_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
            return TagAnswer(body, media_type, resp.headers.get("Docker-Content-Digest", ""))


__all__ = ["TagAnswer", "Upstream", "UpstreamError"]
