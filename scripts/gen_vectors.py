#!/usr/bin/env python3
"""Regenerate the golden wire vectors in proto/vectors/ (see proto/PROTOCOL.md).

    python scripts/gen_vectors.py           # rewrite the files
    python scripts/gen_vectors.py --check   # exit 1 when the files differ from what the codec makes

Everything is fixed (keys, nonces, inputs), so the output is byte-for-byte reproducible.
The vectors are a contract: change them only together with a protocol version bump, or when
adding new cases for new messages.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import typing
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from meshd import wire  # noqa: E402
from meshd.core import digest  # noqa: E402
from meshd.core import messages as m  # noqa: E402
from meshd.crypto import Keyring, aes_gcm_available, key_id  # noqa: E402
from meshd.errors import AuthError, DecodeError, ReplayError  # noqa: E402
from meshd.replay import ReplayGuard, SenderClock  # noqa: E402

VECTOR_DIR = ROOT / "proto" / "vectors"

KEY_A = bytes(range(32))  # 000102...1f
KEY_B = bytes(range(0x20, 0x40))  # 202122...3f
NONCE_1 = bytes(range(24))
NONCE_2 = bytes(range(0xA0, 0xB8))
NODE_A = "0a" * 16  # node ids of the sender and the receiver of the envelope vectors
NODE_B = "0b" * 16
STAMP = 1_800_000_000_000_000  # sender clock, microseconds


# --- message <-> JSON fields ------------------------------------------------------------------


def to_fields(value: Any) -> Any:
    """A message as JSON: structs become objects in field order, bytes become hex."""
    if isinstance(value, msgspec.Struct):
        return {f.name: to_fields(getattr(value, f.name)) for f in msgspec.structs.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, enum.IntEnum):
        return int(value)
    if isinstance(value, list):
        return [to_fields(v) for v in value]
    if isinstance(value, dict):
        return {k: to_fields(v) for k, v in value.items()}
    return value


def from_fields(tp: Any, value: Any) -> Any:
    """Inverse of to_fields, driven by the struct's type annotations."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        kwargs = {f.name: from_fields(f.type, value[f.name]) for f in msgspec.structs.fields(tp)}
        return tp(**kwargs)
    if tp is bytes:
        return bytes.fromhex(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return [from_fields(item, v) for v in value]
    return value


MESSAGE_TYPES: dict[str, type[msgspec.Struct]] = {cls.__name__: cls for cls in typing.get_args(m.Message)}


def message_cases() -> list[tuple[str, m.Message]]:
    """(case name, message): every type, defaults and explicit values, non-ASCII text."""
    state = m.PushNodeState(
        name="gw-b",
        node_id="00112233445566778899aabbccddeeff",
        addr="198.18.1.2:7788",
        incarnation=7,
        state=m.MemberState.SUSPECT,
        meta={"site": "plant-2"},
    )
    return [
        ("ping", m.Ping(seq=1, target="gw-b", source="gw-a", source_addr="198.18.1.1:7788")),
        (
            "indirect_ping",
            m.IndirectPing(
                seq=4294967296,
                target="gw-c",
                target_addr="198.18.1.3:7788",
                source="gw-a",
                source_addr="198.18.1.1:7788",
            ),
        ),
        (
            "indirect_ping_no_nack",
            m.IndirectPing(
                seq=2,
                target="gw-c",
                target_addr="198.18.1.3:7788",
                source="gw-a",
                source_addr="198.18.1.1:7788",
                nack=False,
            ),
        ),
        ("ack", m.Ack(seq=1)),
        ("ack_source", m.Ack(seq=65535, source="gw-b")),
        ("nack", m.Nack(seq=0)),
        (
            "alive",
            m.Alive(
                incarnation=1,
                name="gw-a",
                node_id="ffeeddccbbaa99887766554433221100",
                addr="198.18.1.1:7788",
            ),
        ),
        (
            "alive_meta",
            m.Alive(
                incarnation=3,
                name="Gateway-Straße-1",
                node_id="ffeeddccbbaa99887766554433221100",
                addr="127.0.0.1:7788",
                meta={"site": "münchen", "health": "passing", "v": "0.1.0"},
                protocol=2,
            ),
        ),
        ("suspect", m.Suspect(incarnation=5, name="gw-b", source="gw-a")),
        ("dead", m.Dead(incarnation=6, name="gw-b", source="gw-a")),
        ("dead_leave", m.Dead(incarnation=9, name="gw-a", source="gw-a")),
        ("push_pull_empty", m.PushPull(join=True, states=[])),
        (
            "push_pull",
            m.PushPull(
                join=False,
                states=[
                    state,
                    m.PushNodeState(
                        name="gw-c",
                        node_id="0f" * 16,
                        addr="198.18.1.3:7788",
                        incarnation=0,
                        state=m.MemberState.LEFT,
                    ),
                ],
                reply=True,
            ),
        ),
        (
            "push_pull_buckets",
            m.PushPull(
                join=False,
                states=[state],
                reply=True,
                query_ltime=12,
                buckets=[1, 6],
                bucket_count=8,
            ),
        ),
        (
            "push_pull_digest",
            m.PushPullDigest(buckets=bytes.fromhex("0123456789abcdef" + "fedcba9876543210"), query_ltime=12),
        ),
        ("key_op", m.KeyOp(op_id=123456789, op="install", key=KEY_B)),
        (
            "query_defaults",
            m.Query(
                ltime=1,
                id=0xDEADBEEF,
                name="health",
                payload=b"",
                origin="gw-a",
                origin_addr="198.18.1.1:7788",
            ),
        ),
        (
            "query",
            m.Query(
                ltime=42,
                id=7,
                name="disk",
                payload=b"\x00\x01\xff",
                origin="gw-a",
                origin_addr="198.18.1.1:7788",
                filters=m.QueryFilter(nodes=["gw-b", "gw-c"], site="re:plant-.*", tags={"role": "edge"}),
                relay_factor=2,
                timeout=2.5,
            ),
        ),
        (
            "query_aggregate",
            m.Query(
                ltime=43,
                id=8,
                name="health",
                payload=b"",
                origin="gw-a",
                origin_addr="198.18.1.1:7788",
                timeout=4.0,
                aggregate="site",
            ),
        ),
        ("query_response", m.QueryResponse(ltime=42, id=7, source="gw-b", payload=b"ok")),
        (
            "relay",
            m.Relay(
                dest="gw-a",
                dest_addr="198.18.1.1:7788",
                response=m.QueryResponse(ltime=42, id=7, source="gw-c", payload=b"{}"),
            ),
        ),
        (
            "site_summary",
            m.SiteSummary(
                ltime=43,
                id=8,
                site="plant-2",
                source="gw-c",
                payload=b'{"failing":[]}',
                answered=["gw-c", "gw-d"],
                missing=["gw-e"],
            ),
        ),
    ]


# --- building the vectors ---------------------------------------------------------------------


def _fixed(nonce: bytes) -> Any:
    return lambda: nonce


def _codec(
    cluster: str,
    keys: list[bytes] | None,
    compress: bool,
    nonce: bytes,
    node_id: str = NODE_A,
    stamp: int = STAMP,
    guard: ReplayGuard | None = None,
) -> wire.Codec:
    ring = Keyring(keys) if keys is not None else None
    clock = SenderClock(lambda: stamp)
    return wire.Codec(
        cluster, ring, compress, node_id=node_id, clock=clock, guard=guard, nonce_fn=_fixed(nonce)
    )


def _compressible_body() -> bytes:
    """A realistic compressible body: push-pull state of 20 nodes of one site."""
    states = [
        m.PushNodeState(
            name=f"gw-{i:03d}",
            node_id=f"{i:032x}",
            addr=f"198.18.2.{i}:7788",
            incarnation=i,
            state=m.MemberState.ALIVE,
            meta={"site": "plant-2", "health": "passing"},
        )
        for i in range(20)
    ]
    return wire.encode_body([m.PushPull(join=False, states=states)])


# (name, incarnation, state) of the digest vectors' table: non-ASCII, an empty-ish name, big numbers.
DIGEST_TABLE = [
    ("gw-a", 0, m.MemberState.ALIVE),
    ("gw-b", 7, m.MemberState.SUSPECT),
    ("gw-c", 2**53, m.MemberState.DEAD),
    ("gw-d", 1, m.MemberState.LEFT),
    ("wärme-7", 3, m.MemberState.ALIVE),
    ("x", 12345, m.MemberState.ALIVE),
]


def digest_vectors() -> dict[str, Any]:
    """The digest of section 4.5 for a fixed table, per member and whole."""
    members = []
    for name, incarnation, state in DIGEST_TABLE:
        h = digest.name_hash(name)
        members.append(
            {
                "name": name,
                "incarnation": incarnation,
                "state": int(state),
                "hash": f"{h:016x}",
                "mix": f"{digest.entry(h, incarnation, state):016x}",
                "bucket_of_4": digest.bucket(h, 2),
            }
        )
    digests = {}
    for bits in (0, 1, 2):
        d = digest.TableDigest(bits)
        for name, incarnation, state in DIGEST_TABLE:
            h = digest.name_hash(name)
            d.add(h, digest.entry(h, incarnation, state))
        digests[str(d.count)] = digest.to_bytes(d.values).hex()
    return {
        "description": (
            "Digest anti-entropy (PROTOCOL.md 4.5): hash = BLAKE2b-64 of the name, mix of "
            "(hash, incarnation, state), and the whole table's digest by bucket count"
        ),
        "members": members,
        "digests": digests,
    }


def build() -> dict[str, Any]:
    """File name -> JSON document."""
    cases = message_cases()
    messages = []
    for name, msg in cases:
        messages.append(
            {
                "name": name,
                "type": type(msg).__name__,
                "tag": msg.__struct_config__.tag,
                "fields": to_fields(msg),
                "hex": wire.encode_message(msg).hex(),
            }
        )

    by_name = dict(cases)
    compound_names = ["ping", "alive_meta", "suspect", "ack"]
    parts = [wire.encode_message(by_name[n]) for n in compound_names]
    small_body = wire.compound(parts)
    compounds = [
        {"name": "four", "parts": compound_names, "hex": small_body.hex()},
        {"name": "empty", "parts": [], "hex": wire.compound([]).hex()},
        {
            "name": "seventeen_nacks",  # 16+ parts: array16 header
            "parts": ["nack"] * 17,
            "hex": wire.compound([wire.encode_message(by_name["nack"])] * 17).hex(),
        },
    ]

    big_body = _compressible_body()
    envelope_cases: list[tuple[str, str, list[bytes] | None, bool, bytes, bytes]] = [
        ("insecure", "default", None, False, NONCE_1, small_body),
        ("insecure_lz4", "default", None, True, NONCE_1, big_body),
        ("encrypted", "default", [KEY_A, KEY_B], False, NONCE_1, small_body),
        ("encrypted_uncompressed", "plant-2", [KEY_B], False, NONCE_2, big_body),
        ("encrypted_lz4", "plant-2", [KEY_B, KEY_A], True, NONCE_2, big_body),
    ]
    envelopes = []
    for name, cluster, keys, compress, nonce, body in envelope_cases:
        to = "" if name == "insecure" else NODE_B  # one envelope for any receiver
        sealed = _codec(cluster, keys, compress, nonce).seal(body, to)
        envelopes.append(
            {
                "name": name,
                "cluster": cluster,
                "keys": [k.hex() for k in keys] if keys is not None else None,
                "primary_key_id": key_id(keys[0]).hex() if keys is not None else None,
                "compress": compress,
                "nonce": nonce.hex() if keys is not None else None,
                "sender_node_id": NODE_A,
                "stamp": STAMP,
                "receiver_node_id": to,
                "body": body.hex(),
                "envelope": sealed.hex(),
            }
        )

    enc_a = _codec("default", [KEY_A], False, NONCE_1).seal(small_body, NODE_B)
    ins = _codec("default", None, False, NONCE_1).seal(small_body)
    lz4_ins = _codec("default", None, True, NONCE_1).seal(big_body)
    enc_later = _codec("default", [KEY_A], False, NONCE_2, stamp=STAMP + 200_000_000).seal(small_body, NODE_B)
    enc_for_c = _codec("default", [KEY_A], False, NONCE_2).seal(small_body, "0c" * 16)
    bad_tag_body = wire.compound([bytes.fromhex("92") + bytes([99]) + b"\x00"])  # [99, 0]
    flipped = bytearray(enc_a)
    flipped[-1] ^= 0x01
    # insecure envelope claiming 2**31 decompressed bytes: must be refused before allocating
    fields = ins[14:38]  # stamp, sender, receiver of `ins` (after "default")
    bomb = ins[:5] + bytes((1, 7)) + b"default" + fields + (2**31).to_bytes(4, "little") + b"\x00" * 8
    # (name, cluster, keys, envelope, error, why, envelopes the receiver opened before)
    invalid_cases: list[tuple[str, str, list[bytes] | None, bytes, type[Exception], str, list[bytes]]] = [
        ("other_cluster", "plant-2", [KEY_A], enc_a, AuthError, "cluster name differs", []),
        ("unknown_key", "default", [KEY_B], enc_a, AuthError, "key id not in the keyring", []),
        ("tampered", "default", [KEY_A], bytes(flipped), AuthError, "last MAC byte flipped", []),
        ("insecure_to_secure", "default", [KEY_A], ins, AuthError, "zero key id", []),
        ("secure_to_insecure", "default", None, enc_a, AuthError, "non-zero key id", []),
        (
            "bad_version",
            "default",
            None,
            b"\x01" + ins[1:],
            DecodeError,
            "version 1 (before replay fields)",
            [],
        ),
        ("unknown_flags", "default", None, ins[:5] + b"\x02" + ins[6:], DecodeError, "flag bit1", []),
        ("truncated_header", "default", None, ins[:3], DecodeError, "3 bytes", []),
        ("truncated_nonce", "default", [KEY_A], enc_a[:40], DecodeError, "shorter than nonce+MAC", []),
        ("truncated_box", "default", [KEY_A], enc_a[:60], AuthError, "ciphertext cut short", []),
        ("truncated_lz4", "default", None, lz4_ins[:-10], DecodeError, "lz4 block cut", []),
        ("lz4_bomb", "default", None, bomb, DecodeError, "claims 2 GiB decompressed", []),
        (
            "unknown_tag",
            "default",
            None,
            ins[:5] + bytes((0, 7)) + b"default" + fields + bad_tag_body,
            DecodeError,
            "message tag 99",
            [],
        ),
        ("trailing_bytes", "default", None, ins + b"\x00", DecodeError, "byte after the body", []),
        ("misdirected", "default", [KEY_A], enc_for_c, ReplayError, "sealed for another receiver", []),
        ("replayed", "default", [KEY_A], enc_a, ReplayError, "the same envelope a second time", [enc_a]),
        (
            "stale",
            "default",
            [KEY_A],
            enc_a,
            ReplayError,
            "over 120 s behind the sender's newest",
            [enc_later],
        ),
    ]
    invalid = []
    for name, cluster, keys, data, error, why, before in invalid_cases:
        codec = _codec(cluster, keys, True, NONCE_1, node_id=NODE_B, guard=ReplayGuard())
        for earlier in before:
            codec.unpack(earlier)
        try:
            codec.unpack(data)
        except error:
            pass
        else:  # pragma: no cover - generator self-check
            raise AssertionError(f"invalid vector {name} was accepted")
        invalid.append(
            {
                "name": name,
                "cluster": cluster,
                "keys": [k.hex() for k in keys] if keys is not None else None,
                "receiver_node_id": NODE_B,
                "opened_before": [e.hex() for e in before],
                "envelope": data.hex(),
                "error": error.__name__,
                "why": why,
            }
        )

    return {
        "messages.json": {
            "description": "Each message alone: msgpack array [tag, fields...]; hex of bytes",
            "messages": messages,
        },
        "compound.json": {
            "description": "Bodies: msgpack array of messages; parts name messages.json cases",
            "compounds": compounds,
        },
        "envelopes.json": {
            "description": (
                "seal(body, to=receiver) by the sender at the stamp, "
                "with the keyring (primary first) and nonce"
            ),
            "envelopes": envelopes,
        },
        "invalid.json": {
            "description": (
                "Envelopes a receiver (cluster, keyring, node id, replay guard) must refuse, "
                "after opening opened_before"
            ),
            "invalid": invalid,
        },
        "digest.json": digest_vectors(),
        "pieces.json": piece_vectors(big_body),
    }


def piece_vectors(body: bytes) -> dict[str, Any]:
    """Version 3 (PROTOCOL.md 2.5): a release piece sealed in AES-256-GCM for a requester that
    asked. Needs a CPU with AES instructions (libsodium's AES-GCM) to build."""
    if not aes_gcm_available():
        raise SystemExit("the version 3 vector needs libsodium's AES-256-GCM (a CPU with AES instructions)")
    keys = [KEY_B, KEY_A]
    sender = _codec("plant-2", keys, False, NONCE_2)
    buf = bytearray(sender.overhead) + body + bytearray(wire.AES_TAIL)
    sealed = bytes(sender.seal_in_place(buf, NODE_B, aes=True))
    return {
        "description": (
            "seal_in_place(body, to=receiver, aes=True) by the sender at the stamp, with the "
            "keyring (primary first); the AES-GCM nonce is the first 12 bytes of nonce"
        ),
        "pieces": [
            {
                "name": "aes256gcm",
                "cluster": "plant-2",
                "keys": [k.hex() for k in keys],
                "primary_key_id": key_id(keys[0]).hex(),
                "nonce": NONCE_2.hex(),
                "sender_node_id": NODE_A,
                "stamp": STAMP,
                "receiver_node_id": NODE_B,
                "body": body.hex(),
                "envelope": sealed.hex(),
            }
        ],
    }


def render(doc: Any) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", type=Path, default=VECTOR_DIR)
    args = parser.parse_args(argv)
    docs = build()
    stale = []
    for name, doc in docs.items():
        path = args.out / name
        text = render(doc)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print("stale vectors: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
