"""SIGHUP on a real `meshd run` with a config file: tags, checks and the log level change while
it runs; a broken file is refused and the node keeps its settings; a changed bind address is
reported as needing a restart. Loopback only; the signal goes to the process this test started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

from tests.processes import Mesh, NodeProc, clean_env, meshd_cmd


def config(node: NodeProc, key: Path, *, bind: str | None = None, body: str) -> str:
    return (
        f'name = "{node.name}"\ncluster = "itest"\nprofile = "local"\nmdns = false\n'
        f'bind = "{bind or node.addr}"\napi = "127.0.0.1:{node.api_port}"\n'
        f'data_dir = "{node.data_dir}"\ncluster_key_file = "{key}"\n' + body
    )


FIRST = """log_level = "info"
[tags]
role = "a"
old = "x"
[[check]]
name = "first"
command = ["true"]
interval = "1h"
"""

SECOND = """log_level = "debug"
[tags]
role = "b"
new = "y"
[[check]]
name = "second"
command = ["true"]
interval = "1h"
"""


class EventLog:
    """The node's /v1/events stream, read on a thread: (event, data) pairs as they come."""

    def __init__(self, url: str) -> None:
        self.events: list[tuple[str, Any]] = []
        self._resp = urllib.request.urlopen(url + "/v1/events", timeout=60)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        event = "message"
        with contextlib.suppress(Exception):  # closed under it at the end (http.client raises anything)
            for raw in self._resp:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    self.events.append((event, json.loads(line[5:])))

    def of(self, kind: str) -> list[Any]:
        return [data for event, data in list(self.events) if event == kind]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._resp.close()


def tags(node: NodeProc) -> dict[str, str]:
    me = [m for m in node.get("/v1/members")["members"] if m["name"] == node.name]
    return dict(me[0]["tags"]) if me else {}


def check_names(node: NodeProc) -> set[str]:
    responses = node.get("/v1/health?node=" + node.name)["responses"]
    return {c["name"] for r in responses for c in r["checks"]}


def poke(node: NodeProc) -> None:
    """A datagram the node drops, saying so at debug level ("dropped packet")."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"not a meshd packet", ("127.0.0.1", node.port))


def reloads(node: NodeProc, result: str) -> float:
    for line in node.text("/metrics").splitlines():
        if line.startswith(f'meshd_config_reloads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return -1.0


def test_sighup_applies_tags_checks_and_log_level_refuses_a_bad_file_and_names_restarts(
    mesh: Mesh,
) -> None:
    node = mesh.node("r1")
    path = mesh.root / "r1.toml"
    path.write_text(config(node, mesh.key_file, body=FIRST))
    with open(node.log_path, "ab") as log:
        node.proc = subprocess.Popen(
            meshd_cmd("run", "--config", str(path)), stdout=log, stderr=subprocess.STDOUT, env=clean_env()
        )
    node.wait_api()
    mesh.wait_until("the first tags", lambda: tags(node) == {"role": "a", "old": "x"})
    assert "first" in check_names(node)
    poke(node)
    mesh.wait_until("the API answers after the datagram", lambda: tags(node) != {})
    assert "dropped packet" not in node.log_tail(200)  # info level
    events = EventLog(node.api_url)
    try:
        # 1. tags, a check and the log level change without a restart.
        path.write_text(config(node, mesh.key_file, body=SECOND))
        os.kill(node.proc.pid, signal.SIGHUP)
        mesh.wait_until("a reload event", lambda: len(events.of("reload")) == 1)
        assert events.of("reload")[0] == {
            "ok": True,
            "applied": ["checks", "log_level", "tags"],
            "restart_needed": [],
            "error": None,
        }
        mesh.wait_until("the new tags", lambda: tags(node) == {"role": "b", "new": "y"})
        names = check_names(node)
        assert "second" in names
        assert "first" not in names
        assert reloads(node, "ok") == 1
        poke(node)
        mesh.wait_until("debug lines in the log", lambda: "dropped packet" in node.log_tail(200))

        # 2. A broken file is refused whole: the node answers with what it had.
        path.write_text(
            config(node, mesh.key_file, body=SECOND.replace('role = "b"', 'role = "c"')) + "[tags\n"
        )
        os.kill(node.proc.pid, signal.SIGHUP)
        mesh.wait_until("a failed reload", lambda: reloads(node, "failed") == 1)
        # The counter is read over HTTP, the event over the stream: either may come first.
        mesh.wait_until("the second reload event", lambda: len(events.of("reload")) == 2)
        failed = events.of("reload")[-1]
        assert failed["ok"] is False
        assert str(path) in failed["error"]
        assert tags(node) == {"role": "b", "new": "y"}
        assert "configuration not reloaded" in node.log_tail(100)
        assert node.running

        # 3. A new bind address needs a restart: said in the log, the node stays where it is.
        path.write_text(config(node, mesh.key_file, bind="127.0.0.1:1", body=SECOND))
        os.kill(node.proc.pid, signal.SIGHUP)
        mesh.wait_until(
            "the restart note", lambda: "SIGHUP: bind changed; restart to apply" in node.log_tail(100)
        )
        mesh.wait_until("the third reload event", lambda: len(events.of("reload")) == 3)
        assert events.of("reload")[-1]["restart_needed"] == ["bind"]
        assert node.get("/v1/status")["addr"] == node.addr

        # 4. meshctl reload does the same through the API (the token is needed).
        done = node.meshctl("reload", token=True)
        assert done.returncode == 0, done.stderr
        assert "restart to apply: bind" in done.stdout
        assert node.meshctl("reload").returncode != 0
        path.write_text("name = \n")
        refused = node.meshctl("reload", token=True)
        assert refused.returncode != 0
        assert "reload_failed" in refused.stderr
        assert reloads(node, "failed") == 2
    finally:
        events.close()
