"""Rollout progress per site from the members' gossiped `rel:` entries (meshd/release/rollout.py)."""

from __future__ import annotations

from meshd.core.messages import MemberState
from meshd.release.rollout import rollout
from tests.fakes import member

A = "aaaaaaaaaaaaaaaa"
B = "bbbbbbbbbbbbbbbb"


def rel(version: str, rid16: str, have: int, total: int, seq: int = 1, current: bool = False) -> str:
    return f"{version} {rid16} {have}/{total} #{seq}" + (" current" if current else "")


def test_progress_is_summed_per_site_over_alive_members() -> None:
    rows = rollout(
        [
            member("n1", site="north", meta={"rel:fw": rel("1.0", A, 10, 10, current=True)}),
            member("n2", site="north", meta={"rel:fw": rel("1.0", A, 5, 10)}),
            member("n3", site="north"),  # announces nothing yet
            member("s1", site="south", meta={"rel:fw": rel("1.0", A, 0, 10)}),
        ]
    )
    assert len(rows) == 1
    row = rows[0]
    assert (row["name"], row["version"], row["id"], row["seq"], row["chunks"]) == ("fw", "1.0", A, 1, 10)
    assert row["sites"]["north"] == {
        "nodes": 3,
        "complete": 1,
        "fetching": 1,
        "waiting": 1,
        "current": 1,
        "have_chunks": 15,
        "total_chunks": 20,
        "percent": 75.0,
        "down": [],
    }
    assert row["sites"]["south"]["percent"] == 0.0
    assert row["sites"]["south"]["fetching"] == 1
    assert row["nodes"] == 3
    assert row["complete"] == 1
    assert row["percent"] == 50.0


def test_a_dead_member_is_listed_but_does_not_hold_the_percent_back() -> None:
    rows = rollout(
        [
            member("n1", site="north", meta={"rel:fw": rel("1.0", A, 10, 10)}),
            member("n2", MemberState.DEAD, site="north", meta={"rel:fw": rel("1.0", A, 2, 10)}),
        ]
    )
    north = rows[0]["sites"]["north"]
    assert north["percent"] == 100.0
    assert north["nodes"] == 1
    assert north["down"] == ["n2"]
    assert rows[0]["percent"] == 100.0


def test_a_release_only_dead_members_announce_is_visible_at_zero() -> None:
    rows = rollout([member("n2", MemberState.DEAD, site="x", meta={"rel:fw": rel("1.0", A, 10, 10)})])
    assert rows[0]["sites"]["x"]["down"] == ["n2"]
    assert rows[0]["sites"]["x"]["nodes"] == 0
    assert rows[0]["percent"] == 0.0


def test_releases_are_ordered_by_name_then_seq_and_bad_entries_skipped() -> None:
    meta = {
        "rel:fw": ";".join([rel("2.0", B, 1, 4, seq=2), rel("1.0", A, 4, 4, seq=1)]),
        "rel:cfg": "garbage",
        "site": "default",
    }
    rows = rollout([member("n1", meta=meta)])
    assert [(r["name"], r["version"]) for r in rows] == [("fw", "1.0"), ("fw", "2.0")]
    assert rows[1]["sites"]["default"]["percent"] == 25.0


def test_no_announcements_no_rows() -> None:
    assert rollout([member("n1", site="north")]) == []
