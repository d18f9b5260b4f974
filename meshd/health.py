"""Local health checks and the answers to `health` and custom queries (shell: asyncio).

Checks, each on its own interval with its own timeout (Consul's semantics where Consul has them):

    kind       passing / warning / critical                                  output kept
    --------   -----------------------------------------------------------   ------------------
    command    exit 0 / exit 1 / any other exit, a signal, a timeout or      stdout+stderr, the
               a command that cannot start                                   last 4 KiB
    http       GET 2xx / 429 / anything else, or no answer in time           status + body head
    tcp        connect works / - / refused, unreachable, timeout             what happened
    load       1-minute load per core below warning (2.0) and critical (4.0)
    memory     MemAvailable in percent of MemTotal above warning (10) and critical (5)
    disk       free space of `path` (percent, for unprivileged users) above warning (10), critical (5)
    loop_lag   the event loop's worst lag since the last run below warning (100ms), critical (500ms)

Built-in checks "load", "memory", "disk-data" (the data dir), "disk-root" (/) and "loop-lag" are
always there unless a [[check]] with the same name replaces them (or says `enabled = false`).
The summary is the worst status of all checks. A check starts `critical` ("not run yet"), as in
Consul; HealthMonitor.start() runs every check once before it returns.

Config ([[check]] tables): name, kind (or type; inferred from command/url/addr when absent),
command (a list: run as is; a string: run by /bin/sh -c), url, addr ("host:port"), path (disk),
interval (default 10s), timeout (default 10s), warning/critical (built-in kinds), enabled.
[[query_handler]] tables: name, command, timeout; the handler gets the query payload on stdin and
its output (the first 32 KiB) is the answer. Every error names the check and the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import aiohttp
import orjson

from meshd.errors import ConfigError
from meshd.units import parse_duration, parse_hostport

log = logging.getLogger(__name__)

Status = Literal["passing", "warning", "critical"]
STATUSES: Final[tuple[Status, ...]] = ("passing", "warning", "critical")
_RANK: Final[Mapping[str, int]] = {s: i for i, s in enumerate(STATUSES)}

CHECK_OUTPUT_LIMIT: Final = 4096  # Consul's default OutputMaxSize
HANDLER_OUTPUT_LIMIT: Final = 32 * 1024
HEALTH_ANSWER_LIMIT: Final = 192 * 1024  # stays below the query engine's max_response_size
DEFAULT_INTERVAL: Final = 10.0
DEFAULT_TIMEOUT: Final = 10.0
MIN_INTERVAL: Final = 0.1
HEALTH_QUERY: Final = "health"  # the built-in query; no handler may take its name

COMMAND, HTTP, TCP, LOAD, MEMORY, DISK, LOOP_LAG = (
    "command",
    "http",
    "tcp",
    "load",
    "memory",
    "disk",
    "loop_lag",
)
KINDS: Final = (COMMAND, HTTP, TCP, LOAD, MEMORY, DISK, LOOP_LAG)
# kind -> (default warning, default critical, True when a higher value is worse)
THRESHOLDS: Final[Mapping[str, tuple[float, float, bool]]] = {
    LOAD: (2.0, 4.0, True),
    LOOP_LAG: (0.1, 0.5, True),
    MEMORY: (10.0, 5.0, False),
    DISK: (10.0, 5.0, False),
}
_COMMON_KEYS: Final = frozenset({"name", "kind", "type", "interval", "timeout", "enabled"})
_KIND_KEYS: Final[Mapping[str, frozenset[str]]] = {
    COMMAND: frozenset({"command"}),
    HTTP: frozenset({"url"}),
    TCP: frozenset({"addr"}),
    LOAD: frozenset({"warning", "critical"}),
    MEMORY: frozenset({"warning", "critical"}),
    DISK: frozenset({"path", "warning", "critical"}),
    LOOP_LAG: frozenset({"warning", "critical"}),
}
_KIND_BY_KEY: Final = {"command": COMMAND, "url": HTTP, "addr": TCP}


def worst(statuses: Iterable[str]) -> Status:
    """The worst of some statuses ("passing" when there are none)."""
    rank = max((_RANK[s] for s in statuses), default=0)
    return STATUSES[rank]


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckSpec:
    name: str
    kind: str
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    command: tuple[str, ...] | str | None = None  # a string runs through /bin/sh -c
    url: str | None = None
    addr: str | None = None
    path: str | None = None
    warning: float | None = None
    critical: float | None = None


@dataclass(frozen=True)
class HandlerSpec:
    name: str
    command: tuple[str, ...] | str
    timeout: float = DEFAULT_TIMEOUT


def builtin_checks(data_dir: str) -> list[CheckSpec]:
    def spec(name: str, kind: str, path: str | None = None) -> CheckSpec:
        warning, critical, _ = THRESHOLDS[kind]
        return CheckSpec(name, kind, 10.0, 5.0, path=path, warning=warning, critical=critical)

    return [
        spec("load", LOAD),
        spec("memory", MEMORY),
        spec("disk-data", DISK, data_dir),
        spec("disk-root", DISK, "/"),
        spec("loop-lag", LOOP_LAG),
    ]


def _command(value: object, where: str) -> tuple[str, ...] | str:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value) and value[0].strip():
        return tuple(value)
    raise ConfigError(f"{where}: expected a command line (a non-empty string or list of strings)")


def _threshold(kind: str, value: object, where: str) -> float:
    if kind == LOOP_LAG:
        return parse_duration(value, where)
    if isinstance(value, str) and kind in (MEMORY, DISK) and value.strip().endswith("%"):
        value = value.strip()[:-1]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or number != number or number < 0:
        raise ConfigError(f"{where}: expected a non-negative number, got {value!r}")
    if kind in (MEMORY, DISK) and number > 100:
        raise ConfigError(f"{where}: a percentage of free space, 0..100, got {value!r}")
    return number


def _positive_duration(value: object, where: str, minimum: float) -> float:
    seconds = parse_duration(value, where)
    if seconds < minimum:
        raise ConfigError(f"{where}: must be at least {minimum:g}s")
    return seconds


def parse_check(table: Mapping[str, Any], index: int, data_dir: str) -> CheckSpec | None:
    """One [[check]] table -> CheckSpec (None when `enabled = false`). ConfigError names it."""
    raw_name = table.get("name")
    if not isinstance(raw_name, str) or not raw_name.strip():
        raise ConfigError(f"check #{index + 1}: key 'name': every check needs a name")
    name = raw_name.strip()
    label = f"check {name!r}"
    kind_value = table.get("kind", table.get("type"))
    if "kind" in table and "type" in table and table["kind"] != table["type"]:
        raise ConfigError(f"{label}: keys 'kind' and 'type' disagree")
    if kind_value is None:
        present = [k for k in _KIND_BY_KEY if k in table]
        if len(present) != 1:
            hint = f"; {' and '.join(present)} leave it open" if present else ""
            raise ConfigError(f"{label}: key 'kind': missing (one of {', '.join(KINDS)}){hint}")
        kind = _KIND_BY_KEY[present[0]]
    elif isinstance(kind_value, str) and kind_value.replace("-", "_") in KINDS:
        kind = kind_value.replace("-", "_")
    else:
        raise ConfigError(f"{label}: key 'kind': {kind_value!r} is not one of {', '.join(KINDS)}")
    allowed = _COMMON_KEYS | _KIND_KEYS[kind]
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{label}: key {key!r}: not a key of a {kind} check (known: {', '.join(sorted(allowed))})"
            )
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{label}: key 'enabled': expected true or false, got {enabled!r}")
    if not enabled:
        return None
    spec = CheckSpec(name, kind)
    if "interval" in table:
        interval = _positive_duration(table["interval"], f"{label}: key 'interval'", MIN_INTERVAL)
        spec = replace(spec, interval=interval)
    if "timeout" in table:
        timeout = _positive_duration(table["timeout"], f"{label}: key 'timeout'", 0.001)
        spec = replace(spec, timeout=timeout)
    if kind == COMMAND:
        if "command" not in table:
            raise ConfigError(f"{label}: key 'command': missing")
        spec = replace(spec, command=_command(table["command"], f"{label}: key 'command'"))
    elif kind == HTTP:
        url = table.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{label}: key 'url': expected an http:// or https:// URL, got {url!r}")
        spec = replace(spec, url=url)
    elif kind == TCP:
        if "addr" not in table:
            raise ConfigError(f"{label}: key 'addr': missing")
        parse_hostport(table["addr"], f"{label}: key 'addr'")
        spec = replace(spec, addr=str(table["addr"]).strip())
    else:
        warning, critical, higher_is_worse = THRESHOLDS[kind]
        if "warning" in table:
            warning = _threshold(kind, table["warning"], f"{label}: key 'warning'")
        if "critical" in table:
            critical = _threshold(kind, table["critical"], f"{label}: key 'critical'")
        if (warning > critical) if higher_is_worse else (warning < critical):
            relation = "above" if higher_is_worse else "below"
            raise ConfigError(
                f"{label}: key 'critical': must be {relation} or equal to warning"
                f" ({critical:g} vs {warning:g})"
            )
        spec = replace(spec, warning=warning, critical=critical)
        if kind == DISK:
            path = table.get("path", data_dir)
            if not isinstance(path, str) or not path:
                raise ConfigError(f"{label}: key 'path': expected a directory, got {path!r}")
            spec = replace(spec, path=path)
    return spec


def parse_checks(
    tables: Sequence[Mapping[str, Any]], data_dir: str, *, builtins: bool = True
) -> list[CheckSpec]:
    """The [[check]] tables (plus the built-in checks, which a same-named table replaces)."""
    configured: dict[str, CheckSpec | None] = {}
    for index, table in enumerate(tables):
        if not isinstance(table, Mapping):
            raise ConfigError(f"check #{index + 1}: expected a table")
        spec = parse_check(table, index, data_dir)
        name = str(table["name"]).strip()
        if name in configured:
            raise ConfigError(f"check {name!r}: key 'name': defined twice")
        configured[name] = spec
    specs = [s for s in builtin_checks(data_dir) if s.name not in configured] if builtins else []
    specs += [s for s in configured.values() if s is not None]
    return specs


def parse_query_handlers(tables: Sequence[Mapping[str, Any]]) -> dict[str, HandlerSpec]:
    handlers: dict[str, HandlerSpec] = {}
    for index, table in enumerate(tables):
        if not isinstance(table, Mapping):
            raise ConfigError(f"query_handler #{index + 1}: expected a table")
        raw_name = table.get("name")
        if not isinstance(raw_name, str) or not raw_name.strip():
            raise ConfigError(f"query_handler #{index + 1}: key 'name': every handler needs a name")
        name = raw_name.strip()
        label = f"query_handler {name!r}"
        for key in table:
            if key not in ("name", "command", "timeout"):
                raise ConfigError(f"{label}: key {key!r}: unknown (known: command, name, timeout)")
        if name == HEALTH_QUERY:
            raise ConfigError(f"{label}: key 'name': {HEALTH_QUERY!r} is the built-in query")
        if name in handlers:
            raise ConfigError(f"{label}: key 'name': defined twice")
        if "command" not in table:
            raise ConfigError(f"{label}: key 'command': missing")
        command = _command(table["command"], f"{label}: key 'command'")
        timeout = DEFAULT_TIMEOUT
        if "timeout" in table:
            timeout = _positive_duration(table["timeout"], f"{label}: key 'timeout'", 0.001)
        handlers[name] = HandlerSpec(name, command, timeout)
    return handlers


# --- running things -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    exit_code: int | None  # None: it did not finish in time (it was killed) or did not start
    output: bytes  # stdout and stderr together, bounded
    truncated: bool
    error: str = ""  # why there is no (zero) exit code: cannot start, timeout, signal
    timed_out: bool = False


async def run_command(
    command: tuple[str, ...] | str,
    timeout: float,
    *,
    stdin: bytes = b"",
    limit: int = CHECK_OUTPUT_LIMIT,
    keep: Literal["head", "tail"] = "tail",
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run a command with a timeout, keeping at most `limit` bytes of its output.

    It runs in its own session; on timeout the whole process group is killed, so a shell
    script's children do not outlive it.
    """
    full_env = {**os.environ, **env} if env else None
    try:
        if isinstance(command, str):
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", command,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=full_env,
            )  # fmt: skip
        else:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=full_env,
            )  # fmt: skip
    except OSError as e:
        return CommandResult(None, b"", False, f"cannot run {_show(command)}: {e.strerror or e}")

    buf = bytearray()
    seen = 0

    async def communicate() -> int:
        nonlocal seen
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if stdin:
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            proc.stdin.close()
        while chunk := await proc.stdout.read(65536):
            seen += len(chunk)
            if keep == "tail":
                buf.extend(chunk)
                del buf[:-limit]
            elif len(buf) < limit:
                buf.extend(chunk[: limit - len(buf)])
        return await proc.wait()

    try:
        code = await asyncio.wait_for(communicate(), timeout)
    except TimeoutError:
        _kill_group(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return CommandResult(None, bytes(buf), seen > limit, f"timed out after {timeout:g}s", True)
    except BaseException:
        _kill_group(proc.pid)  # cancelled (daemon stopping): leave nothing behind
        raise
    if code < 0:
        return CommandResult(code, bytes(buf), seen > limit, f"killed by signal {-code}")
    return CommandResult(code, bytes(buf), seen > limit)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _show(command: tuple[str, ...] | str) -> str:
    return command if isinstance(command, str) else " ".join(command)


def _text(data: bytes, truncated: bool) -> str:
    text = data.decode("utf-8", errors="replace")
    return f"[output truncated to the last {len(data)} bytes]\n{text}" if truncated else text


@dataclass(frozen=True)
class CheckResult:
    status: Status
    output: str


def command_status(exit_code: int | None) -> Status:
    """Consul's rule: 0 passing, 1 warning, anything else (a signal, no exit code) critical."""
    if exit_code == 0:
        return "passing"
    if exit_code == 1:
        return "warning"
    return "critical"


def threshold_status(value: float, warning: float, critical: float, higher_is_worse: bool) -> Status:
    if higher_is_worse:
        return "critical" if value >= critical else "warning" if value >= warning else "passing"
    return "critical" if value <= critical else "warning" if value <= warning else "passing"


def http_status(code: int) -> Status:
    if 200 <= code < 300:
        return "passing"
    return "warning" if code == 429 else "critical"


async def check_command(spec: CheckSpec) -> CheckResult:
    assert spec.command is not None
    result = await run_command(spec.command, spec.timeout, env={"MESHD_CHECK": spec.name})
    output = _text(result.output, result.truncated)
    if result.error:
        output = f"{result.error}\n{output}" if output else result.error
    return CheckResult(command_status(result.exit_code), output)


async def check_http(spec: CheckSpec, session: aiohttp.ClientSession) -> CheckResult:
    assert spec.url is not None
    try:
        async with session.get(spec.url, timeout=aiohttp.ClientTimeout(total=spec.timeout)) as resp:
            body = await resp.content.read(CHECK_OUTPUT_LIMIT)
            head = f"HTTP GET {spec.url}: {resp.status} {resp.reason or ''}".rstrip()
            text = body.decode("utf-8", errors="replace")
            return CheckResult(http_status(resp.status), f"{head} Output: {text}" if text else head)
    except TimeoutError:
        return CheckResult("critical", f"HTTP GET {spec.url}: timed out after {spec.timeout:g}s")
    except aiohttp.ClientError as e:
        return CheckResult("critical", f"HTTP GET {spec.url}: {type(e).__name__}: {e}")


async def check_tcp(spec: CheckSpec) -> CheckResult:
    assert spec.addr is not None
    host, port = parse_hostport(spec.addr, f"check {spec.name!r}")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), spec.timeout)
    except TimeoutError:
        return CheckResult("critical", f"TCP connect {spec.addr}: timed out after {spec.timeout:g}s")
    except OSError as e:
        return CheckResult("critical", f"TCP connect {spec.addr}: {e.strerror or e}")
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return CheckResult("passing", f"TCP connect {spec.addr}: Success")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1  # the CPUs we may use (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_load(spec: CheckSpec) -> CheckResult:
    load1, load5, load15 = os.getloadavg()
    cores = _cores()
    per_core = load1 / cores
    status = threshold_status(per_core, _w(spec), _c(spec), higher_is_worse=True)
    return CheckResult(
        status, f"load {load1:.2f} {load5:.2f} {load15:.2f} on {cores} cores ({per_core:.2f}/core)"
    )


def read_meminfo(path: str = "/proc/meminfo") -> tuple[int, int]:
    """(available, total) bytes."""
    fields: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isascii() and parts[0].isdigit():
                fields[key] = int(parts[0]) * 1024
    return fields["MemAvailable"], fields["MemTotal"]


def check_memory(spec: CheckSpec) -> CheckResult:
    try:
        available, total = read_meminfo()
    except (OSError, KeyError, ValueError) as e:
        return CheckResult("warning", f"cannot read memory use: {e}")
    percent = 100.0 * available / total if total else 0.0
    status = threshold_status(percent, _w(spec), _c(spec), higher_is_worse=False)
    return CheckResult(status, f"{percent:.1f}% available ({_mib(available)} of {_mib(total)} MiB)")


def check_disk(spec: CheckSpec) -> CheckResult:
    assert spec.path is not None
    try:
        st = os.statvfs(spec.path)
    except OSError as e:
        return CheckResult("critical", f"{spec.path}: {e.strerror or e}")
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize  # what a non-root writer (meshd) can still use
    percent = 100.0 * free / total if total else 0.0
    status = threshold_status(percent, _w(spec), _c(spec), higher_is_worse=False)
    return CheckResult(status, f"{spec.path}: {percent:.1f}% free ({_mib(free)} of {_mib(total)} MiB)")


def _w(spec: CheckSpec) -> float:
    return spec.warning if spec.warning is not None else THRESHOLDS[spec.kind][0]


def _c(spec: CheckSpec) -> float:
    return spec.critical if spec.critical is not None else THRESHOLDS[spec.kind][1]


def _mib(n: int) -> int:
    return n // (1024 * 1024)


class LoopLagMonitor:
    """Measures the event loop's lag: a task sleeps `tick` and notes how late it wakes up."""

    def __init__(self, tick: float = 0.25) -> None:
        self.tick = tick
        self.last = 0.0
        self._worst = 0.0  # since the last take_worst()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def take_worst(self) -> float:
        """The worst lag since the previous call (a stall between two check runs counts)."""
        worst, self._worst = max(self._worst, self.last), 0.0
        return worst

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.tick)
            self.last = max(0.0, loop.time() - started - self.tick)
            self._worst = max(self._worst, self.last)


def check_loop_lag(spec: CheckSpec, lag: LoopLagMonitor) -> CheckResult:
    worst_lag = lag.take_worst()
    status = threshold_status(worst_lag, _w(spec), _c(spec), higher_is_worse=True)
    return CheckResult(status, f"event loop lag {worst_lag * 1000:.0f}ms (worst since last run)")


# --- the monitor --------------------------------------------------------------------------------


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
        states = sorted(self._states.values(), key=lambda s: (-_RANK[s.status], s.spec.name))
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
