"""The watchdog interval systemd asks for, read from the environment it sets."""

from __future__ import annotations

from meshd.systemd import reloading_message, watchdog_interval


def test_half_the_watchdog_timeout_for_our_pid() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "42"}, 42) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}, 42) == 5.0  # no PID: meant for us


def test_never_faster_than_twice_a_second() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "100"}, 1) == 0.5


def test_no_watchdog_when_not_asked_or_meant_for_another_process() -> None:
    assert watchdog_interval({}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "7"}, 42) is None


def test_a_malformed_timeout_is_ignored_not_fatal() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "ten seconds"}, 42) is None


def test_reloading_carries_a_monotonic_timestamp() -> None:
    first, second = reloading_message().splitlines()
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=")
    assert int(second.split("=", 1)[1]) > 0
