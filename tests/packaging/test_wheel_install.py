"""The wheel installs into a fresh virtual environment from nothing but the package registry, and
its entry points run: what the README's gateway steps do with `make dist`'s wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Building fetches setuptools, installing fetches meshd's dependencies: bounded, not hung.
STEP_TIMEOUT = 600

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(3 * STEP_TIMEOUT)]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_wheel_installs_into_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    # A copy of what the build reads, so the checkout gets no build/ or egg-info from this test.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("meshd", "packaging"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(src)], tmp_path)
    (wheel,) = wheels.glob("meshd-*.whl")

    target = tmp_path / "venv"
    venv.create(target, with_pip=True, clear=True)
    bin_dir = target / "bin"
    # Nothing from the test's own environment leaks in: no PYTHONPATH pointing at the checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    run(
        [str(bin_dir / "pip"), "install", "--quiet", "--disable-pip-version-check", str(wheel)], tmp_path, env
    )

    version = run([str(bin_dir / "meshd"), "--version"], tmp_path, env)
    assert version.startswith("meshd 0.1.0 (protocol "), version
    assert "publish" in run([str(bin_dir / "meshctl"), "--help"], tmp_path, env)
    # The dashboard's assets and the type marker are in the wheel, and meshd comes from the venv.
    probe = (
        "import importlib.resources as r, meshd; "
        "print(meshd.__file__); "
        "print(r.files('meshd').joinpath('py.typed').is_file()); "
        "print(any(r.files('meshd.api').joinpath('static').iterdir()))"
    )
    where, typed, static = run([str(bin_dir / "python"), "-c", probe], tmp_path, env).split()
    assert where.startswith(str(target)), where
    assert (typed, static) == ("True", "True")

    # The shipped example configuration validates with the installed meshd (a key made by it).
    key = tmp_path / "cluster.key"
    run([str(bin_dir / "meshd"), "keygen", "cluster", "--out", str(key)], tmp_path, env)
    config = tmp_path / "meshd.toml"
    config.write_text(
        (ROOT / "packaging" / "meshd.toml")
        .read_text()
        .replace("/etc/meshd/cluster.key", str(key))
        .replace("/var/lib/meshd", str(tmp_path / "data"))
    )
    out = run([str(bin_dir / "meshd"), "validate-config", "--config", str(config)], tmp_path, env)
    assert f"{config}: ok (node gw1" in out
