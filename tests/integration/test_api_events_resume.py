"""GET /v1/events on a real `meshd run`: a client that disconnects and comes back with
Last-Event-ID gets the events it missed, in order, before live ones; after the daemon restarts
the same id starts the stream with a reset."""

from __future__ import annotations

import base64
import http.client
import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from tests.processes import Mesh, NodeProc, clean_env, meshctl_cmd


class EventStream:
    """A raw SSE reader: frames as dicts of their fields ("id", "event", "data", "retry")."""

    def __init__(self, node: NodeProc, last_event_id: str | None = None) -> None:
        url = urlsplit(node.api_url)
        assert url.hostname is not None
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=15)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", "/v1/events", headers=headers)
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200

    def frame(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        while True:
            line = self.resp.readline().decode().rstrip("\r\n")
            if not line:
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                fields.setdefault("comment", line[1:].strip())
                continue
            name, _, value = line.partition(":")
            fields[name] = value.lstrip()

    def event(self, *names: str) -> dict[str, str]:
        """The next frame that is an event (keepalives and comments skipped), of one of `names`
        if given: a node's own metadata updates (a member event) may come at any moment."""
        while True:
            f = self.frame()
            if "event" in f and (not names or f["event"] in names):
                return f

    def close(self) -> None:
        self.conn.close()


def install_key(node: NodeProc) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=10)
    body = json.dumps({"op": "install", "key": base64.b64encode(os.urandom(32)).decode()})
    conn.request(
        "POST",
        "/v1/keys",
        body=body,
        headers={"Authorization": f"Bearer {node.token}", "Content-Type": "application/json"},
    )
    assert conn.getresponse().status == 200
    conn.close()


def test_a_client_that_comes_back_gets_what_it_missed_and_a_reset_after_a_restart(mesh: Mesh) -> None:
    node = mesh.node("ev1").start()
    stream = EventStream(node)
    hello = stream.frame()
    assert hello["retry"] == "2000"
    boot, _, seq = hello["id"].rpartition("-")
    assert boot
    assert seq.isdigit()
    stream.close()

    install_key(node)  # a keyring event each, while nobody listens
    install_key(node)
    stream = EventStream(node, last_event_id=hello["id"])
    missed = [stream.event("keyring", "reset"), stream.event("keyring", "reset")]
    assert [f["event"] for f in missed] == ["keyring", "keyring"]
    ids = [int(f["id"].rpartition("-")[2]) for f in missed]
    assert all(f["id"].startswith(boot + "-") for f in missed)
    assert int(seq) < ids[0] < ids[1]
    install_key(node)  # then live ones
    live = stream.event("keyring", "reset")
    assert live["event"] == "keyring"
    assert int(live["id"].rpartition("-")[2]) > ids[1]
    stream.close()

    node.signal(signal.SIGTERM)
    assert node.wait_exit() == 0
    node.start()
    stream = EventStream(node, last_event_id=live["id"])  # an id of the run before
    reset = stream.event()
    assert reset["event"] == "reset"
    assert json.loads(reset["data"])["last_event_id"] == live["id"]
    assert not reset["id"].startswith(boot + "-")
    stream.close()


def test_meshctl_monitor_reconnects_after_a_restart_and_says_events_were_missed(mesh: Mesh) -> None:
    node = mesh.node("ev2").start()
    proc = subprocess.Popen(
        meshctl_cmd("monitor", "--json", "--api", node.api_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=clean_env(),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pipe, args=(proc, lines), daemon=True).start()
    try:
        mesh.wait_until("monitor's stream", lambda: _streams(node) == 1)
        install_key(node)
        assert _next_line(lines, lambda doc: doc.get("kind") == "keyring")
        node.signal(signal.SIGTERM)
        assert node.wait_exit() == 0
        node.start()
        # Its last id is of the run before: the new stream starts with a reset, then goes on.
        assert _next_line(lines, lambda doc: "detail" in doc, timeout=30)["detail"]
        mesh.wait_until("monitor back", lambda: _streams(node) == 1)
        install_key(node)
        assert _next_line(lines, lambda doc: doc.get("kind") == "keyring")
    finally:
        proc.kill()
        proc.wait(10)


def _pipe(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    for line in proc.stdout or ():
        lines.put(line)


def _next_line(
    lines: queue.Queue[str], wanted: Callable[[dict[str, object]], bool], timeout: float = 15
) -> dict[str, object]:
    """The next monitor line that is `wanted`: the node's own metadata updates may come first."""
    while True:
        doc: dict[str, object] = json.loads(lines.get(timeout=timeout))
        if wanted(doc):
            return doc


def _streams(node: NodeProc) -> int:
    for line in node.text("/metrics").splitlines():
        if line.startswith("meshd_api_event_streams "):
            return int(float(line.split()[1]))
    return 0
