"""A bare mDNS agent that prints the peers it finds as JSON lines (no membership): the lab runs
it in its hosts as `python -m meshd.discovery`, and it is handy for debugging a site network."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from typing import Any

from meshd.discovery.mdns import Discovery


async def _agent(args: argparse.Namespace) -> None:
    def emit(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    disc = Discovery(
        args.name,
        args.id or args.name,
        args.cluster,
        args.site,
        args.port,
        args.address,
        args.interface or None,
        lambda name, addr, txt: emit("peer", name=name, addr=addr, txt=txt),
        lambda name: emit("gone", name=name),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await disc.start()
    emit("started", name=args.name, advertising=disc.advertising)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration or None)
    finally:
        await disc.stop()
        emit("stopped", counters=disc.counters)


def main(argv: list[str] | None = None) -> None:
    """Run a Discovery agent that prints peers as JSON lines (no membership)."""
    parser = argparse.ArgumentParser(prog="python -m meshd.discovery", description=main.__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--id", default="")
    parser.add_argument("--cluster", default="default")
    parser.add_argument("--site", default="default")
    parser.add_argument("--port", type=int, default=7788)
    parser.add_argument("--address", action="append", required=True, help="IPv4 to advertise")
    parser.add_argument("--interface", action="append", help="IPv4 of an interface to confine to")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0 = until killed")
    args = parser.parse_args(argv)
    asyncio.run(_agent(args))


if __name__ == "__main__":
    main()
