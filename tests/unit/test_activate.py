"""Activation: materialise, atomic switch, hook with rollback, retire, crash at every step."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from meshd.errors import IntegrityError
from meshd.release.activate import ActivationError, _read_tail
from meshd.release.chunker import chunk_tree
from meshd.release.manifest import Manifest
from tests.activation import (
    NAME,
    Env,
    Killed,
    assert_current_complete,
    kill_at_every_step,
    read_tree,
    version_files,
    write_tree,
)
from tests.fakes import rot_chunk


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_materialise_and_activate(env: Env) -> None:
    m = env.publish("1.0", version_files(1))
    rel = env.releases()
    res = rel.activate(m)
    assert res.changed
    assert res.previous is None
    assert res.version == "1.0"
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
    rot_chunk(env.store, cid)
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
    assert results[2].retired == ["1.0"]
    assert results[3].retired == ["2.0"]
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


def test_kill_at_every_step_leaves_a_complete_current(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    kill_at_every_step(env, monkeypatch, hook=None)  # with a hook: tests/integration/test_activation_hooks.py


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


def test_read_tail_keeps_only_the_end_and_honours_the_deadline() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"a" * 30_000 + b"the end")
        os.close(w)
        w = -1
        assert _read_tail(r, 60.0, 10, clock=lambda: 0.0) == (b"aaathe end", True)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    r, w = os.pipe()
    try:
        os.write(w, b"partial")
        # data, then a select that times out, then the deadline passes with the pipe still open
        ticks = iter([0.0, 0.999, 5.0])
        assert _read_tail(r, 1.0, 100, clock=lambda: next(ticks)) == (b"partial", False)
    finally:
        os.close(r)
        os.close(w)
