"""meshctl against a real API server (over a fake agent) on 127.0.0.1, and `meshd run`'s OS
plumbing: sd_notify over a Unix socket, the advertise address from this host's interfaces."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from meshd.api.app import create_api_app
from meshd.cli import meshctl
from meshd.core.messages import MemberState
from meshd.netaddr import derive_advertise_host
from meshd.systemd import sd_notify
from tests.fakes import FakeAgent, member


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_meshctl_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    assert meshctl.main(["--api", url, "members"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach meshd at {url}" in err


def make_agent() -> FakeAgent:
    return FakeAgent(
        name="gw1",
        cluster="c",
        site="north",
        api_token="tok-123456789012345",
        uptime_s=3725.0,
        join_result=None,
        ring=[bytes.fromhex("0a0b0c0d") + bytes(28)],
        people=[
            member("gw1", addr="127.0.0.1:7003", site="north", role="edge"),
            member("gw22", MemberState.DEAD, addr="127.0.0.1:7004", site="south"),
        ],
    )


@pytest.fixture
def api() -> Iterator[tuple[str, FakeAgent]]:
    """A real API server over a fake agent, in a thread, so meshctl's blocking I/O can reach it."""
    agent = make_agent()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, object] = {}

    async def serve() -> None:
        runner = web.AppRunner(create_api_app(agent))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        holder["runner"] = runner
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    assert started.wait(10)
    try:
        yield f"http://127.0.0.1:{holder['port']}", agent
    finally:
        runner = holder["runner"]
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_meshctl_members_table_and_json(
    api: tuple[str, FakeAgent], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = api
    assert meshctl.main(["--api", url, "members"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ADDRESS", "STATE", "SITE", "HEALTH", "TAGS"]
    assert lines[1].split() == ["gw1", "127.0.0.1:7003", "alive", "north", "unknown", "role=edge"]
    assert lines[2].split()[:3] == ["gw22", "127.0.0.1:7004", "dead"]

    assert meshctl.main(["members", "--api", url, "--state", "dead", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in doc["members"]] == ["gw22"]
    assert meshctl.main(["members", "--api", url, "--tag", "role=edge", "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)["members"]] == ["gw1"]
    assert meshctl.main(["members", "--api", url, "--state", "zombie"]) == 1
    assert "bad_filter" in capsys.readouterr().err


def test_meshctl_env_and_token(
    api: tuple[str, FakeAgent],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, agent = api
    monkeypatch.setenv("MESHD_API", url.removeprefix("http://"))  # host:port works too
    monkeypatch.delenv("MESHD_API_TOKEN", raising=False)
    assert meshctl.main(["join", "127.0.0.1:7790"]) == 1
    err = capsys.readouterr().err
    assert "401" in err
    assert "--token-file" in err
    token = tmp_path / "api-token"
    token.write_text(agent.api_token + "\n")
    assert meshctl.main(["join", "127.0.0.1:7790", "--token-file", str(token)]) == 0
    assert agent.joined_with == [["127.0.0.1:7790"]]
    capsys.readouterr()
    monkeypatch.setenv("MESHD_API_TOKEN", agent.api_token)
    assert meshctl.main(["join", "127.0.0.1:7792", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"joined": 1}
    monkeypatch.setenv("MESHD_API_TOKEN", "wrong")
    assert meshctl.main(["leave"]) == 1
    assert "403" in capsys.readouterr().err


def test_meshctl_status_keys_version(api: tuple[str, FakeAgent], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = api
    assert meshctl.main(["status", "--api", url]) == 0
    out = capsys.readouterr().out
    assert "gw1" in out
    assert "1h2m5s" in out
    assert "1 alive" in out
    assert meshctl.main(["keys", "list", "--api", url]) == 0
    assert "0a0b0c0d  primary" in capsys.readouterr().out
    assert meshctl.main(["keys", "install", "--api", url]) == 64  # no key given
    assert meshctl.main(["version", "--api", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["client"] == doc["server"]


# --- plumbing of `meshd run` (meshd/systemd.py, meshd/netaddr.py) -------------------------------


def test_sd_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False  # no systemd: a no-op
    for target in (str(tmp_path / "notify"), f"@meshd-test-{os.getpid()}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(target if not target.startswith("@") else "\0" + target[1:])
            monkeypatch.setenv("NOTIFY_SOCKET", target)
            assert sd_notify("READY=1\nSTATUS=up") is True
            assert s.recv(1024) == b"READY=1\nSTATUS=up"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sd_notify("READY=1") is False


def test_advertise_derivation() -> None:
    addr, how = derive_advertise_host()
    ipaddress.ip_address(addr)
    assert how  # the log and /v1/status say how it was chosen


def test_meshctl_releases_watch_prints_changes_until_done(
    api: tuple[str, FakeAgent], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, agent = api
    gw1 = agent.people[0]
    half = member("gw1", addr=gw1.addr, site="north", meta={"rel:fw": "1.0 abababababababab 2/4 #1"})
    whole = member("gw1", addr=gw1.addr, site="north", meta={"rel:fw": "1.0 abababababababab 4/4 #1 current"})
    agent.people[0] = half
    polls: list[float] = []

    def fake_sleep(seconds: float) -> None:  # the node's progress moves between two polls
        polls.append(seconds)
        agent.people[0] = whole

    monkeypatch.setattr(meshctl.time, "sleep", fake_sleep)
    assert meshctl.main(["--api", url, "releases", "--watch", "--until-done", "--interval", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("fw 1.0 site north: 50.0% (0/1 complete, 1 fetching)")
    assert lines[1].endswith("fw 1.0 site north: 100.0% (1/1 complete, 0 fetching)")
    assert polls == [0.5]
