"""The check kinds: how each one runs and maps what it sees to passing, warning or critical."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

import aiohttp

from meshd.health.command import output_text, run_command
from meshd.health.loop_lag import LoopLagMonitor
from meshd.health.spec import CHECK_OUTPUT_LIMIT, THRESHOLDS, CheckSpec, Status
from meshd.units import parse_hostport


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
    output = output_text(result.output, result.truncated)
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


def check_loop_lag(spec: CheckSpec, lag: LoopLagMonitor) -> CheckResult:
    worst_lag = lag.take_worst()
    status = threshold_status(worst_lag, _w(spec), _c(spec), higher_is_worse=True)
    return CheckResult(status, f"event loop lag {worst_lag * 1000:.0f}ms (worst since last run)")
