"""The shipped systemd unit: it loads (`systemd-analyze verify`), its sandbox scores an exposure of
2.0 or less (`systemd-analyze security --offline=yes`), it says what the README promises, and
the sysusers.d file creates the user it runs as."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "meshd.service"
SYSUSERS = ROOT / "packaging" / "sysusers.d" / "meshd.conf"
EXEC = "/opt/meshd/bin/meshd"
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.packaging


def directives(text: str) -> dict[str, list[str]]:
    """Key -> every value, in order (a unit may repeat a key, e.g. SystemCallFilter=)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/bin/{name}") if Path(p).exists()), None
    )
    if path is None:
        print(f"SKIP: {name} not installed (Debian package systemd; .ci/run installs it)")
        pytest.skip(f"{name} not installed (Debian package systemd)")
    return path


def test_the_unit_runs_meshd_as_the_readme_says() -> None:
    d = directives(UNIT.read_text())
    assert d["ExecStart"] == [f"{EXEC} run --config /etc/meshd/meshd.toml"]
    assert EXEC in (ROOT / "README.md").read_text()
    assert d["Type"] == ["notify"]
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["2"]  # meshd's exit code for a bad configuration
    assert d["WatchdogSec"] == ["30s"]
    assert d["MemoryMax"] == ["512M"]
    assert d["StateDirectory"] == ["meshd"]
    assert d["ConfigurationDirectory"] == ["meshd"]
    assert d["User"] == ["meshd"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["AmbientCapabilities"] == [""]
    assert d["ProtectSystem"] == ["strict"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["SystemCallFilter"][0] == "@system-service"
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    # verify checks that ExecStart's binary exists: point it at a stand-in.
    stub = tmp_path / "bin" / "meshd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "meshd.service"
    unit.write_text(UNIT.read_text().replace(EXEC, str(stub)))
    run = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "meshd.service" not in output, output  # no warning about our unit either


def test_systemd_analyze_verify_fails_when_the_binary_is_missing(tmp_path: Path) -> None:
    # The check above means something: verify does refuse a unit it cannot run.
    analyze = tool("systemd-analyze")
    unit = tmp_path / "meshd.service"
    unit.write_text(UNIT.read_text().replace(EXEC, str(tmp_path / "missing")))
    run = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode != 0
    assert "is not executable" in run.stdout + run.stderr


def test_exposure_score_is_at_most_two() -> None:
    analyze = tool("systemd-analyze")
    run = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = run.stdout + run.stderr
    match = re.search(r"Overall exposure level for meshd\.service: (\d+(?:\.\d+)?)", output)
    assert match, output
    score = float(match[1])
    print(f"systemd-analyze security --offline=yes {UNIT.name}: exposure {score}")
    assert score <= MAX_EXPOSURE, output


def test_sysusers_creates_the_user_the_unit_runs_as(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    run = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    users = {
        line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    user = directives(UNIT.read_text())["User"][0]
    assert users[user][5] == "/var/lib/meshd"  # home: the StateDirectory
    assert users[user][6] == "/usr/sbin/nologin"
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert directives(UNIT.read_text())["Group"][0] in groups
