"""Helpers for the activation tests: releases published into a store, trees compared, and a
kill -9 stand-in at every file operation of an activation."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshd.release.activate import Releases
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


def kill_at_every_step(env: Env, monkeypatch: pytest.MonkeyPatch, hook: list[str] | None) -> None:
    """Kill activation at its n-th file operation, for n = 1, 2, ... until one runs through: right
    after each kill and after restart recovery, a complete version is current."""
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
    assert n > 10
    assert total >= n - 1
