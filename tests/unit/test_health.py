"""meshd.health without processes, sockets or clocks: the tables, the status rules and the
built-in resource checks (they read /proc and statvfs). What runs commands or measures time is
in tests/integration/test_health_checks.py."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from meshd.errors import ConfigError
from meshd.health.checks import CheckResult, check_disk, check_load, check_memory, threshold_status
from meshd.health.config import parse_checks, parse_query_handlers
from meshd.health.monitor import HealthMonitor
from meshd.health.spec import CheckSpec, worst

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
    assert load.status == "passing"
    assert "cores" in load.output
    assert check_load(CheckSpec("load", "load", warning=0.0, critical=0.0)).status == "critical"
    memory = check_memory(CheckSpec("memory", "memory", warning=0.0, critical=0.0))
    assert memory.status == "passing"
    assert "% available" in memory.output
    assert check_memory(CheckSpec("m", "memory", warning=100.0, critical=100.0)).status == "critical"
    disk = check_disk(CheckSpec("d", "disk", path=str(tmp_path), warning=0.0, critical=0.0))
    assert disk.status == "passing"
    assert str(tmp_path) in disk.output
    assert "% free" in disk.output
    always_full = CheckSpec("d", "disk", path=str(tmp_path), warning=100.0, critical=100.0)
    assert check_disk(always_full).status == "critical"
    missing = check_disk(CheckSpec("d", "disk", path=str(tmp_path / "nope")))
    assert missing.status == "critical"


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
    assert by_name["api"].interval == 5.0
    assert by_name["api"].timeout == 10.0
    assert by_name["db"].kind == "tcp"
    assert by_name["db"].timeout == 0.25
    assert by_name["script"].command == ("/bin/true",)
    assert by_name["script"].interval == 2.0
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
    assert handlers["uptime"].command == "uptime"
    assert handlers["uptime"].timeout == 10.0
    assert handlers["ls"].command == ("ls",)
    assert handlers["ls"].timeout == 2.0
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


def disk(path: Path, name: str, threshold: float) -> CheckSpec:
    """A check whose status is fixed: 0% free is always enough, 100% never is."""
    return CheckSpec(name, "disk", path=str(path), warning=threshold, critical=threshold)


async def test_monitor_summary_callbacks_and_order_without_processes(tmp_path: Path) -> None:
    changes: list[str] = []
    check_changes: list[tuple[str, str]] = []
    monitor = HealthMonitor(
        [disk(tmp_path, "b-free", 0.0), disk(tmp_path, "a-free", 0.0)],
        on_change=changes.append,
        on_check_change=lambda c: check_changes.append((c["name"], c["status"])),
        clock=lambda: 99.0,
    )
    assert monitor.summary() == "critical"  # nothing ran yet
    await monitor.run_all()
    assert monitor.summary() == "passing"
    assert changes == ["passing"]
    assert sorted(check_changes) == [("a-free", "passing"), ("b-free", "passing")]
    assert [c["name"] for c in monitor.checks()] == ["a-free", "b-free"]  # same status: by name
    assert all(c["updated"] == 99.0 and c["kind"] == "disk" for c in monitor.checks())
    await monitor.run_all()  # nothing changed: no callback
    assert changes == ["passing"]
    assert len(check_changes) == 2

    full = HealthMonitor([disk(tmp_path, "a-free", 0.0), disk(tmp_path, "z-full", 100.0)])
    await full.run_all()
    assert [(c["name"], c["status"]) for c in full.checks()] == [
        ("z-full", "critical"),
        ("a-free", "passing"),
    ]
    answer = orjson.loads(await full.answer("health", b"", node="n1", site="s1"))
    assert (answer["name"], answer["site"], answer["status"]) == ("n1", "s1", "critical")
    missing = orjson.loads(await full.answer("nope", b"", node="n1", site="s1"))
    assert missing["error"] == "no handler"
    assert missing["handlers"] == []
    with pytest.raises(KeyError):
        await full.run_check("unknown")


def _threads(prefix: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(prefix))


async def test_a_hung_disk_check_holds_one_thread_of_its_own(tmp_path: Path) -> None:
    release = threading.Event()
    calls: list[str] = []

    def statvfs_on_dead_nfs(spec: CheckSpec) -> CheckResult:
        calls.append(spec.name)
        if not release.wait(30):
            raise AssertionError("never released")
        return check_disk(spec)

    now = [100.0]
    spec = CheckSpec("disk-nfs", "disk", path=str(tmp_path), timeout=0.05, warning=0.0, critical=0.0)
    monitor = HealthMonitor([spec], disk_check=statvfs_on_dead_nfs, monotonic=lambda: now[0])
    default_before = _threads("asyncio_")
    try:
        first = await monitor.run_check("disk-nfs")
        assert (first["status"], first["output"]) == ("critical", "timed out after 0.05s")
        for _ in range(5):  # five more intervals while statvfs still hangs
            now[0] += 30.0
            hung = await monitor.run_check("disk-nfs")
            assert hung["status"] == "critical"
            assert hung["output"].startswith("check hung: previous run still blocked for")
        assert hung["output"] == "check hung: previous run still blocked for 150s"
        assert calls == ["disk-nfs"]  # one blocked call, one thread: not one more per interval
        assert _threads("meshd-check:") == 1
        assert _threads("asyncio_") == default_before  # the loop's shared executor is untouched
        assert await asyncio.to_thread(lambda: 42) == 42
        assert monitor.hung_runs() == {"disk-nfs": 5}
    finally:
        release.set()
    for _ in range(500):  # the thread returns at once now; the next run starts a new call
        result = await monitor.run_check("disk-nfs")
        if result["status"] == "passing":
            break
        await asyncio.sleep(0.01)
    assert result["status"] == "passing"
    assert "% free" in result["output"]
    assert calls == ["disk-nfs", "disk-nfs"]
