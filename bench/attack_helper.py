"""The key holder's side of bench/bench_attacks.py, run with the code of the tree under test.

bench_attacks.py measures any meshd tree (before and after a change), so whatever needs the
cluster key and that tree's wire format runs here, as `PYTHONPATH=TREE python attack_helper.py`,
and talks to the bench through JSON on standard output:

    probe --key-file F --cluster C --addr HOST:PORT --target NAME --target-id ID --duration S
        time direct SWIM probes (Ping -> Ack, what a peer's probe costs) every --interval;
        one JSON line per probe: {"rtt_ms": x} or {"lost": true}
    seal-chunks --key-file F --cluster C --addr HOST:PORT --data-dir DIR
        one real POST /peer/v1/chunks for every chunk in DIR's store, made by the tree's own
        client; prints the request as sent ({"path", "headers", "body_b64", "ids", "status"})
        so a host without the key can replay it byte for byte.

Errors (an API the tree does not have, say) print {"error": "..."} and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import json
import secrets
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

SPY_SEQ_BASE = 1 << 30  # far from the node's own probe sequence numbers


def _codec(args: argparse.Namespace) -> Any:
    from meshd.crypto import Keyring, read_key_file
    from meshd.wire import Codec

    # A tree whose envelope names its sender gets a sender id of the helper's own (a key holder).
    kw: dict[str, Any] = (
        {"node_id": secrets.token_hex(16)} if "node_id" in inspect.signature(Codec).parameters else {}
    )
    return Codec(args.cluster, Keyring([read_key_file(args.key_file)]), **kw)


def _to(codec: Any, args: argparse.Namespace) -> dict[str, str]:
    """pack()'s receiver argument, for a tree whose envelope names its receiver."""
    return {"to": args.target_id} if "to" in inspect.signature(codec.pack).parameters else {}


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def probe(args: argparse.Namespace) -> None:
    from meshd import wire
    from meshd.core.messages import Ack, Ping
    from meshd.errors import DecodeError

    codec = _codec(args)
    target = _split(args.addr)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        me = f"127.0.0.1:{sock.getsockname()[1]}"
        end = time.monotonic() + args.duration
        seq = SPY_SEQ_BASE
        while time.monotonic() < end:
            seq += 1
            started = time.monotonic()
            ping = wire.encode_message(Ping(seq, args.target, "bench-prober", me))
            sock.sendto(codec.pack([ping], **_to(codec, args)), target)
            line: dict[str, Any] = {"lost": True}
            deadline = started + args.timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(65536)
                    msgs = codec.unpack(data)
                except TimeoutError:
                    break
                except DecodeError:
                    continue
                if any(isinstance(m, Ack) and m.seq == seq for m in msgs):
                    line = {"rtt_ms": (time.monotonic() - started) * 1000}
                    break
            print(json.dumps(line), flush=True)
            time.sleep(max(0.0, started + args.interval - time.monotonic()))


def seal_chunks(args: argparse.Namespace) -> None:
    import aiohttp

    from meshd.core.counters import Counters
    from meshd.release.assembly import held_places
    from meshd.release.chunker import MAX_SIZE
    from meshd.release.peer_client import PeerFetcher
    from meshd.release.store import ChunkStore

    # Chunks in files of their own, in packs or in release files, of every store under the folder.
    stores = {p.parent for p in Path(args.data_dir).glob("**/chunks") if p.is_dir()}
    ids = sorted({cid for root in stores for cid in (*ChunkStore.scan(root), *held_places(root))})
    if not ids:
        raise RuntimeError(f"no chunks in {args.data_dir}")
    seen: list[dict[str, Any]] = []
    real = aiohttp.ClientSession._request

    def spy(self: aiohttp.ClientSession, method: str, url: Any, **kw: Any) -> Any:
        # Record the request exactly as the tree's client sends it, then let it go through.
        data = kw.get("data")
        seen.append(
            {
                "method": method,
                "path": urllib.parse.urlsplit(str(url)).path,
                "headers": {k: str(v) for k, v in dict(kw.get("headers") or {}).items()},
                "body_b64": base64.b64encode(data).decode() if isinstance(data, bytes) else "",
            }
        )
        return real(self, method, url, **kw)

    aiohttp.ClientSession._request = spy  # type: ignore[method-assign,assignment]

    async def fetch() -> str:
        fetcher = PeerFetcher(_codec(args), Counters())
        try:
            await fetcher.chunks(args.addr, ids, [MAX_SIZE] * len(ids), timeout=30)
            return "ok"
        except Exception as e:  # the request was sent: that is all the bench needs
            return f"{type(e).__name__}: {e}"
        finally:
            await fetcher.close()

    status = asyncio.run(fetch())
    posts = [s for s in seen if s["method"] == "POST"]
    if not posts:
        raise RuntimeError(f"the tree's client sent no POST ({status})")
    print(json.dumps({**posts[-1], "ids": len(ids), "status": status}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("probe", "seal-chunks"))
    p.add_argument("--key-file", required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("--addr", required=True, help="the target's gossip/peer HOST:PORT")
    p.add_argument("--target", default="", help="probe: the target's node name")
    p.add_argument("--target-id", default="", help="the target's node id (GET /v1/status)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--data-dir", help="seal-chunks: the data dir holding the chunks")
    args = p.parse_args()
    try:
        (probe if args.what == "probe" else seal_chunks)(args)
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
