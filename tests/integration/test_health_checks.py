"""meshd.health against real local processes, servers, sockets and the clock (127.0.0.1 only):
command checks and handlers run subprocesses, http/tcp checks connect, loop lag measures time."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from meshd.health.checks import check_command, check_loop_lag, check_tcp
from meshd.health.command import run_command
from meshd.health.config import parse_checks, parse_query_handlers
from meshd.health.loop_lag import LoopLagMonitor
from meshd.health.monitor import HealthMonitor
from meshd.health.spec import CHECK_OUTPUT_LIMIT, CheckSpec
from tests.local_http import serving

pytestmark = pytest.mark.integration

PY = sys.executable


def cmd(name: str, script: str, timeout: float = 5.0) -> CheckSpec:
    return CheckSpec(name, "command", interval=10.0, timeout=timeout, command=script)


# --- command checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"), [(0, "passing"), (1, "warning"), (2, "critical"), (127, "critical")]
)
async def test_command_exit_codes_map_like_consul(code: int, status: str) -> None:
    result = await check_command(cmd("c", f"echo out-{code}; echo err >&2; exit {code}"))
    assert result.status == status
    assert "out-" + str(code) in result.output
    assert "err" in result.output


async def test_command_as_argument_list_runs_without_a_shell() -> None:
    spec = CheckSpec("c", "command", command=(PY, "-c", "print('$HOME stays literal')"))
    result = await check_command(spec)
    assert result.status == "passing"
    assert "$HOME stays literal" in result.output


async def test_command_killed_by_signal_is_critical() -> None:
    result = await check_command(cmd("c", "kill -9 $$"))
    assert result.status == "critical"
    assert "signal 9" in result.output


async def test_command_timeout_is_critical_and_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {pidfile}; echo started; wait"
    started = time.monotonic()
    result = await check_command(cmd("slow", script, timeout=0.3))
    assert time.monotonic() - started < 3.0
    assert result.status == "critical"
    assert "timed out after 0.3s" in result.output
    assert "started" in result.output  # output so far is kept
    child = int(pidfile.read_text())
    for _ in range(50):  # the background child was in the killed group
        status = Path(f"/proc/{child}/status")
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail(f"child {child} of the timed-out check is still running")


async def test_command_output_keeps_the_last_4_kib() -> None:
    script = f"{PY} -c \"print('x' * 100000); print('THE END')\""
    result = await check_command(cmd("big", script))
    assert result.status == "passing"
    assert result.output.rstrip().endswith("THE END")
    assert result.output.startswith("[output truncated")
    assert len(result.output.encode()) <= CHECK_OUTPUT_LIMIT + 100


async def test_command_that_cannot_start_is_critical() -> None:
    spec = CheckSpec("c", "command", command=("/nonexistent/meshd-check",))
    result = await check_command(spec)
    assert result.status == "critical"
    assert "cannot run /nonexistent/meshd-check" in result.output


async def test_run_command_feeds_stdin_and_keeps_the_head() -> None:
    result = await run_command(
        (PY, "-c", "import sys; d = sys.stdin.buffer.read(); print(d.decode() * 3000)"),
        5.0,
        stdin=b"abc",
        limit=10,
        keep="head",
    )
    assert result.exit_code == 0
    assert result.output == b"abcabcabca"
    assert result.truncated


# --- HTTP and TCP checks ------------------------------------------------------------------------


@pytest.fixture
async def http_base() -> AsyncIterator[str]:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="all good")

    async def busy(_: web.Request) -> web.Response:
        return web.Response(status=429, text="slow down")

    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=503, text="db down")

    release = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 5)  # released at teardown
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/busy", busy)
    app.router.add_get("/broken", broken)
    app.router.add_get("/slow", slow)
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}"
        release.set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_http_check_statuses(http_base: str) -> None:
    def spec(path: str, timeout: float = 5.0) -> CheckSpec:
        return CheckSpec(path, "http", timeout=timeout, url=http_base + path)

    monitor = HealthMonitor([spec("/ok"), spec("/busy"), spec("/broken"), spec("/slow", 0.3)])
    try:
        await monitor.run_all()
    finally:
        await monitor.stop()
    by_name = {c["name"]: c for c in monitor.checks()}
    assert by_name["/ok"]["status"] == "passing"
    assert "200" in by_name["/ok"]["output"]
    assert "all good" in by_name["/ok"]["output"]
    assert by_name["/busy"]["status"] == "warning"
    assert by_name["/broken"]["status"] == "critical"
    assert "503" in by_name["/broken"]["output"]
    assert "db down" in by_name["/broken"]["output"]
    assert by_name["/slow"]["status"] == "critical"
    assert "timed out" in by_name["/slow"]["output"]


async def test_http_check_connection_refused_is_critical() -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    monitor = HealthMonitor([CheckSpec("web", "http", timeout=2.0, url=url)])
    try:
        view = await monitor.run_check("web")
    finally:
        await monitor.stop()
    assert view["status"] == "critical"
    assert url in view["output"]


async def test_tcp_check() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        up = await check_tcp(CheckSpec("db", "tcp", timeout=2.0, addr=f"127.0.0.1:{port}"))
    finally:
        server.close()
        await server.wait_closed()
    assert up.status == "passing"
    assert "Success" in up.output
    down = await check_tcp(CheckSpec("db", "tcp", timeout=2.0, addr=f"127.0.0.1:{free_port()}"))
    assert down.status == "critical"
    assert "TCP connect 127.0.0.1:" in down.output


async def test_loop_lag_check_sees_a_blocked_loop() -> None:
    lag = LoopLagMonitor(tick=0.02)
    lag.start()
    spec = CheckSpec("loop-lag", "loop_lag", warning=0.1, critical=0.2)
    try:
        await asyncio.sleep(0.1)
        assert check_loop_lag(spec, lag).status == "passing"
        time.sleep(0.35)  # blocks the event loop, as a slow callback would
        await asyncio.sleep(0.1)
        blocked = check_loop_lag(spec, lag)
        assert blocked.status == "critical"
        assert "lag 3" in blocked.output or "lag 4" in blocked.output
        await asyncio.sleep(0.1)
        assert check_loop_lag(spec, lag).status == "passing"  # the worst is per run
    finally:
        await lag.stop()


# --- the monitor --------------------------------------------------------------------------------


async def test_summary_aggregation_and_change_callbacks(tmp_path: Path) -> None:
    state = tmp_path / "code"
    state.write_text("0")
    changes: list[str] = []
    check_changes: list[tuple[str, str]] = []
    monitor = HealthMonitor(
        [cmd("ok", "exit 0"), cmd("flappy", f"exit $(cat {state})")],
        on_change=changes.append,
        on_check_change=lambda c: check_changes.append((c["name"], c["status"])),
        clock=lambda: 1234.5,
    )
    assert monitor.summary() == "critical"  # nothing ran yet (Consul starts checks critical)
    assert {c["output"] for c in monitor.checks()} == {"not run yet"}
    await monitor.run_all()
    assert monitor.summary() == "passing"
    assert changes == ["passing"]
    state.write_text("1")
    await monitor.run_check("flappy")
    assert monitor.summary() == "warning"
    state.write_text("3")
    view = await monitor.run_check("flappy")
    assert view == {
        "name": "flappy", "kind": "command", "status": "critical", "output": "", "updated": 1234.5,
    }  # fmt: skip
    assert monitor.summary() == "critical"
    await monitor.run_check("flappy")  # same status again: no callback
    state.write_text("0")
    await monitor.run_check("flappy")
    assert changes == ["passing", "warning", "critical", "passing"]
    # the first round runs concurrently: its order is not fixed
    assert sorted(check_changes[:2]) == [("flappy", "passing"), ("ok", "passing")]
    assert check_changes[2:] == [("flappy", "warning"), ("flappy", "critical"), ("flappy", "passing")]
    assert [c["name"] for c in monitor.checks()] == ["flappy", "ok"]  # worst first, then by name


async def test_checks_listed_worst_first() -> None:
    monitor = HealthMonitor([cmd("a", "exit 0"), cmd("b", "exit 2"), cmd("c", "exit 1")])
    await monitor.run_all()
    assert [(c["name"], c["status"]) for c in monitor.checks()] == [
        ("b", "critical"),
        ("c", "warning"),
        ("a", "passing"),
    ]


async def test_start_runs_every_check_then_repeats_on_the_interval(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    spec = CheckSpec("tick", "command", interval=0.1, timeout=2.0, command=f"echo x >> {counter}")
    builtins = parse_checks([], str(tmp_path))
    monitor = HealthMonitor([spec, *builtins])
    await monitor.start()
    try:
        assert counter.read_text().count("x") == 1  # the first round is done when start returns
        assert all(c["updated"] > 0 for c in monitor.checks())
        assert {c["name"] for c in monitor.checks()} >= {"load", "memory", "loop-lag", "disk-root"}
        for _ in range(100):
            if counter.read_text().count("x") >= 3:
                break
            await asyncio.sleep(0.05)
        assert counter.read_text().count("x") >= 3
    finally:
        await monitor.stop()
    runs = counter.read_text().count("x")
    await asyncio.sleep(0.25)
    assert counter.read_text().count("x") == runs  # stopped means stopped


async def test_health_answer_and_handlers() -> None:
    handlers = parse_query_handlers(
        [
            {"name": "echo", "command": [PY, "-c", "import sys; print(sys.stdin.read().upper())"]},
            {"name": "env", "command": "echo $MESHD_QUERY; exit 3"},
            {"name": "hang", "command": "sleep 10", "timeout": "200ms"},
        ]
    )
    monitor = HealthMonitor([cmd("bad", "echo broken; exit 2")], handlers)
    await monitor.run_all()

    health = orjson.loads(await monitor.answer("health", b"", node="n1", site="s1"))
    assert health["name"] == "n1"
    assert health["site"] == "s1"
    assert health["status"] == "critical"
    assert [(c["name"], c["status"]) for c in health["checks"]] == [("bad", "critical")]
    assert health["checks"][0]["output"].strip() == "broken"

    echo = orjson.loads(await monitor.answer("echo", b"hello", node="n1", site="s1"))
    assert echo == {"handler": "echo", "exit_code": 0, "output": "HELLO\n", "truncated": False}
    env = orjson.loads(await monitor.run_handler("env", b""))
    assert env["output"] == "env\n"
    assert env["exit_code"] == 3
    assert "error" not in env
    hang = orjson.loads(await monitor.run_handler("hang", b""))
    assert hang["error"] == "timeout"
    assert hang["exit_code"] is None
    missing = orjson.loads(await monitor.run_handler("nope", b"x"))
    assert missing["error"] == "no handler"
    assert "'nope'" in missing["detail"]
    assert missing["handlers"] == ["echo", "env", "hang"]


async def test_health_answer_stays_bounded() -> None:
    script = f"{PY} -c \"print('y' * 5000)\"; exit 1"
    monitor = HealthMonitor([cmd(f"c{i}", script) for i in range(8)])
    await monitor.run_all()
    full = monitor.health_answer("n1", "s1")
    assert len(full) > 8 * 4000
    small = monitor.health_answer("n1", "s1", limit=8 * 1024)
    answer = orjson.loads(small)
    assert len(small) <= 8 * 1024
    assert answer["status"] == "warning"
    assert len(answer["checks"]) == 8
    assert all(len(c["output"]) <= 512 for c in answer["checks"])
