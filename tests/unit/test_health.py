"""meshd.health: checks against real local processes, servers and sockets (127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from meshd.errors import ConfigError
from meshd.health import (
    CHECK_OUTPUT_LIMIT,
    CheckSpec,
    HealthMonitor,
    LoopLagMonitor,
    check_command,
    check_disk,
    check_load,
    check_loop_lag,
    check_memory,
    check_tcp,
    parse_checks,
    parse_query_handlers,
    run_command,
    threshold_status,
    worst,
)

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
    assert "out-" + str(code) in result.output and "err" in result.output


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
    assert result.exit_code == 0 and result.output == b"abcabcabca" and result.truncated


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
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    release.set()
    await runner.cleanup()


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
    assert "200" in by_name["/ok"]["output"] and "all good" in by_name["/ok"]["output"]
    assert by_name["/busy"]["status"] == "warning"
    assert by_name["/broken"]["status"] == "critical"
    assert "503" in by_name["/broken"]["output"] and "db down" in by_name["/broken"]["output"]
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
    assert up.status == "passing" and "Success" in up.output
    down = await check_tcp(CheckSpec("db", "tcp", timeout=2.0, addr=f"127.0.0.1:{free_port()}"))
    assert down.status == "critical"
    assert "TCP connect 127.0.0.1:" in down.output


# --- built-in checks ----------------------------------------------------------------------------


def test_threshold_directions() -> None:
    # higher is worse (load per core, loop lag)
    assert threshold_status(1.0, 2.0, 4.0, True) == "passing"
    assert threshold_status(2.0, 2.0, 4.0, True) == "warning"
    assert threshold_status(4.5, 2.0, 4.0, True) == "critical"
    # lower is worse (free memory and disk, percent)
    assert threshold_status(50.0, 10.0, 5.0, False) == "passing"
    assert threshold_status(9.0, 10.0, 5.0, False) == "warning"
    assert threshold_status(5.0, 10.0, 5.0, False) == "critical"


def test_builtin_resource_checks_read_the_machine(tmp_path: Path) -> None:
    load = check_load(CheckSpec("load", "load", warning=1e9, critical=1e9))
    assert load.status == "passing" and "cores" in load.output
    assert check_load(CheckSpec("load", "load", warning=0.0, critical=0.0)).status == "critical"
    memory = check_memory(CheckSpec("memory", "memory", warning=0.0, critical=0.0))
    assert memory.status == "passing" and "% available" in memory.output
    assert check_memory(CheckSpec("m", "memory", warning=100.0, critical=100.0)).status == "critical"
    disk = check_disk(CheckSpec("d", "disk", path=str(tmp_path), warning=0.0, critical=0.0))
    assert disk.status == "passing" and str(tmp_path) in disk.output and "% free" in disk.output
    always_full = CheckSpec("d", "disk", path=str(tmp_path), warning=100.0, critical=100.0)
    assert check_disk(always_full).status == "critical"
    missing = check_disk(CheckSpec("d", "disk", path=str(tmp_path / "nope")))
    assert missing.status == "critical"


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


# --- configuration ------------------------------------------------------------------------------


def test_parse_checks_with_builtins(tmp_path: Path) -> None:
    data_dir = str(tmp_path)
    specs = parse_checks(
        [
            {"name": "api", "kind": "http", "url": "http://127.0.0.1:8080/health", "interval": "5s"},
            {"name": "db", "addr": "127.0.0.1:5432", "timeout": "250ms"},  # kind inferred
            {"name": "script", "type": "command", "command": ["/bin/true"], "interval": 2},
            {"name": "load", "kind": "load", "warning": 3, "critical": 6},  # replaces the built-in
            {"name": "disk-root", "kind": "disk", "enabled": False},  # removes the built-in
            {"name": "lag", "kind": "loop-lag", "warning": "50ms", "critical": "1s"},
            {"name": "srv", "kind": "disk", "path": "/srv", "warning": "20%", "critical": 10},
        ],
        data_dir,
    )
    by_name = {s.name: s for s in specs}
    assert set(by_name) == {
        "memory", "disk-data", "loop-lag", "api", "db", "script", "load", "lag", "srv",
    }  # fmt: skip
    assert by_name["api"].interval == 5.0 and by_name["api"].timeout == 10.0
    assert by_name["db"].kind == "tcp" and by_name["db"].timeout == 0.25
    assert by_name["script"].command == ("/bin/true",) and by_name["script"].interval == 2.0
    assert (by_name["load"].warning, by_name["load"].critical) == (3.0, 6.0)
    assert (by_name["lag"].warning, by_name["lag"].critical) == (0.05, 1.0)
    assert by_name["disk-data"].path == data_dir
    assert (by_name["srv"].path, by_name["srv"].warning, by_name["srv"].critical) == ("/srv", 20, 10)
    assert parse_checks([], data_dir, builtins=False) == []


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"kind": "tcp", "addr": "127.0.0.1:1"}, r"check #1: key 'name'"),
        ({"name": "x"}, r"check 'x': key 'kind': missing"),
        ({"name": "x", "kind": "ping"}, r"check 'x': key 'kind': 'ping' is not one of"),
        ({"name": "x", "kind": "tcp", "type": "http"}, r"check 'x': keys 'kind' and 'type'"),
        ({"name": "x", "command": "true", "intervall": "1s"}, r"check 'x': key 'intervall'"),
        ({"name": "x", "kind": "command", "command": "true", "url": "http://a"}, r"'x': key 'url'"),
        ({"name": "x", "command": "true", "url": "http://a"}, r"check 'x': key 'kind': missing"),
        ({"name": "x", "command": "true", "interval": "soon"}, r"check 'x': key 'interval'"),
        ({"name": "x", "command": "true", "interval": "1ms"}, r"check 'x': key 'interval'"),
        ({"name": "x", "command": "true", "timeout": "0s"}, r"check 'x': key 'timeout'"),
        ({"name": "x", "kind": "command"}, r"check 'x': key 'command': missing"),
        ({"name": "x", "command": []}, r"check 'x': key 'command'"),
        ({"name": "x", "command": ["a", 1]}, r"check 'x': key 'command'"),
        ({"name": "x", "url": "ftp://h/"}, r"check 'x': key 'url'"),
        ({"name": "x", "addr": "nohost"}, r"check 'x': key 'addr'"),
        ({"name": "x", "kind": "load", "warning": "high"}, r"check 'x': key 'warning'"),
        ({"name": "x", "kind": "load", "warning": 5, "critical": 2}, r"check 'x': key 'critical'"),
        ({"name": "x", "kind": "disk", "warning": 5, "critical": 10}, r"check 'x': key 'critical'"),
        ({"name": "x", "kind": "disk", "warning": 150}, r"check 'x': key 'warning'"),
        ({"name": "x", "kind": "loop_lag", "critical": "fast"}, r"check 'x': key 'critical'"),
        ({"name": "x", "kind": "tcp", "addr": "h:1", "enabled": "no"}, r"check 'x': key 'enabled'"),
    ],
)
def test_bad_check_config_names_the_check_and_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_checks([table], "/tmp")


def test_duplicate_check_names_are_refused() -> None:
    tables = [{"name": "a", "command": "true"}, {"name": "a", "command": "false"}]
    with pytest.raises(ConfigError, match=r"check 'a': key 'name': defined twice"):
        parse_checks(tables, "/tmp")


def test_query_handler_config() -> None:
    handlers = parse_query_handlers(
        [{"name": "uptime", "command": "uptime"}, {"name": "ls", "command": ["ls"], "timeout": "2s"}]
    )
    assert handlers["uptime"].command == "uptime" and handlers["uptime"].timeout == 10.0
    assert handlers["ls"].command == ("ls",) and handlers["ls"].timeout == 2.0
    bad = [
        ([{"command": "x"}], r"query_handler #1: key 'name'"),
        ([{"name": "health", "command": "x"}], r"query_handler 'health': key 'name'"),
        ([{"name": "a"}], r"query_handler 'a': key 'command': missing"),
        ([{"name": "a", "command": "x", "cmd": "y"}], r"query_handler 'a': key 'cmd'"),
        ([{"name": "a", "command": "x", "timeout": "x"}], r"query_handler 'a': key 'timeout'"),
        ([{"name": "a", "command": "x"}, {"name": "a", "command": "y"}], r"'a': .*twice"),
    ]
    for tables, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_query_handlers(tables)


# --- the monitor --------------------------------------------------------------------------------


def test_worst_status_wins() -> None:
    assert worst([]) == "passing"
    assert worst(["passing", "passing"]) == "passing"
    assert worst(["passing", "warning", "passing"]) == "warning"
    assert worst(["warning", "critical", "passing"]) == "critical"


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
    assert health["name"] == "n1" and health["site"] == "s1" and health["status"] == "critical"
    assert [(c["name"], c["status"]) for c in health["checks"]] == [("bad", "critical")]
    assert health["checks"][0]["output"].strip() == "broken"

    echo = orjson.loads(await monitor.answer("echo", b"hello", node="n1", site="s1"))
    assert echo == {"handler": "echo", "exit_code": 0, "output": "HELLO\n", "truncated": False}
    env = orjson.loads(await monitor.run_handler("env", b""))
    assert env["output"] == "env\n" and env["exit_code"] == 3 and "error" not in env
    hang = orjson.loads(await monitor.run_handler("hang", b""))
    assert hang["error"] == "timeout" and hang["exit_code"] is None
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
    assert answer["status"] == "warning" and len(answer["checks"]) == 8
    assert all(len(c["output"]) <= 512 for c in answer["checks"])
