"""Helpers for tests with real processes and sockets: `meshd run` processes on 127.0.0.1 with free
ports, a generated key and no mDNS (Mesh, NodeProc), and free_port for tests that bind sockets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

START_TIMEOUT = 20.0


def free_port() -> int:
    """A port free for both UDP and TCP (gossip and peer HTTP share the number)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


def clean_env() -> dict[str, str]:
    """The environment without MESHD_* settings of whoever runs the tests."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}


def meshd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshd.cli.meshd", *args]


def meshctl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshd.cli.meshctl", *args]


class NodeProc:
    def __init__(self, mesh: Mesh, name: str, key_file: Path | None, data_dir: Path) -> None:
        self.mesh = mesh
        self.name = name
        self.key_file = key_file
        self.data_dir = data_dir
        self.port = free_port()
        self.api_port = free_port()
        self.log_path = mesh.root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def token(self) -> str:
        return (self.data_dir / "api-token").read_text().strip()

    def start(self, join: list[str] | None = None, extra: list[str] | None = None) -> NodeProc:
        args = [
            "run",
            "--name",
            self.name,
            "--bind",
            self.addr,
            "--api",
            f"127.0.0.1:{self.api_port}",
            "--data-dir",
            str(self.data_dir),
            "--cluster",
            "itest",
            "--profile",
            "local",
            "--no-mdns",
            "--log-level",
            "debug",
        ]
        if self.key_file is not None:
            args += ["--cluster-key-file", str(self.key_file)]
        for j in join or []:
            args += ["--join", j]
        args += extra or []
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                meshd_cmd(*args), stdout=log, stderr=subprocess.STDOUT, env=clean_env()
            )
        self.wait_api()
        return self

    def wait_api(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n" + self.log_tail())
            with contextlib.suppress(OSError, ValueError):
                urllib.request.urlopen(self.api_url + "/healthz", timeout=1).close()
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} API did not come up:\n" + self.log_tail())

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.api_url + path, timeout=5) as resp:
            return json.loads(resp.read())

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.api_url + path, timeout=5) as resp:
            return str(resp.read().decode())

    def status_code(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.api_url + path, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    def states(self) -> dict[str, str]:
        """name -> state as this node sees the mesh ({} if its API does not answer)."""
        try:
            return {m["name"]: m["state"] for m in self.get("/v1/members")["members"]}
        except (OSError, ValueError):
            return {}

    def meshctl(self, *args: str, token: bool = False) -> subprocess.CompletedProcess[str]:
        extra = ["--api", self.api_url]
        if token:
            extra += ["--token-file", str(self.data_dir / "api-token")]
        return subprocess.run(
            meshctl_cmd(*args, *extra), capture_output=True, text=True, timeout=60, env=clean_env()
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Mesh:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key_file = self.keygen("cluster.key")
        self.nodes: list[NodeProc] = []

    def keygen(self, name: str) -> Path:
        path = self.root / name
        self.run_meshd("keygen", "cluster", "--out", str(path), check=True)
        return path

    def run_meshd(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            meshd_cmd(*args), capture_output=True, text=True, timeout=30, env=clean_env(), check=check
        )

    def node(self, name: str, key_file: Path | None = None, insecure: bool = False) -> NodeProc:
        key = None if insecure else (key_file or self.key_file)
        n = NodeProc(self, name, key, self.root / name)
        self.nodes.append(n)
        return n

    def wait_until(self, what: str, pred: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {n.name} ---\n{n.log_tail(15)}" for n in self.nodes)
        views = "\n".join(f"{n.name}: {n.states()}" for n in self.nodes if n.running)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{views}\n{logs}")

    def stop_all(self) -> None:
        for n in self.nodes:
            if n.running:
                n.signal(signal.SIGKILL)
        for n in self.nodes:
            if n.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    n.proc.wait(10)


InProcessStarter = Callable[..., Awaitable[Any]]
