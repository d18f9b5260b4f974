"""The client side of the peer HTTP protocol (meshd.release.peer): manifests, bitmaps, pieces.

One aiohttp ClientSession per node; every answer is bounded in size and time and opened with the
cluster keyring, and every refusal is a counted drop (`fetch.drops.*`), never a crash.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
import orjson
from aiohttp import StreamReader

from meshd.core.counters import Counters
from meshd.errors import AuthError, DecodeError
from meshd.net.body import BodyTooLarge, BodyTruncated, ReceiveLowWater, read_bounded, read_bounded_into
from meshd.net.peer_auth import AUTH_HEADER, make_token
from meshd.release.chunker import MAX_SIZE
from meshd.release.peer import (
    BITMAP_PATH,
    CHUNKS_PATH,
    CIPHER_AES,
    MANIFEST_PATH,
    MAX_MANIFEST,
    OCTETS,
    STORED_OVERHEAD,
    PeerProtocolError,
    decode_piece,
    max_piece_reply,
)
from meshd.wire import Codec

T = TypeVar("T")
B = TypeVar("B", bytes, bytearray)


@dataclass
class FetchStats:
    sent_bytes: int = 0
    received_bytes: int = 0


class PeerFetcher:
    """The client side: one ClientSession; every call bounded in size and time."""

    def __init__(self, codec: Codec, counters: Counters) -> None:
        self.codec = codec
        self.counters = counters
        self.stats = FetchStats()
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=128, limit_per_host=8, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, headers={"User-Agent": "meshd-dist"}
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _count(self, key: str) -> None:
        self.counters[key] += 1

    async def _read(
        self, resp: aiohttp.ClientResponse, limit: int, on_data: Callable[[], None] | None = None
    ) -> bytes:
        """Whole body, at most `limit` bytes; PeerProtocolError when over it or cut short."""
        return await self._bounded(read_bounded, resp, limit, on_data)

    async def _read_into(
        self, resp: aiohttp.ClientResponse, limit: int, on_data: Callable[[], None] | None = None
    ) -> bytearray:
        """_read into one writable buffer: a piece, opened where it lies, its connection woken
        per RECEIVE_LOW_WATER bytes rather than per few segments."""
        conn = resp.connection
        low = ReceiveLowWater.on(conn.transport if conn is not None else None)
        if low is None:
            return await self._bounded(read_bounded_into, resp, limit, on_data)
        read = functools.partial(read_bounded_into, low_water=low)
        try:
            return await self._bounded(read, resp, limit, on_data)
        finally:
            low.reset()

    async def _bounded(
        self,
        read: Callable[[StreamReader, int | None, int, Callable[[], None] | None], Awaitable[B]],
        resp: aiohttp.ClientResponse,
        limit: int,
        on_data: Callable[[], None] | None,
    ) -> B:
        try:
            data = await read(resp.content, resp.content_length, limit, on_data)
        except BodyTooLarge as e:
            self._count("fetch.drops.oversized")
            raise PeerProtocolError(f"answer too big: {e}") from None
        except (BodyTruncated, aiohttp.ClientPayloadError) as e:
            self._count("fetch.drops.truncated")
            raise PeerProtocolError(f"truncated answer: {e}") from None
        self.stats.received_bytes += len(data)
        return data

    def _open(self, data: bytes, max_size: int) -> bytes:
        return self._opening(self.codec.open, data, max_size)

    def _open_view(self, data: bytearray, max_size: int) -> memoryview:
        return self._opening(self.codec.open_view, data, max_size)

    def _opening(self, how: Callable[[B, int], T], data: B, max_size: int) -> T:
        try:
            return how(data, max_size)
        except AuthError as e:
            self._count("fetch.drops.auth")
            raise PeerProtocolError(f"answer does not authenticate: {e}") from None
        except DecodeError as e:
            self._count("fetch.drops.decode")
            raise PeerProtocolError(f"bad answer envelope: {e}") from None

    async def _get(self, addr: str, path: str, limit: int, timeout: float, to: str) -> bytes | None:
        """Sealed GET to node `to`; the opened body, None on 404. PeerProtocolError / aiohttp errors."""
        headers = {AUTH_HEADER: make_token(self.codec, "GET", path, to=to)}
        async with self.session().get(
            f"http://{addr}{path}", headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                self._count("fetch.drops.status")
                raise PeerProtocolError(f"{addr} answered {resp.status} to GET {path}")
            data = await self._read(resp, limit + self.codec.overhead)
        return self._open(data, limit)

    # `to` is the peer's node id: what is sealed for it is good at that node only.

    async def manifest(self, addr: str, rid: str, timeout: float = 10.0, *, to: str = "") -> bytes | None:
        return await self._get(addr, MANIFEST_PATH.format(rid=rid), MAX_MANIFEST, timeout, to)

    async def bitmap(
        self, addr: str, rid: str, n_chunks: int, timeout: float = 5.0, *, to: str = ""
    ) -> bytes | None:
        return await self._get(addr, BITMAP_PATH.format(rid=rid), (n_chunks + 7) // 8, timeout, to)

    async def chunks(
        self,
        addr: str,
        ids: Sequence[str],
        sizes: Sequence[int],
        timeout: float,
        *,
        to: str = "",
        on_data: Callable[[], None] | None = None,
    ) -> list[memoryview | None]:
        """Stored forms of `ids` from a peer (None where it did not serve one), as views of
        one decrypted buffer. `timeout` bounds the whole exchange; `on_data` is called as the
        answer's bytes arrive."""
        ask: dict[str, object] = {"ids": list(ids)}
        if self.codec.aes:
            ask["cipher"] = CIPHER_AES  # twice SecretBox's speed here; answered in it if it can
        body = self.codec.seal(orjson.dumps(ask), to)
        limit = max_piece_reply(sizes, self.codec)
        async with self.session().post(
            f"http://{addr}{CHUNKS_PATH}",
            data=body,
            headers={
                "Content-Type": OCTETS,
                AUTH_HEADER: make_token(self.codec, "POST", CHUNKS_PATH, len(body), to=to),
            },
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            self.stats.sent_bytes += len(body)
            if resp.status != 200:
                self._count("fetch.drops.status")
                raise PeerProtocolError(f"{addr} answered {resp.status} to a chunk request")
            data = await self._read_into(resp, limit, on_data)
        piece = self._open_view(data, limit)
        try:
            return decode_piece(piece, len(ids))
        except PeerProtocolError:
            self._count("fetch.drops.malformed")
            raise

    async def origin_chunk(self, url: str, timeout: float) -> bytes | None:
        """A stored form from a plain HTTP origin (None on 404)."""
        async with self.session().get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                self._count("origin.drops.status")
                raise PeerProtocolError(f"origin answered {resp.status} for {url}")
            return await self._read(resp, MAX_SIZE + STORED_OVERHEAD)
