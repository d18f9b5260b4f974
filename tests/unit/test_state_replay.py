"""The replay state file: where the sender clock resumes and the marks a receiver restores."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd import state
from meshd.errors import ReplayError
from meshd.replay import ReplayGuard, SenderClock
from meshd.wire import Codec


def test_round_trip_resumes_above_the_last_stamp(tmp_path: Path) -> None:
    state.write_replay_state(tmp_path, 5_000_000, {"aa" * 8: 42})
    back = state.read_replay_state(tmp_path)
    assert back.clock_floor == 5_000_000 + state.REPLAY_RESUME_US
    assert back.marks == {"aa" * 8: 42}
    assert (tmp_path / state.REPLAY_FILE).stat().st_mode & 0o077 == 0


def test_missing_or_broken_file_starts_fresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert state.read_replay_state(tmp_path) == state.ReplayState()
    for junk in (b"{", b"[]", b'{"clock": -1}', b'{"clock": 1, "marks": [1]}'):
        (tmp_path / state.REPLAY_FILE).write_bytes(junk)
        assert state.read_replay_state(tmp_path) == state.ReplayState()
    assert "unreadable replay state" in caplog.text
    (tmp_path / state.REPLAY_FILE).write_bytes(b'{"clock": 7, "marks": {"bb": "x", "cc": 3}}')
    assert state.read_replay_state(tmp_path).marks == {"cc": 3}


def test_a_restarted_receiver_refuses_what_it_took_before_the_restart(tmp_path: Path) -> None:
    # Sender gw-a's clock steps back 1 h across ITS restart; the receiver restarts too.
    wall = [10**15]
    sender = Codec("c", None, node_id="aa" * 16, clock=SenderClock(lambda: wall[0]))
    receiver = Codec("c", None, node_id="bb" * 16, guard=ReplayGuard())
    taken = [sender.seal(b"\x90", "bb" * 16) for _ in range(3)]
    for p in taken:
        receiver.open(p)
    assert receiver.guard is not None
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    state.write_replay_state(a_dir, sender.clock.last, {})
    state.write_replay_state(b_dir, receiver.clock.last, receiver.guard.export())

    wall[0] -= 3600 * 10**6
    a_state = state.read_replay_state(a_dir)
    sender2 = Codec("c", None, node_id="aa" * 16, clock=SenderClock(lambda: wall[0], a_state.clock_floor))
    guard = ReplayGuard()
    guard.restore(state.read_replay_state(b_dir).marks)
    receiver2 = Codec("c", None, node_id="bb" * 16, guard=guard)
    for p in taken:
        with pytest.raises(ReplayError):
            receiver2.open(p)
    assert receiver2.open(sender2.seal(b"\x90", "bb" * 16)) == b"\x90"
