"""Activation hooks for real: a hook process gets its environment, a failing or hanging one rolls
back, a timed-out one is killed with its children, and a kill at every step with a hook still
leaves a complete release current."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import orjson
import pytest

from meshd.release.activate import ActivationError, Releases
from meshd.release.manifest import Manifest
from tests.activation import NAME, Env, assert_current_complete, kill_at_every_step, version_files

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_hook_gets_env_and_success(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "hook.json"
    code = (
        "import os, json, sys; "
        "json.dump({k: v for k, v in os.environ.items() if k.startswith('MESHD_RELEASE')} "
        "| {'cwd': os.getcwd()}, open(sys.argv[1], 'w'))"
    )
    rel = env.releases(hook=[sys.executable, "-c", code, str(out)])
    m1 = env.publish("1.0", version_files(1))
    m2 = env.publish("2.0", version_files(2))
    rel.activate(m1)
    rel.activate(m2)
    seen = orjson.loads(out.read_bytes())
    vdir = str(env.data / "releases" / NAME / "2.0")
    assert seen["MESHD_RELEASE_NAME"] == NAME
    assert seen["MESHD_RELEASE_VERSION"] == "2.0"
    assert seen["MESHD_RELEASE_ID"] == m2.release_id
    assert seen["MESHD_RELEASE_DIR"] == vdir
    assert seen["cwd"] == vdir
    assert seen["MESHD_RELEASE_PREVIOUS"] == "1.0"
    assert not (env.data / "releases" / NAME / ".meta" / "pending.json").exists()


@pytest.mark.parametrize(
    ("hook", "timeout", "message"),
    [
        ([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 10.0, "exited with 3: boom"),
        ([sys.executable, "-c", "import time; time.sleep(30)"], 0.3, "timed out"),
        (["/nonexistent/hook"], 10.0, "cannot run"),
    ],
)
def test_failing_hook_rolls_back(env: Env, hook: list[str], timeout: float, message: str) -> None:
    m1 = env.publish("1.0", version_files(1))
    m2 = env.publish("2.0", version_files(2))
    env.releases().activate(m1)
    rel = env.releases(hook=hook, hook_timeout=timeout)
    with pytest.raises(ActivationError, match=message) as info:
        rel.activate(m2)
    assert "rolled back to 1.0" in str(info.value)
    assert_current_complete(env, rel, {"1.0"})
    assert not (env.data / "releases" / NAME / ".meta" / "pending.json").exists()


def test_hook_timeout_kills_its_children(env: Env, tmp_path: Path) -> None:
    marker = tmp_path / "child-ran"
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep(1.5)\nopen({str(marker)!r}, 'w').close()\n")
    parent = tmp_path / "hook.py"
    parent.write_text(
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(child)!r}])\ntime.sleep(30)\n"
    )
    rel = env.releases(hook=[sys.executable, str(parent)], hook_timeout=0.5)
    with pytest.raises(ActivationError, match="timed out"):
        rel.activate(env.publish("1.0", version_files(1)))
    subprocess.run([sys.executable, "-c", "import time; time.sleep(1.5)"], check=True)
    assert not marker.exists()


def test_failing_hook_on_first_install_leaves_no_current(env: Env) -> None:
    rel = env.releases(hook=["false"])
    with pytest.raises(ActivationError, match="no version is current"):
        rel.activate(env.publish("1.0", version_files(1)))
    assert rel.current(NAME) is None


def test_kill_at_every_step_with_a_hook_leaves_a_complete_current(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    kill_at_every_step(env, monkeypatch, hook=["true"])


def _activate_traced(rel: Releases, manifest: Manifest) -> tuple[list[str], int]:
    """Activate; the activation errors, and the peak bytes Python allocated meanwhile (the
    hook's output would show up there)."""
    errors: list[str] = []
    tracemalloc.start()
    try:
        rel.activate(manifest)
    except ActivationError as e:
        errors.append(str(e))
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return errors, peak


def test_hook_output_is_bounded_and_its_tail_quoted(env: Env) -> None:
    # ~50 MB of output, then the line that says why it failed: only the tail is kept.
    code = (
        "import sys; out = sys.stdout.buffer\n"
        "for _ in range(800): out.write(b'x' * 65535 + b'\\n')\n"
        "out.write(b'the real reason\\n'); sys.exit(1)"
    )
    rel = env.releases(hook=[sys.executable, "-c", code], hook_timeout=60.0)
    manifest = env.publish("1.0", version_files(1))
    rel.materialise(manifest)  # so the measure below is the hook's, not the build's
    errors, peak = _activate_traced(rel, manifest)
    assert len(errors) == 1
    assert "exited with 1" in errors[0]
    assert errors[0].endswith("xxx\nthe real reason; no version is current")
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while the hook wrote 50 MB"


def test_hook_writing_forever_is_killed_at_the_timeout(env: Env) -> None:
    code = "import sys\nwhile True: sys.stdout.buffer.write(b'y' * 65536)"
    rel = env.releases(hook=[sys.executable, "-c", code], hook_timeout=1.0)
    manifest = env.publish("1.0", version_files(1))
    rel.materialise(manifest)
    errors, peak = _activate_traced(rel, manifest)
    assert len(errors) == 1
    assert "timed out after 1s" in errors[0]
    assert peak < 4 * 1024 * 1024
    assert rel.current(NAME) is None
