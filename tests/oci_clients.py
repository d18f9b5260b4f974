"""Real OCI clients for the integration tests: Debian's containerd 1.6 with its own root, state
and socket (CRI off, pulling only from loopback), and the tools' paths (skipped when missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package: see .ci/run)")
    return path


class Containerd:
    """containerd 1.6 with its own root, state and socket, CRI off, pulling only from loopback."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True)
        # A short socket path (a Unix socket's path has at most 107 bytes).
        self.sock_dir = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
        self.sock = self.sock_dir / "c.sock"
        config = tmp / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{tmp / "root"}"\n'
            f'state = "{tmp / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.sock}"\n'
            f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
            '[metrics]\n  address = ""\n'
        )
        self.log = (tmp / "containerd.log").open("wb")
        self.proc = subprocess.Popen(
            [tool("containerd"), "--config", str(config), "--address", str(self.sock)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while self.ctr("version").returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(
                    "containerd did not start:\n" + (tmp / "containerd.log").read_text()[-3000:]
                )
            time.sleep(0.2)

    def ctr(self, *args: str, binary: bool = False) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(
            ["ctr", "--address", str(self.sock), "--namespace", "meshd-test", *args],
            capture_output=True,
            timeout=120,
            text=not binary,
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def containerd_or_skip(tmp: Path) -> Containerd:
    """A started containerd under `tmp`; the test is skipped (with the reason) without ctr or root."""
    tool("ctr")
    if os.geteuid() != 0:
        pytest.skip("containerd needs root (its snapshotter mounts and chowns)")
    return Containerd(tmp)
