"""`meshd` and `meshctl` argument handling, exit codes and output (meshctl over a live fake API)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from meshd.api.app import create_api_app
from meshd.cli import meshctl
from meshd.cli import meshd as meshd_cli
from meshd.core.messages import MemberState
from meshd.metrics import Exposition, TransferStats

# --- meshd -----------------------------------------------------------------------------------


def test_run_flags_parse_repeatable() -> None:
    args = meshd_cli.build_parser().parse_args(
        ["run", "--name", "a", "--join", "h1:1", "--join", "h2:2", "--tag", "a=1", "--tag",
         "b=2", "--no-mdns", "--profile", "local", "--mdns-interface", "198.18.0.1"]
    )
    assert args.join == ["h1:1", "h2:2"]
    assert args.tag == ["a=1", "b=2"]
    assert args.no_mdns is True and args.insecure is None
    assert args.site is None  # not given: the environment or the file may set it


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["run", "--profile", "moon"],
        ["run", "--bogus"],
        ["keygen", "cluster"],
        ["keygen", "symmetric", "--out", "x"],
        ["frobnicate"],
    ],
)
def test_meshd_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        meshd_cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_meshd_config_error_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("MESHD_"):
            monkeypatch.delenv(k)
    rc = meshd_cli.main(["run", "--bind", "nowhere", "--data-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("meshd: error: --bind") and err.count("\n") == 1
    rc = meshd_cli.main(["run", "--insecure", "--bind", "0.0.0.0:7788", "--data-dir",
                         str(tmp_path)])
    assert rc == 2
    assert "--insecure" in capsys.readouterr().err


def test_keygen_cluster_and_publisher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cluster.key"
    assert meshd_cli.main(["keygen", "cluster", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert len(base64.b64decode(out.read_text().strip())) == 32
    assert meshd_cli.main(["keygen", "cluster", "--out", str(out)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert meshd_cli.main(["keygen", "cluster", "--out", str(out), "--force"]) == 0

    pub = tmp_path / "publisher.key"
    assert meshd_cli.main(["keygen", "publisher", "--out", str(pub)]) == 0
    assert stat.S_IMODE(pub.stat().st_mode) == 0o600
    assert len(base64.b64decode((tmp_path / "publisher.key.pub").read_text().strip())) == 32
    assert meshd_cli.main(["keygen", "cluster", "--out", str(tmp_path / "no/such/dir/k")]) == 2


def test_validate_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('name = "gw1"\nbind = "127.0.0.1:7788"\ninsecure = true\n')
    assert meshd_cli.main(["validate-config", "--config", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "gw1"\nprofle = "lan"\n')
    assert meshd_cli.main(["validate-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "profle" in err and str(bad) in err
    missing_key = tmp_path / "k.toml"
    missing_key.write_text(f'cluster_key_file = "{tmp_path / "nokey"}"\n')
    assert meshd_cli.main(["validate-config", "--config", str(missing_key)]) == 2
    assert "cluster key file" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert meshd_cli.main(["version"]) == 0
    assert capsys.readouterr().out.startswith("meshd 0.")


# --- meshctl -----------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_meshctl_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    assert meshctl.main(["--api", url, "members"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach meshd at {url}" in err


@pytest.mark.parametrize(
    "argv",
    [[], ["members", "--bogus"], ["keys", "rotate"], ["join"], ["frobnicate"]],
)
def test_meshctl_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        meshctl.main(argv)
    assert e.value.code == 64  # 2 is kept for "a node is critical or missing"


def test_meshctl_bad_api_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert meshctl.main(["--api", "ftp://x", "status"]) == 64
    assert "--api" in capsys.readouterr().err


def test_table_alignment() -> None:
    text = meshctl.table([["a", "127.0.0.1:1"], ["long-name", "x"]], ["NAME", "ADDRESS"])
    lines = text.splitlines()
    assert lines[0] == "NAME       ADDRESS"
    assert lines[1] == "a          127.0.0.1:1"
    assert lines[2] == "long-name  x"


class _Member:
    def __init__(self, name: str, state: MemberState, site: str, tags: dict[str, str]) -> None:
        self.name, self.state = name, state
        self.node_id = name * 4
        self.addr = f"127.0.0.1:{7000 + len(name)}"
        self.incarnation = 1
        self.meta = {"site": site, **{f"tag:{k}": v for k, v in tags.items()}}


class _Agent:
    name, node_id, cluster, site = "gw1", "ab" * 16, "c", "north"
    addr, addr_source, api_token = "127.0.0.1:7788", "bind address", "tok-123456789012345"
    transfer = TransferStats()

    def __init__(self) -> None:
        self.people = [_Member("gw1", MemberState.ALIVE, "north", {"role": "edge"}),
                       _Member("gw22", MemberState.DEAD, "south", {})]
        self.joined: list[list[str]] = []

    def uptime(self) -> float:
        return 3725.0

    def is_ready(self) -> bool:
        return True

    def readiness_detail(self) -> str:
        return "joined"

    def members(self) -> list[_Member]:
        return self.people

    def subscribe(self) -> object:
        raise NotImplementedError

    async def join(self, addrs: list[str]) -> int:
        self.joined.append(addrs)
        return len(addrs)

    def request_leave(self) -> None:
        pass

    def keys(self) -> tuple[list[str], str] | None:
        return ["0a0b0c0d"], "0a0b0c0d"

    def key_op(self, op: str, key: bytes) -> None:
        pass

    def collect_metrics(self, out: Exposition) -> None:
        pass


@pytest.fixture
def api() -> Iterator[tuple[str, _Agent]]:
    """A real API server over a fake agent, in a thread, so meshctl's blocking I/O can reach it."""
    agent = _Agent()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, object] = {}

    async def serve() -> None:
        runner = web.AppRunner(create_api_app(agent))  # type: ignore[arg-type]
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


def test_meshctl_members_table_and_json(api: tuple[str, _Agent],
                                        capsys: pytest.CaptureFixture[str]) -> None:
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


def test_meshctl_env_and_token(api: tuple[str, _Agent], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    url, agent = api
    monkeypatch.setenv("MESHD_API", url.removeprefix("http://"))  # host:port works too
    monkeypatch.delenv("MESHD_API_TOKEN", raising=False)
    assert meshctl.main(["join", "127.0.0.1:7790"]) == 1
    err = capsys.readouterr().err
    assert "401" in err and "--token-file" in err
    token = tmp_path / "api-token"
    token.write_text(agent.api_token + "\n")
    assert meshctl.main(["join", "127.0.0.1:7790", "--token-file", str(token)]) == 0
    assert agent.joined == [["127.0.0.1:7790"]]
    capsys.readouterr()
    monkeypatch.setenv("MESHD_API_TOKEN", agent.api_token)
    assert meshctl.main(["join", "127.0.0.1:7792", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"joined": 1}
    monkeypatch.setenv("MESHD_API_TOKEN", "wrong")
    assert meshctl.main(["leave"]) == 1
    assert "403" in capsys.readouterr().err


def test_meshctl_status_keys_version(api: tuple[str, _Agent],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = api
    assert meshctl.main(["status", "--api", url]) == 0
    out = capsys.readouterr().out
    assert "gw1" in out and "1h2m5s" in out and "1 alive" in out
    assert meshctl.main(["keys", "list", "--api", url]) == 0
    assert "0a0b0c0d  primary" in capsys.readouterr().out
    assert meshctl.main(["keys", "install", "--api", url]) == 64  # no key given
    assert meshctl.main(["version", "--api", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["client"] == doc["server"]


# --- plumbing of `meshd run` (meshd/daemon.py helpers) -----------------------------------------


def test_sd_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshd import daemon

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert daemon.sd_notify("READY=1") is False  # no systemd: a no-op
    for target in (str(tmp_path / "notify"), f"@meshd-test-{os.getpid()}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(target if not target.startswith("@") else "\0" + target[1:])
            monkeypatch.setenv("NOTIFY_SOCKET", target)
            assert daemon.sd_notify("READY=1\nSTATUS=up") is True
            assert s.recv(1024) == b"READY=1\nSTATUS=up"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert daemon.sd_notify("READY=1") is False


def test_data_dir_and_token(tmp_path: Path) -> None:
    from meshd import daemon

    d = daemon.prepare_data_dir(str(tmp_path / "a" / "b"))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    token = daemon.load_or_create_token(d)
    assert len(token) >= 32
    assert stat.S_IMODE((d / "api-token").stat().st_mode) == 0o600
    assert daemon.load_or_create_token(d) == token  # created once


def test_advertise_derivation() -> None:
    import ipaddress

    from meshd import daemon

    addr, how = daemon.derive_advertise_host("0.0.0.0")
    ipaddress.ip_address(addr)
    assert how  # the log and /v1/status say how it was chosen
