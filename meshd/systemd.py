"""systemd integration: `sd_notify` (READY, STOPPING, RELOADING, STATUS) and the watchdog ping.

Everything here is a no-op when the service manager did not ask for it (no NOTIFY_SOCKET, no
WATCHDOG_USEC): `meshd run` behaves the same in a terminal, a container or a unit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("meshd")

__all__ = ["reloading_message", "sd_notify", "watchdog_interval", "watchdog_loop"]


def sd_notify(message: str) -> bool:
    """Tell systemd about our state (READY=1, STOPPING=1, ...); a no-op without systemd."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):
        target = "\0" + target[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(target)
            s.sendall(message.encode())
    except OSError as e:
        log.debug("sd_notify failed: %s", e)
        return False
    return True


def reloading_message() -> str:
    """RELOADING=1 with the monotonic timestamp systemd (Type=notify-reload) expects."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half systemd's timeout), None when not watched."""
    usec = env.get("WATCHDOG_USEC")
    watched_pid = env.get("WATCHDOG_PID")
    if not usec or (watched_pid and watched_pid != str(pid)):
        return None
    try:
        return max(0.5, int(usec) / 2e6)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None


async def watchdog_loop() -> None:
    """Ping systemd's watchdog until cancelled (returns at once when there is none)."""
    interval = watchdog_interval(os.environ, os.getpid())
    if interval is None:
        return
    while True:
        await asyncio.sleep(interval)
        sd_notify("WATCHDOG=1")
