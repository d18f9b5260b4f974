"""Activation: materialise, atomic switch, hook with rollback, retire, crash at every step."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from meshd.errors import IntegrityError
from meshd.release.activate import ActivationError, Releases
from meshd.release.chunker import StoredChunk, chunk_tree
from meshd.release.manifest import Manifest
from meshd.release.store import ChunkStore

NAME = "agent"


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def version_files(n: int) -> dict[str, bytes]:
    return {
        "bin/agent": (f"agent build {n}\n".encode() + bytes(range(256)) * 200),
        "etc/agent.conf": f"version={n}\n".encode(),
        "share/data.bin": bytes([n % 256]) * 70_000,
    }


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.data = tmp_path / "data"
        self.store = ChunkStore(self.data, fsync=False)
        self.files: dict[str, dict[str, bytes]] = {}

    def publish(self, version: str, files: dict[str, bytes], *, single: bool = False) -> Manifest:
        src = self.tmp / "src" / version
        write_tree(src, files)
        self.files[version] = files
        target = src / next(iter(files)) if single else src

        def sink(c: StoredChunk) -> None:
            self.store.put_stored_unchecked(c.id, c.stored)

        tree = chunk_tree(target, sink)
        return Manifest.build(NAME, version, tree, created=0.0)

    def releases(self, **kw: Any) -> Releases:
        kw.setdefault("fsync", False)
        return Releases(self.data, self.store, **kw)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_current_complete(env: Env, rel: Releases, allowed: set[str | None]) -> str | None:
    cur = rel.current(NAME)
    assert cur in allowed, f"current is {cur}"
    link = env.data / "releases" / NAME / "current"
    if cur is None:
        assert not link.exists()
        return None
    assert os.readlink(link) == cur  # relative link
    assert read_tree(link) == env.files[cur]
    return cur


def test_materialise_and_activate(env: Env) -> None:
    m = env.publish("1.0", version_files(1))
    rel = env.releases()
    res = rel.activate(m)
    assert res.changed and res.previous is None and res.version == "1.0"
    path = env.data / "releases" / NAME / "1.0"
    assert res.path == path
    assert read_tree(path) == version_files(1)
    assert_current_complete(env, rel, {"1.0"})
    assert rel.installed(NAME) == ["1.0"]
    assert rel.release_id(NAME, "1.0") == m.release_id
    again = rel.activate(m)
    assert not again.changed


def test_modes_are_applied(env: Env) -> None:
    files = {"run.sh": b"#!/bin/sh\necho hi\n", "data": b"x"}
    src = env.tmp / "src" / "m"
    write_tree(src, files)
    (src / "run.sh").chmod(0o750)
    (src / "data").chmod(0o600)
    tree = chunk_tree(src, lambda c: env.store.put_stored_unchecked(c.id, c.stored))
    m = Manifest.build(NAME, "1.0", tree, created=0.0)
    path = env.releases().materialise(m)
    assert (path / "run.sh").stat().st_mode & 0o777 == 0o750
    assert (path / "data").stat().st_mode & 0o777 == 0o600


def test_single_file_release(env: Env) -> None:
    m = env.publish("2.1", {"firmware.img": b"\x00\x01" * 50_000}, single=True)
    assert m.single_file
    path = env.releases().activate(m).path
    assert read_tree(path) == {"firmware.img": b"\x00\x01" * 50_000}


def test_switch_between_versions(env: Env) -> None:
    rel = env.releases()
    m1 = env.publish("1.0", version_files(1))
    m2 = env.publish("2.0", version_files(2))
    rel.activate(m1)
    res = rel.activate(m2)
    assert res.previous == "1.0"
    assert_current_complete(env, rel, {"2.0"})
    rel.activate(m1)  # back again: reuses the existing dir
    assert_current_complete(env, rel, {"1.0"})
    assert rel.installed(NAME) == ["2.0", "1.0"]  # by activation order


def test_same_version_with_other_content_is_refused(env: Env) -> None:
    rel = env.releases()
    rel.activate(env.publish("1.0", version_files(1)))
    impostor = env.publish("1.0", version_files(7))
    with pytest.raises(ActivationError, match="already installed with other content"):
        rel.activate(impostor)
    assert rel.current(NAME) == "1.0"
    assert read_tree(env.data / "releases" / NAME / "1.0") == version_files(1)


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
    assert seen["MESHD_RELEASE_DIR"] == vdir and seen["cwd"] == vdir
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


def test_missing_chunk_is_a_clear_error_and_leaves_nothing(env: Env) -> None:
    m1 = env.publish("1.0", version_files(1))
    rel = env.releases()
    rel.activate(m1)
    m2 = env.publish("2.0", version_files(2))
    env.store.delete(m2.files[0].chunks[0])
    with pytest.raises(ActivationError, match="not in the store"):
        rel.activate(m2)
    assert_current_complete(env, rel, {"1.0"})
    assert sorted(p.name for p in (env.data / "releases" / NAME).iterdir()) == [
        ".meta",
        "1.0",
        "current",
    ]


def test_damaged_chunk_raises_integrity_and_is_dropped(env: Env) -> None:
    m = env.publish("1.0", version_files(1))
    cid = m.files[0].chunks[0]
    p = env.store.path_for(cid)
    p.write_bytes(p.read_bytes()[:-1] + b"?")
    with pytest.raises(IntegrityError):
        env.releases().activate(m)
    assert not env.store.has(cid)  # so the node fetches it again
    assert not (env.data / "releases" / NAME / "1.0").exists()


def test_escaping_manifest_writes_nothing(env: Env) -> None:
    m = env.publish("1.0", {"a": b"a" * 100})
    body = orjson.loads(m.canonical_bytes())
    body["files"][0]["path"] = "../../escaped"
    with pytest.raises(ActivationError, match="refusing"):
        env.releases().materialise(Manifest(body))
    assert not (env.data / "escaped").exists()
    assert not (env.data / "releases" / "escaped").exists()


def test_disk_full_while_materialising(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    rel = env.releases()
    rel.activate(env.publish("1.0", version_files(1)))
    m2 = env.publish("2.0", version_files(2))
    real = os.write

    def full(fd: int, data: Any) -> int:
        if len(data) > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(ActivationError, match="disk full"):
        rel.activate(m2)
    monkeypatch.undo()
    assert_current_complete(env, rel, {"1.0"})
    assert not any(p.name.startswith(".tmp") for p in (env.data / "releases" / NAME).iterdir())
    rel.activate(m2)
    assert_current_complete(env, rel, {"2.0"})


def test_keep_last_n_and_gc(env: Env) -> None:
    rel = env.releases(keep=2)
    ms = [env.publish(f"{i}.0", version_files(i)) for i in range(1, 5)]
    for m in ms:
        env.store.put_manifest(m.release_id, m.sign(_key()).to_bytes())
    results = [rel.activate(m) for m in ms]
    assert results[2].retired == ["1.0"] and results[3].retired == ["2.0"]
    assert rel.installed(NAME) == ["3.0", "4.0"]
    assert not env.store.has_manifest(ms[0].release_id)  # retired manifests go too
    keep = results[3].kept_chunks
    assert keep == set(ms[2].chunks) | set(ms[3].chunks)
    removed = env.store.gc(keep)
    assert removed > 0
    assert env.store.missing(keep) == []
    # The retired, GC'd version cannot come back without refetching, the kept one can.
    shutil.rmtree(env.data / "releases" / NAME / "3.0")
    rel.activate(ms[2])
    assert_current_complete(env, rel, {"3.0"})


def test_retire_never_removes_current(env: Env) -> None:
    rel = env.releases(keep=1)
    m1 = env.publish("1.0", version_files(1))
    m2 = env.publish("2.0", version_files(2))
    rel.activate(m1)
    rel.activate(m2)
    assert rel.installed(NAME) == ["2.0"]
    assert rel.retire(NAME, keep=1) == []
    assert_current_complete(env, rel, {"2.0"})


def _key() -> Any:
    import nacl.signing

    return nacl.signing.SigningKey(bytes(range(32)))


# --- crash at every step -----------------------------------------------------------------


class Killed(BaseException):
    """A kill -9 stand-in: not an Exception, so no cleanup handler catches it."""


PATCHED = ["replace", "rename", "symlink", "fsync", "write", "unlink", "mkdir", "fchmod", "open"]


def kill_at(monkeypatch: pytest.MonkeyPatch, n: int) -> Callable[[], int]:
    """Patch os functions so that the n-th call among them raises Killed."""
    calls = 0

    def wrap(name: str) -> None:
        real = getattr(os, name)

        def f(*a: Any, **k: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == n:
                raise Killed(f"killed at call {n} (os.{name})")
            return real(*a, **k)

        monkeypatch.setattr(os, name, f)

    for name in PATCHED:
        wrap(name)
    return lambda: calls


@pytest.mark.parametrize("hook", [None, ["true"]])
def test_kill_at_every_step_leaves_a_complete_current(
    env: Env, monkeypatch: pytest.MonkeyPatch, hook: list[str] | None
) -> None:
    m1 = env.publish("1.0", version_files(1))
    m2 = env.publish("2.0", version_files(2))
    base = env.data / "releases" / NAME
    n = 1
    while True:
        if base.exists():
            shutil.rmtree(base)
        rel = env.releases(hook=hook, fsync=True)
        rel.activate(m1)
        count = kill_at(monkeypatch, n)
        try:
            rel.activate(m2)
            killed = False
        except Killed:
            killed = True
        finally:
            total = count()
            monkeypatch.undo()
        # Right after the kill: current is a complete old or new version.
        assert_current_complete(env, rel, {"1.0", "2.0"})
        # After restart recovery: still complete, no debris, and activation then works.
        fresh = env.releases(hook=hook)
        fresh.recover()
        assert_current_complete(env, fresh, {"1.0", "2.0"})
        names = {p.name for p in base.iterdir()}
        assert not any(x.startswith((".tmp", ".trash")) for x in names), names
        if hook:
            assert not (base / ".meta" / "pending.json").exists()
        fresh.activate(m2)
        assert_current_complete(env, fresh, {"2.0"})
        if not killed:
            break
        n += 1
    print(f"kill points tried: {n}, calls in a full activation: {total}")
    assert n > 10 and total >= n - 1  # every step before completion was tried


def test_kill_during_hook_rolls_back_on_recover(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    m1 = env.publish("1.0", version_files(1))
    m2 = env.publish("2.0", version_files(2))
    rel = env.releases(hook=["true"])
    rel.activate(m1)

    def die(*a: Any, **k: Any) -> Any:
        raise Killed("killed while the hook ran")

    monkeypatch.setattr(subprocess, "Popen", die)
    with pytest.raises(Killed):
        rel.activate(m2)
    monkeypatch.undo()
    assert_current_complete(env, rel, {"2.0"})  # new and complete, but unconfirmed
    actions = env.releases(hook=["true"]).recover()
    assert any("hook never confirmed" in a for a in actions)
    assert_current_complete(env, rel, {"1.0"})
