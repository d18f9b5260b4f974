"""The registry's HTTP shell: an aiohttp app answering the OCI Distribution read routes
(meshd/registry/rules.py) from the image catalog (meshd/registry/catalog.py).

Only GET and HEAD; no request body is ever read; the connection guard of the peer port bounds
connections and header time; aiohttp's own limits bound header sizes. A miss answers 404 at once
(nothing waits on the mesh), so containerd goes on to the next host: the upstream registry.
Every manifest and blob is checked against its digest before a byte of it is sent (once per
file version: VerifiedFiles); a file that fails is counted, never served, and the next source
is tried.

With a pull-through (meshd/registry/pullthrough.py), a digest no source holds is fetched into
the site cache first (from a site peer or upstream), then served like any other. A tag that no
signed release covers is still a quick 404 (containerd 1.6 then resolves it at the next host of
its hosts.toml, the upstream, and asks this mirror again for the blobs by digest), unless
registry_pass_tags is set: then the upstream's answer is passed through (its bytes cached by
digest, the tag never).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import IO

import orjson
from aiohttp import web

from meshd.errors import IntegrityError
from meshd.metrics import Exposition
from meshd.net.guard import Guard, GuardLimits
from meshd.net.http_server import HttpServer
from meshd.registry.catalog import BlobFile, BlobSource, ReleaseImages, VerifiedFiles
from meshd.registry.image import parse_manifest
from meshd.registry.pullthrough import SOURCES, PullThrough
from meshd.registry.rules import (
    API_VERSION_HEADER,
    MAX_MANIFEST_BYTES,
    OCTET_STREAM,
    ErrorCode,
    Kind,
    RegistryError,
    accepts,
    parse_path,
    parse_range,
    parse_reference,
)

log = logging.getLogger("meshd.registry")
_SEND = 256 * 1024
RESULTS = ("hit", "miss", "error")
KINDS = ("manifest", "blob")
# Header size bounds (the API's): aiohttp refuses longer request lines and fields with 400.
MAX_LINE = 8190
MAX_FIELD = 8190


class CorruptContent(RegistryError):
    """Every stored copy of a digest failed its check: a 404 (containerd goes upstream), counted."""


class _Found:
    """An open, verified file of a blob (the one served: checked by descriptor, not by path)."""

    def __init__(self, f: IO[bytes], size: int, source: str = "release") -> None:
        self.file, self.size, self.source = f, size, source


class Registry:
    """The registry's state: where blobs come from, what was verified, what was served."""

    def __init__(
        self,
        images: ReleaseImages,
        extra_sources: Sequence[BlobSource] = (),
        pull: PullThrough | None = None,
    ) -> None:
        self.images = images
        self.pull = pull
        self.sources: list[tuple[str, BlobSource]] = [("release", images)]
        self.sources += [("cache", s) for s in extra_sources]
        if pull is not None:
            self.sources.append(("cache", pull.cache))
        self.verified = VerifiedFiles()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.hits: Counter[tuple[str, str]] = Counter()  # (kind, source) of what was served
        self.served_bytes = 0

    # --- lookups (blocking parts in a thread) -----------------------------------------------

    def _candidates(self, digest: str) -> list[tuple[str, BlobFile]]:
        return [(label, bf) for label, s in self.sources if (bf := s.open(digest)) is not None]

    def _open_verified(self, digest: str, candidates: list[tuple[str, BlobFile]]) -> _Found | None:
        """The first candidate whose content is `digest` (blocking: hashes a new file)."""
        for label, bf in candidates:
            try:
                f = bf.path.open("rb")
            except OSError as e:
                log.warning("blob %s: cannot open %s: %s", digest[:19], bf.path, e.strerror or e)
                continue
            try:
                st = os.fstat(f.fileno())
                key = self.verified.key(bf.path, st)
                if st.st_size == bf.size and (
                    self.verified.known(key, digest) or self.verified.check(key, digest, f)
                ):
                    return _Found(f, st.st_size, label)
                if st.st_size != bf.size:
                    self.verified.mismatches += 1
                log.warning("blob %s: %s does not match its digest; not served", digest[:19], bf.path)
            except OSError as e:
                log.warning("blob %s: cannot read %s: %s", digest[:19], bf.path, e.strerror or e)
            f.close()
        return None

    async def find(self, digest: str, name: str = "", ns: str = "", kind: str = "blobs") -> _Found | None:
        """A verified file of `digest`; on a miss, the pull-through (if any) fetches it first."""
        candidates = self._candidates(digest)
        fetched = ""
        if not candidates and self.pull is not None:
            fetched = await self.pull.fetch(digest, name, ns, kind) or ""
            if fetched in ("peer", "upstream"):
                self.verified.mark(self.pull.cache.path(digest), digest)  # hashed while written
            candidates = self._candidates(digest)
        if not candidates:
            return None
        before = self.verified.mismatches
        found = await asyncio.to_thread(self._open_verified, digest, candidates)
        if found is None and self.verified.mismatches > before:
            raise CorruptContent(
                ErrorCode.BLOB_UNKNOWN, "stored copy failed its digest check", {"digest": digest}
            )
        if found is not None and fetched in ("peer", "upstream"):
            found.source = fetched
        return found

    # --- handlers ---------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        kind = ""
        try:
            route = parse_path(request.raw_path.split("?", 1)[0])
            kind = route.kind.value if route.kind in (Kind.MANIFEST, Kind.BLOB) else ""
            if request.method not in ("GET", "HEAD"):
                raise RegistryError(ErrorCode.UNSUPPORTED, "this registry is read-only")
            if route.kind is Kind.BASE:
                return web.Response(body=b"{}", content_type="application/json", headers=[API_VERSION_HEADER])
            if route.kind is Kind.TAGS:
                return self._tags(route.name)
            if route.kind is Kind.MANIFEST:
                resp, source = await self._manifest(request, route.name, route.reference)
            else:
                resp, source = await self._blob(request, route.name, route.reference)
            self._count(kind, "hit")
            self.hits[(kind, source)] += 1
            return resp
        except RegistryError as e:
            if request.method not in ("GET", "HEAD") and e.code is not ErrorCode.UNSUPPORTED:
                e = RegistryError(ErrorCode.UNSUPPORTED, "this registry is read-only")
            unknown = e.code in (ErrorCode.MANIFEST_UNKNOWN, ErrorCode.BLOB_UNKNOWN)
            if kind:
                self._count(kind, "miss" if unknown and not isinstance(e, CorruptContent) else "error")
            headers = [API_VERSION_HEADER]
            if e.code is ErrorCode.RANGE_INVALID and isinstance(e.detail, dict):
                headers.append(("Content-Range", f"bytes */{e.detail.get('size', 0)}"))
            return web.Response(
                status=e.code.status,
                body=e.body() if request.method != "HEAD" else None,
                content_type="application/json",
                headers=headers,
            )

    def _count(self, kind: str, result: str) -> None:
        self.requests[(kind, result)] += 1

    def _tags(self, name: str) -> web.Response:
        tags = self.images.tags(name)
        if not tags:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, "no signed image release names this repository", name)
        body = orjson.dumps({"name": name, "tags": tags})
        return web.Response(body=body, content_type="application/json", headers=[API_VERSION_HEADER])

    async def _manifest(
        self, request: web.Request, name: str, reference: str
    ) -> tuple[web.StreamResponse, str]:
        ref = parse_reference(reference)
        media_type = ""
        ns = request.query.get("ns", "")
        if ref.tag is not None:
            resolved = self.images.resolve(name, ref.tag)
            if resolved is None and self.pull is not None and self.pull.pass_tags:
                passed = await self.pull.manifest_by_tag(
                    name, ref.tag, ns, ", ".join(request.headers.getall("Accept", []))
                )
                if passed is not None:
                    reply = await self._manifest_reply(request, passed.digest, passed.media_type, passed.body)
                    return reply, "upstream"
            if resolved is None:
                raise RegistryError(
                    ErrorCode.MANIFEST_UNKNOWN,
                    "tag not in a signed image release on this node",
                    {"name": name, "tag": ref.tag},
                )
            digest, media_type = resolved.descriptor.digest, resolved.descriptor.media_type
        else:
            assert ref.digest is not None
            digest = ref.digest
        found = await self.find(digest, name, ns, "manifests")
        if found is None:
            raise RegistryError(
                ErrorCode.MANIFEST_UNKNOWN, "manifest unknown", {"name": name, "digest": digest}
            )
        with found.file:
            if found.size > MAX_MANIFEST_BYTES:  # a layer asked for as a manifest: not one
                raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, "not a manifest", {"digest": digest})
            data = await asyncio.to_thread(found.file.read, found.size)
        try:
            doc = parse_manifest(data, f"manifest {digest}", media_type)
        except IntegrityError as e:  # a config or layer asked for as a manifest: not one
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, "not a manifest", {"digest": digest}) from e
        if not accepts(request.headers.getall("Accept", []), doc.media_type):
            raise RegistryError(
                ErrorCode.MANIFEST_UNKNOWN,
                f"manifest is {doc.media_type}, not an accepted type",
                {"digest": digest, "mediaType": doc.media_type},
            )
        return await self._manifest_reply(request, digest, doc.media_type, data), found.source

    async def _manifest_reply(
        self, request: web.Request, digest: str, media_type: str, data: bytes
    ) -> web.StreamResponse:
        headers = {
            "Docker-Content-Digest": digest,
            "Content-Type": media_type,
            API_VERSION_HEADER[0]: API_VERSION_HEADER[1],
        }
        if request.method == "HEAD":
            resp = web.StreamResponse(headers=headers)
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        self.served_bytes += len(data)
        return web.Response(body=data, headers=headers)

    async def _blob(self, request: web.Request, name: str, digest: str) -> tuple[web.StreamResponse, str]:
        found = await self.find(digest, name, request.query.get("ns", ""))
        if found is None:
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, "blob unknown to this node", {"digest": digest})
        with found.file:
            wanted = parse_range(request.headers.get("Range"), found.size)
            start, length = (wanted.start, wanted.length) if wanted else (0, found.size)
            resp = web.StreamResponse(status=206 if wanted else 200)
            resp.headers.update(
                {
                    "Docker-Content-Digest": digest,
                    "Content-Type": OCTET_STREAM,
                    "Accept-Ranges": "bytes",
                    API_VERSION_HEADER[0]: API_VERSION_HEADER[1],
                }
            )
            if wanted:
                resp.headers["Content-Range"] = wanted.content_range(found.size)
            resp.content_length = length
            await resp.prepare(request)
            if request.method == "GET":
                await self._send(resp, found.file, start, length)
            await resp.write_eof()
            return resp, found.source

    async def _send(self, resp: web.StreamResponse, f: IO[bytes], start: int, length: int) -> None:
        f.seek(start)
        left = length
        while left > 0:
            block = await asyncio.to_thread(f.read, min(_SEND, left))
            if not block:  # the file shrank under us: cut the answer short, never pad it
                raise ConnectionResetError("blob file shrank while served")
            await resp.write(block)
            left -= len(block)
            self.served_bytes += len(block)

    # --- app and metrics --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(handler_args={"max_line_size": MAX_LINE, "max_field_size": MAX_FIELD})
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def collect_metrics(self, out: Exposition) -> None:
        out.labelled(
            "meshd_registry_requests_total",
            "counter",
            "registry manifest and blob requests, by result (hit: served; miss: 404; error: refused)",
            [({"kind": k, "result": r}, self.requests[(k, r)]) for k in KINDS for r in RESULTS],
        )
        out.labelled(
            "meshd_registry_hits_total",
            "counter",
            "registry manifests and blobs served, by where they came from (release: a signed image "
            "release; cache: the pull-through cache; peer, upstream: fetched into it for this request)",
            [({"kind": k, "source": s}, self.hits[(k, s)]) for k in KINDS for s in SOURCES],
        )
        out.counter(
            "meshd_registry_served_bytes_total",
            "manifest and blob bytes the registry sent",
            self.served_bytes,
        )
        out.counter(
            "meshd_registry_digest_mismatches_total",
            "stored manifests and blobs that failed their digest check (never served)",
            self.verified.mismatches,
        )


class RegistryServer(HttpServer):
    def __init__(self, registry: Registry, limits: GuardLimits | None = None) -> None:
        super().__init__(registry.app(), guard=Guard(limits))


__all__ = ["CorruptContent", "Registry", "RegistryServer"]
