#!/usr/bin/env python3
"""Write the fuzz seed corpus (tests/fuzz/corpus/<target>/seed-*) from the current code.

    python scripts/fuzz_seeds.py            # rewrite the seeds; fuzzer-found inputs are kept
    python scripts/fuzz_seeds.py --clean    # drop the whole corpus first (after a format change)
    python scripts/fuzz_seeds.py --scrub    # only drop corpus files with non-lab IPv4 literals

Seeds are real traffic made by the code of this checkout: the golden vectors of proto/vectors/
sealed by wire.Codec, requests with tokens from release.peer.make_token, manifests from
Manifest.build / sign. After a wire or header change, run this (with --clean) and `make fuzz`.
Input layouts: tests/fuzz/targets.py.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from meshd import wire  # noqa: E402
from meshd.core.messages import Ping, PushPull  # noqa: E402
from meshd.net import peer_http  # noqa: E402
from meshd.release import chunker, peer  # noqa: E402
from tests.fuzz import targets as t  # noqa: E402

CORPUS = ROOT / "tests" / "fuzz" / "corpus"
VECTORS = ROOT / "proto" / "vectors"
SEED_PREFIX = "seed-"

# Test data may name only 127/8 and 198.18/15 (the repository's rule); fuzzer mutations of seed
# addresses can make others, so those corpus files are dropped.
_IPV4 = re.compile(rb"(?<![0-9.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?![0-9.])")


def lab_only(data: bytes) -> bool:
    for m in _IPV4.finditer(data):
        a, b = int(m[1]), int(m[2])
        if not (a == 127 or (a == 198 and b in (18, 19))):
            return False
    return True


def _vectors(name: str, key: str) -> list[dict[str, str]]:
    doc = json.loads((VECTORS / f"{name}.json").read_text())
    cases: list[dict[str, str]] = doc[key]
    return cases


def wire_seeds() -> dict[str, bytes]:
    bodies = {
        f"msg-{v['name']}": wire.compound([bytes.fromhex(v["hex"])]) for v in _vectors("messages", "messages")
    }
    bodies |= {f"compound-{v['name']}": bytes.fromhex(v["hex"]) for v in _vectors("compound", "compounds")}
    bodies |= {f"envelope-{v['name']}": bytes.fromhex(v["body"]) for v in _vectors("envelopes", "envelopes")}
    bodies["empty"] = wire.compound([])
    insecure, secure = t.insecure_codec(), t.secure_codec(fixed_nonce=True)
    plain = wire.Codec(t.CLUSTER, None, compress=False)
    out: dict[str, bytes] = {}
    for name, body in bodies.items():
        out[f"body-{name}"] = b"\x03" + body
        out[f"insecure-{name}"] = b"\x00" + insecure.seal(body)
        out[f"secure-{name}"] = b"\x01" + secure.seal(body)
        # The inner plaintext is what an insecure envelope carries after its header.
        out[f"inner-{name}"] = b"\x02" + insecure.seal(body)[wire.HEADER_SIZE :]
        out[f"inner-plain-{name}"] = b"\x02" + plain.seal(body)[wire.HEADER_SIZE :]
    for v in _vectors("invalid", "invalid"):
        env = bytes.fromhex(v["envelope"])
        out[f"invalid-{v['name']}"] = (b"\x01" if v["keys"] else b"\x00") + env
    for v in _vectors("envelopes", "envelopes"):
        out[f"vector-{v['name']}"] = (b"\x01" if v["keys"] else b"\x00") + bytes.fromhex(v["envelope"])
    return out


def http_seeds() -> dict[str, bytes]:
    backend = t.MemoryBackend(t.secure_codec())
    sealer = t.secure_codec(fixed_nonce=True)
    rid = backend.release_id
    ids = list(backend.stored)
    enc = t.encode_http_input
    manifest_path = f"/peer/v1/manifests/{rid}"
    push_pull = wire.encode_body([PushPull(True, [], True)])
    ping = wire.encode_body([Ping(1, "gw-a", "gw-b", "127.0.0.1:7789")])
    out = {
        "manifest-signed": enc("GET", manifest_path, sign_token=True),
        "manifest-prefix": enc("GET", f"/peer/v1/manifests/{rid[:16]}", sign_token=True),
        "manifest-unknown": enc("GET", "/peer/v1/manifests/" + "0" * 64, sign_token=True),
        "manifest-bad-id": enc("GET", "/peer/v1/manifests/XYZ", sign_token=True),
        "manifest-raw-token": enc("GET", manifest_path, auth=t.token_for("GET", manifest_path)),
        "manifest-other-path-token": enc("GET", manifest_path, auth=t.token_for("GET", "/x")),
        "manifest-junk-token": enc("GET", manifest_path, auth=b"AAAA"),
        "manifest-no-token": enc("GET", manifest_path),
        "bitmap-signed": enc("GET", f"/peer/v1/bitmaps/{rid}", sign_token=True),
        "chunks": enc("POST", peer.CHUNKS_PATH, orjson.dumps({"ids": ids}), seal_body=True, sign_token=True),
        "chunks-unknown": enc(
            "POST", peer.CHUNKS_PATH, orjson.dumps({"ids": ["a" * 64]}), seal_body=True, sign_token=True
        ),
        "chunks-not-list": enc("POST", peer.CHUNKS_PATH, b'{"ids": "x"}', seal_body=True, sign_token=True),
        "chunks-no-ids": enc("POST", peer.CHUNKS_PATH, b"{}", seal_body=True, sign_token=True),
        "chunks-not-json": enc("POST", peer.CHUNKS_PATH, b"[", seal_body=True, sign_token=True),
        "chunks-unsealed": enc("POST", peer.CHUNKS_PATH, orjson.dumps({"ids": ids})),
        "chunks-chunked": enc(
            "POST",
            peer.CHUNKS_PATH,
            orjson.dumps({"ids": ids}),
            seal_body=True,
            sign_token=True,
            chunked=True,
        ),
        "stream-push-pull": enc("POST", peer_http.STREAM_PATH, push_pull, seal_body=True, sign_token=True),
        "stream-ping": enc(
            "POST", peer_http.STREAM_PATH, ping, seal_body=True, sign_token=True, no_content_type=True
        ),
        "stream-unsealed": enc("POST", peer_http.STREAM_PATH, push_pull),
        # Bodies sealed once, sent as they are: a recorded request replayed.
        "stream-sealed": enc("POST", peer_http.STREAM_PATH, sealer.seal(push_pull), sign_token=True),
        "chunks-sealed": enc("POST", peer.CHUNKS_PATH, sealer.seal(orjson.dumps({"ids": ids}))),
        "stream-get": enc("GET", peer_http.STREAM_PATH),
        "unknown-route": enc("PUT", "/peer/v1/%zz"),
    }
    for v in _vectors("messages", "messages"):
        body = wire.compound([bytes.fromhex(v["hex"])])
        out[f"stream-{v['name']}"] = enc("POST", peer_http.STREAM_PATH, body, seal_body=True, sign_token=True)
    return out


def manifest_seeds() -> dict[str, bytes]:
    signed = t.sample_manifest()
    unsigned = t.sample_manifest(signed=False)
    doc = orjson.loads(signed.to_bytes())
    bad_path = json.loads(json.dumps(doc))
    bad_path["manifest"]["files"][0]["path"] = "../etc/passwd"
    no_sig = json.loads(json.dumps(doc))
    no_sig["signature"] = None
    stored = list(t.MemoryBackend(t.secure_codec()).stored.values())
    piece = peer.encode_piece([stored[0], None, stored[1]])
    return {
        "signed": b"\x00" + signed.to_bytes(),
        "unsigned": b"\x00" + unsigned.to_bytes(),
        "resign": b"\x01" + unsigned.to_bytes(),
        "bad-path": b"\x01" + orjson.dumps(bad_path),
        "null-signature": b"\x00" + orjson.dumps(no_sig),
        "not-json": b"\x00{",
        "piece": b"\x02\x03" + piece,
        "piece-empty": b"\x02\x00" + peer.encode_piece([]),
        "piece-raw-chunk": b"\x02\x01" + peer.encode_piece([chunker.encode_chunk(b"x" * 10)]),
    }


SEEDS = {"wire": wire_seeds, "http": http_seeds, "manifest": manifest_seeds}


def scrub() -> int:
    dropped = 0
    for path in CORPUS.glob("*/*"):
        if path.is_file() and not lab_only(path.read_bytes()):
            path.unlink()
            dropped += 1
    return dropped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", action="store_true", help="remove the whole corpus first")
    ap.add_argument("--scrub", action="store_true", help="only drop files with non-lab IPv4 literals")
    args = ap.parse_args()
    if args.scrub:
        print(f"dropped {scrub()} corpus file(s) with non-lab IPv4 literals")
        return 0
    for name, make in SEEDS.items():
        folder = CORPUS / name
        if args.clean and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(SEED_PREFIX + "*"):
            old.unlink()
        seeds = make()
        for case, data in seeds.items():
            assert lab_only(data), f"seed {name}/{case} names a non-lab address"
            (folder / f"{SEED_PREFIX}{case}").write_bytes(data)
        print(f"{name}: {len(seeds)} seeds in {folder.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
