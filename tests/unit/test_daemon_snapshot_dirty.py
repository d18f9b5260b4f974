"""The peer snapshot is rewritten only when what it records changes (not on metadata updates)."""

from __future__ import annotations

from pathlib import Path

from meshd.config import NodeConfig
from meshd.core.effects import MemberEvent
from meshd.core.messages import MemberState
from meshd.daemon import Daemon
from tests.fakes import member


def test_metadata_only_updates_do_not_dirty_the_snapshot(tmp_path: Path) -> None:
    d = Daemon(NodeConfig(name="me", data_dir=str(tmp_path)))
    dirty = d._snapshot_dirty

    def event(kind: str, meta: dict[str, str], **kw: object) -> bool:
        dirty.clear()
        d._on_event(MemberEvent(kind, member("p", node_id="id-p", meta=meta, **kw)))  # type: ignore[arg-type]
        return dirty.is_set()

    assert event("join", {"rel:app": "1.0 0123456789abcdef 0/10"})  # a new member: written
    # A release's progress, every second while it downloads: nothing the snapshot keeps.
    assert not event("update", {"rel:app": "1.0 0123456789abcdef 3/10"})
    assert not event("update", {"rel:app": "1.0 0123456789abcdef 7/10", "relbm:0123456789abcdef": "AA=="})
    assert event("update", {}, addr="127.0.0.1:2")  # a new address: written
    # Suspicion, and the member clearing it, rewrite nothing at once: a busy mesh flaps.
    assert not event("suspect", {}, state=MemberState.SUSPECT, addr="127.0.0.1:2")
    assert not event("alive", {}, addr="127.0.0.1:2")
    assert event("dead", {}, state=MemberState.DEAD, addr="127.0.0.1:2")
    assert event("reap", {}, state=MemberState.DEAD, addr="127.0.0.1:2")
    assert event("join", {}, addr="127.0.0.1:2")  # after a reap it is new again
