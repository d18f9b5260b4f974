"""Run an aiohttp application on host:port: the peer app and the operator API both use it."""

from __future__ import annotations

from aiohttp import web


class HttpServer:
    def __init__(self, app: web.Application, backlog: int = 128, shutdown_timeout: float = 1.0) -> None:
        self.app = app
        self.backlog = backlog
        self.shutdown_timeout = shutdown_timeout
        self.bound: tuple[str, int] | None = None  # the address actually bound (port 0 resolved)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=self.shutdown_timeout
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=self.backlog)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.bound = sockets[0].getsockname()[:2] if sockets else (host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
