"""The query clock and dedupe ring in the data dir (meshd/state.py): round trip, bounds, damage."""

from __future__ import annotations

import stat
from pathlib import Path

import orjson

from meshd import state
from meshd.core.query import QueryState


def test_query_state_round_trips_atomically_and_private(tmp_path: Path) -> None:
    qs = QueryState(700, ((600, (1, 2)), (650, (3,)), (699, (4, 5, 6))))
    state.write_query_state(tmp_path, qs)
    path = tmp_path / state.QUERY_STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [state.QUERY_STATE_FILE]  # no temp file left
    assert state.read_query_state(tmp_path) == qs


def test_no_file_means_no_state(tmp_path: Path) -> None:
    assert state.read_query_state(tmp_path) is None


def test_persisted_ids_are_bounded_keeping_the_newest(tmp_path: Path) -> None:
    per_slot = 64
    slots = tuple((lt, tuple(range(lt * 100, lt * 100 + per_slot))) for lt in range(400))
    state.write_query_state(tmp_path, QueryState(400, slots))
    saved = state.read_query_state(tmp_path)
    assert saved is not None
    assert sum(len(ids) for _, ids in saved.seen) == state.QUERY_STATE_MAX_IDS
    assert saved.seen[-1] == slots[-1]  # the newest are kept
    assert saved.seen[0][0] == 400 - state.QUERY_STATE_MAX_IDS // per_slot
    # A hand-made file bigger than the bound is cut the same way on reading.
    path = tmp_path / state.QUERY_STATE_FILE
    path.write_bytes(orjson.dumps({"ltime": 9, "seen": [[lt, list(range(50))] for lt in range(1000)]}))
    big = state.read_query_state(tmp_path)
    assert big is not None
    assert sum(len(ids) for _, ids in big.seen) <= state.QUERY_STATE_MAX_IDS
    assert big.seen[-1][0] == 999


def test_damaged_files_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / state.QUERY_STATE_FILE
    for junk in (b"{", b"[]", b'{"ltime": "x"}', b'{"ltime": 1, "seen": [[1]]}', b'{"ltime": true}'):
        path.write_bytes(junk)
        assert state.read_query_state(tmp_path) is None, junk
