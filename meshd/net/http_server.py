"""Run an aiohttp application on host:port: the peer app and the operator API both use it.

With a Guard, the server is created with loop.create_server around aiohttp's request handler,
so every connection passes the guard's caps and deadlines (meshd.net.guard).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from meshd.net.guard import Guard


class HttpServer:
    def __init__(
        self,
        app: web.Application,
        backlog: int = 128,
        shutdown_timeout: float = 1.0,
        guard: Guard | None = None,
    ) -> None:
        self.app = app
        self.backlog = backlog
        self.shutdown_timeout = shutdown_timeout
        self.guard = guard
        self.bound: tuple[str, int] | None = None  # the address actually bound (port 0 resolved)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        if self.guard is not None:
            # Outermost: the header deadline is off while a handler runs, whatever it awaits.
            self.app.middlewares.insert(0, self.guard.middleware)
        # Guarded, a refused request's body is not drained ("lingering close"): the connection goes.
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.shutdown_timeout,
            lingering_time=0.0 if self.guard is not None else 10.0,  # 10 s: aiohttp's default
        )
        await self._runner.setup()
        try:
            if self.guard is None:
                site = web.TCPSite(self._runner, host, port, backlog=self.backlog)
                await site.start()
                server = getattr(site, "_server", None)
            else:
                handler = self._runner.server
                assert handler is not None
                loop = asyncio.get_running_loop()
                server = await loop.create_server(
                    self.guard.protocol_factory(handler), host, port, backlog=self.backlog, reuse_address=True
                )
                self._server = server
                self.guard.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        sockets = getattr(server, "sockets", None) or []
        self.bound = sockets[0].getsockname()[:2] if sockets else (host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # stop accepting; open connections are closed by the runner
        if self.guard is not None:
            await self.guard.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
