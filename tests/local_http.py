"""An aiohttp application served on 127.0.0.1 for the length of a block (tests' own servers:
a fake peer, a plain origin, an HTTP check target)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[int]:
    """Run `app` on 127.0.0.1 at a free port; yields the port, cleans up on the way out."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
