"""HealthMonitor: runs the checks on their intervals, keeps their last results and answers the
built-in `health` query and the custom queries (query handlers)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
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
    # The blocking call of the last run (disk: statvfs); a hung one is not started again.
    blocked: concurrent.futures.Future[CheckResult] | None = field(default=None, repr=False)
    blocked_since: float = 0.0  # monotonic
    hung: int = 0  # runs refused because the previous blocking call had not returned


def _in_thread(
    fn: Callable[[CheckSpec], CheckResult], spec: CheckSpec
) -> concurrent.futures.Future[CheckResult]:
    """Run fn(spec) on a thread of its own, not the loop's shared default executor.

    The caller starts at most one per check, so a call that never returns (statvfs on a dead
    NFS mount) holds one thread for good, not one more every interval; a daemon thread, so it
    does not hold up the process's exit either.
    """
    fut: concurrent.futures.Future[CheckResult] = concurrent.futures.Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(spec))
        except BaseException as e:  # handed to the awaiting task, which reports it
            fut.set_exception(e)

    threading.Thread(target=run, name=f"meshd-check:{spec.name}", daemon=True).start()
    return fut


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
        monotonic: Callable[[], float] = time.monotonic,
        disk_check: Callable[[CheckSpec], CheckResult] = check_disk,
    ) -> None:
        self._states = {spec.name: _CheckState(spec) for spec in checks}
        self.handlers = dict(handlers or {})
        self.on_change = on_change
        self.on_check_change = on_check_change
        self.lag = lag or LoopLagMonitor()
        self._clock = clock
        self._monotonic = monotonic
        self._disk_check = disk_check
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
            self._schedule(state)

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

    def _schedule(self, state: _CheckState) -> None:
        loop = asyncio.get_running_loop()
        state.task = loop.create_task(self._loop(state), name=f"check:{state.spec.name}")

    async def _loop(self, state: _CheckState) -> None:
        while True:
            await asyncio.sleep(state.spec.interval)
            await self._run_one(state)

    async def reconfigure(self, checks: Sequence[CheckSpec], handlers: Mapping[str, HandlerSpec]) -> None:
        """Take a new set of checks and handlers (a configuration reload).

        A check whose spec is unchanged keeps its state and schedule; a removed one stops; a new
        or changed one runs once before it counts (so the summary never shows a check that has
        not run as critical) and then on its interval.
        """
        states: dict[str, _CheckState] = {}
        fresh: list[_CheckState] = []
        for spec in checks:
            kept = self._states.get(spec.name)
            if kept is not None and kept.spec == spec:
                states[spec.name] = kept
            else:
                states[spec.name] = _CheckState(spec)
                fresh.append(states[spec.name])
        if self._running:
            results = await asyncio.gather(*(self._result(s) for s in fresh))
            for state, result in zip(fresh, results, strict=True):
                state.status, state.output, state.updated = result.status, result.output, self._clock()
        gone = [s for name, s in self._states.items() if states.get(name) is not s]
        # A run of a kept check may have finished during the await: its state object is kept.
        self._states = states
        self.handlers = dict(handlers)
        for state in gone:
            if state.task is not None:
                state.task.cancel()
                state.task = None
        if self._running:
            for state in fresh:
                self._schedule(state)
        self._update_summary()

    async def _run_one(self, state: _CheckState) -> None:
        result = await self._result(state)
        if self._states.get(state.spec.name) is not state:
            return  # removed by a reload while it ran
        changed = result.status != state.status
        state.status, state.output, state.updated = result.status, result.output, self._clock()
        if changed and self.on_check_change is not None:
            self.on_check_change(self._view(state))
        self._update_summary()

    async def _result(self, state: _CheckState) -> CheckResult:
        spec = state.spec
        try:
            return await asyncio.wait_for(self._execute(state), spec.timeout + 1.0)
        except TimeoutError:
            return CheckResult("critical", f"timed out after {spec.timeout:g}s")
        except Exception as e:  # a check must never take the monitor down
            log.exception("check %s failed to run", spec.name)
            return CheckResult("critical", f"check failed to run: {type(e).__name__}: {e}")

    def _update_summary(self) -> None:
        summary = self._compute_summary()
        if summary != self._summary:
            self._summary = summary
            if self.on_change is not None:
                self.on_change(summary)

    async def _execute(self, state: _CheckState) -> CheckResult:
        spec = state.spec
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
            return await self._blocking(state, self._disk_check)
        if spec.kind == LOOP_LAG:
            return check_loop_lag(spec, self.lag)
        raise AssertionError(f"unknown check kind {spec.kind}")

    async def _blocking(self, state: _CheckState, fn: Callable[[CheckSpec], CheckResult]) -> CheckResult:
        """fn(spec) off the loop, within the check's timeout; never two calls of one check at once."""
        previous = state.blocked
        if previous is not None and not previous.done():
            state.hung += 1
            stuck = self._monotonic() - state.blocked_since
            return CheckResult("critical", f"check hung: previous run still blocked for {stuck:.0f}s")
        state.blocked, state.blocked_since = _in_thread(fn, state.spec), self._monotonic()
        # On timeout wait_for gives up waiting; the thread runs on, and the next runs see it.
        return await asyncio.wait_for(asyncio.wrap_future(state.blocked), state.spec.timeout)

    def hung_runs(self) -> dict[str, int]:
        """Runs refused because the check's previous blocking call had not returned, by check."""
        return {name: s.hung for name, s in self._states.items() if s.spec.kind == DISK}

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
