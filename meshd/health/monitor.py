"""HealthMonitor: runs the checks on their intervals, keeps their last results and answers the
built-in `health` query and the custom queries (query handlers)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from meshd.health.checks import (
    CheckResult,
    check_command,
    check_disk,
    check_http,
    check_load,
    check_loop_lag,
    check_memory,
    check_tcp,
)
from meshd.health.command import run_command
from meshd.health.loop_lag import LoopLagMonitor
from meshd.health.spec import (
    COMMAND,
    DISK,
    HANDLER_OUTPUT_LIMIT,
    HEALTH_ANSWER_LIMIT,
    HEALTH_QUERY,
    HTTP,
    LOAD,
    LOOP_LAG,
    MEMORY,
    RANK,
    TCP,
    CheckSpec,
    HandlerSpec,
    Status,
    worst,
)

log = logging.getLogger("meshd.health")


@dataclass
class _CheckState:
    spec: CheckSpec
    status: Status = "critical"
    output: str = "not run yet"
    updated: float = 0.0  # unix time of the last run, 0 before the first
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class HealthMonitor:
    """Runs the checks, keeps their last results, answers the health query and custom queries."""

    def __init__(
        self,
        checks: Sequence[CheckSpec],
        handlers: Mapping[str, HandlerSpec] | None = None,
        *,
        on_change: Callable[[Status], None] | None = None,
        on_check_change: Callable[[dict[str, Any]], None] | None = None,
        handler_concurrency: int = 4,
        lag: LoopLagMonitor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._states = {spec.name: _CheckState(spec) for spec in checks}
        self.handlers = dict(handlers or {})
        self.on_change = on_change
        self.on_check_change = on_check_change
        self.lag = lag or LoopLagMonitor()
        self._clock = clock
        self._summary: Status = self._compute_summary()
        self._handler_slots = asyncio.Semaphore(handler_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._running = False

    # views

    def summary(self) -> Status:
        return self._summary

    def checks(self) -> list[dict[str, Any]]:
        """Every check: name, kind, status, output, updated (unix time, 0: never ran); worst first."""
        states = sorted(self._states.values(), key=lambda s: (-RANK[s.status], s.spec.name))
        return [self._view(s) for s in states]

    def health_answer(self, node: str, site: str, limit: int = HEALTH_ANSWER_LIMIT) -> bytes:
        """The answer to the built-in `health` query (JSON: name, site, status, checks)."""
        answer: dict[str, Any] = {
            "name": node,
            "site": site,
            "status": self._summary,
            "checks": self.checks(),
        }
        data = orjson.dumps(answer)
        for keep in (512, 0):  # too big: shorten the outputs rather than fail the answer
            if len(data) <= limit:
                break
            for check in answer["checks"]:
                check["output"] = check["output"][:keep]
            data = orjson.dumps(answer)
        return data

    # running checks

    async def start(self) -> None:
        """Run every check once (so the first summary means something), then on its interval."""
        if self._running:
            return
        self._running = True
        self.lag.start()
        await asyncio.gather(*(self._run_one(s) for s in self._states.values()))
        for state in self._states.values():
            state.task = asyncio.get_running_loop().create_task(
                self._loop(state), name=f"check:{state.spec.name}"
            )

    async def stop(self) -> None:
        self._running = False
        tasks = [s.task for s in self._states.values() if s.task is not None]
        for state in self._states.values():
            state.task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.lag.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run_check(self, name: str) -> dict[str, Any]:
        """Run one check now; KeyError for an unknown name."""
        state = self._states[name]
        await self._run_one(state)
        return self._view(state)

    async def run_all(self) -> None:
        await asyncio.gather(*(self._run_one(s) for s in self._states.values()))

    async def _loop(self, state: _CheckState) -> None:
        while True:
            await asyncio.sleep(state.spec.interval)
            await self._run_one(state)

    async def _run_one(self, state: _CheckState) -> None:
        spec = state.spec
        try:
            result = await asyncio.wait_for(self._execute(spec), spec.timeout + 1.0)
        except TimeoutError:
            result = CheckResult("critical", f"timed out after {spec.timeout:g}s")
        except Exception as e:  # a check must never take the monitor down
            log.exception("check %s failed to run", spec.name)
            result = CheckResult("critical", f"check failed to run: {type(e).__name__}: {e}")
        changed = result.status != state.status
        state.status, state.output, state.updated = result.status, result.output, self._clock()
        if changed and self.on_check_change is not None:
            self.on_check_change(self._view(state))
        summary = self._compute_summary()
        if summary != self._summary:
            self._summary = summary
            if self.on_change is not None:
                self.on_change(summary)

    async def _execute(self, spec: CheckSpec) -> CheckResult:
        if spec.kind == COMMAND:
            return await check_command(spec)
        if spec.kind == HTTP:
            return await check_http(spec, self._http())
        if spec.kind == TCP:
            return await check_tcp(spec)
        if spec.kind == LOAD:
            return check_load(spec)
        if spec.kind == MEMORY:
            return check_memory(spec)
        if spec.kind == DISK:
            # statvfs can hang on a dead network mount: keep it off the loop
            return await asyncio.wait_for(asyncio.to_thread(check_disk, spec), spec.timeout)
        if spec.kind == LOOP_LAG:
            return check_loop_lag(spec, self.lag)
        raise AssertionError(f"unknown check kind {spec.kind}")

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "meshd-health-check"}, trust_env=False
            )
        return self._session

    def _compute_summary(self) -> Status:
        return worst(s.status for s in self._states.values())

    @staticmethod
    def _view(state: _CheckState) -> dict[str, Any]:
        return {
            "name": state.spec.name,
            "kind": state.spec.kind,
            "status": state.status,
            "output": state.output,
            "updated": state.updated,
        }

    # queries

    async def run_handler(self, name: str, payload: bytes) -> bytes:
        """Run the handler for a custom query; JSON bytes, always (errors are answers too):
        {"handler", "exit_code", "output", "truncated"} or {"error", "detail"}."""
        spec = self.handlers.get(name)
        if spec is None:
            known = sorted(self.handlers)
            return orjson.dumps(
                {
                    "error": "no handler",
                    "detail": f"this node has no handler for query {name!r}",
                    "handlers": known,
                }
            )
        async with self._handler_slots:
            result = await run_command(
                spec.command,
                spec.timeout,
                stdin=payload,
                limit=HANDLER_OUTPUT_LIMIT,
                keep="head",
                env={"MESHD_QUERY": name},
            )
        answer: dict[str, Any] = {
            "handler": name,
            "exit_code": result.exit_code,
            "output": result.output.decode("utf-8", errors="replace"),
            "truncated": result.truncated,
        }
        if result.error:
            answer["error"] = "timeout" if result.timed_out else "failed"
            answer["detail"] = result.error
        return orjson.dumps(answer)

    async def answer(self, query: str, payload: bytes, *, node: str, site: str) -> bytes:
        """The answer of this node to a query: `health` is built in, the rest are handlers."""
        if query == HEALTH_QUERY:
            return self.health_answer(node, site)
        return await self.run_handler(query, payload)
