"""`meshctl releases --watch`: the per-site table, the line per change, when it is done."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.cli import meshctl, meshctl_rollout


def site(
    percent: float, complete: int, fetching: int, nodes: int = 2, down: list[str] | None = None
) -> dict[str, Any]:
    return {
        "nodes": nodes,
        "complete": complete,
        "fetching": fetching,
        "waiting": nodes - complete - fetching,
        "current": complete,
        "have_chunks": 0,
        "total_chunks": 0,
        "percent": percent,
        "down": down or [],
    }


def doc(north: dict[str, Any], south: dict[str, Any] | None = None, version: str = "1.0") -> dict[str, Any]:
    sites = {"north": north} | ({"south": south} if south else {})
    complete = sum(s["complete"] for s in sites.values())
    return {
        "releases": [
            {
                "name": "fw",
                "version": version,
                "id": "ab" * 8,
                "seq": 1,
                "chunks": 4,
                "sites": sites,
                "nodes": 2,
                "complete": complete,
                "percent": 0.0,
            }
        ]
    }


def test_table_has_a_row_per_release_and_site() -> None:
    text = meshctl_rollout.table_text(doc(site(50.0, 1, 1), site(100.0, 2, 0, down=["s9"])))
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "ID", "SITE", "PROGRESS", "NODES"]
    assert lines[1].split()[3:] == [
        "north",
        "[##########----------]",
        "50.0%",
        "1/2",
        "complete,",
        "1",
        "fetching",
    ]
    assert (
        lines[2].split(maxsplit=3)[3]
        == "south  [####################] 100.0%  2/2 complete, 0 fetching, down: s9"
    )
    assert meshctl_rollout.table_text({"releases": []}) == "no release announced in the mesh"


def test_done_needs_every_site_holding_the_newest_at_100() -> None:
    assert not meshctl_rollout.is_done({"releases": []})
    assert not meshctl_rollout.is_done(doc(site(100.0, 2, 0), site(40.0, 0, 2)))
    assert meshctl_rollout.is_done(doc(site(100.0, 2, 0), site(0.0, 0, 0, down=["s1"])))
    old_done = doc(site(100.0, 2, 0))
    new_half = doc(site(50.0, 1, 1), version="2.0")
    both = {"releases": old_done["releases"] + new_half["releases"]}
    assert not meshctl_rollout.is_done(both)
    assert not meshctl_rollout.is_done(both, name="fw")
    assert not meshctl_rollout.is_done(both, name="other")


def test_plain_watch_prints_a_line_per_change_until_done() -> None:
    docs = iter(
        [
            doc(site(0.0, 0, 2)),
            doc(site(0.0, 0, 2)),  # unchanged: nothing printed
            doc(site(50.0, 1, 1)),
            doc(site(100.0, 2, 0)),
        ]
    )
    out: list[str] = []
    sleeps: list[float] = []
    code = meshctl_rollout.watch(lambda: next(docs), out.append, sleeps.append, tty=False, until_done=True)
    assert code == 0
    assert len(out) == 3
    assert [line.partition(" ")[2] for line in out] == [
        "fw 1.0 site north: 0.0% (0/2 complete, 2 fetching)\n",
        "fw 1.0 site north: 50.0% (1/2 complete, 1 fetching)\n",
        "fw 1.0 site north: 100.0% (2/2 complete, 0 fetching)\n",
    ]
    assert sleeps == [1.0, 1.0, 1.0]


def test_tty_watch_redraws_until_ctrl_c() -> None:
    calls = 0

    def get() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return doc(site(100.0, 2, 0))

    out: list[str] = []
    assert meshctl_rollout.watch(get, out.append, lambda s: None, tty=True) == 0
    frames = [o for o in out if o.startswith(meshctl_rollout.CLEAR)]
    assert len(frames) == 2  # not done without --until-done: redrawn until interrupted
    assert sum("north" in o for o in out) == 2


def test_releases_watch_flags_parse() -> None:
    args = meshctl.build_parser().parse_args(
        ["releases", "--watch", "--until-done", "--name", "fw", "--interval", "0.2"]
    )
    assert (args.watch, args.until_done, args.name, args.interval) == (True, True, "fw", 0.2)
    args = meshctl.build_parser().parse_args(["releases"])
    assert (args.watch, args.until_done) == (False, False)


@pytest.mark.parametrize("percent", [0.0, 37.5, 100.0, 120.0])
def test_bar_is_fixed_width(percent: float) -> None:
    assert len(meshctl_rollout.bar(percent)) == len(meshctl_rollout.bar(0.0))
