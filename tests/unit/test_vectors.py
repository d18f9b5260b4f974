"""The codec against the golden vectors in proto/vectors/, byte for byte."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from meshd import errors, wire
from meshd.crypto import Keyring, aes_gcm_available, key_id
from meshd.replay import ReplayGuard, SenderClock

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "proto" / "vectors"


def _load_gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_vectors", ROOT / "scripts" / "gen_vectors.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_vectors", module)
    spec.loader.exec_module(module)
    return module


gen = _load_gen()


def _doc(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


MESSAGES = _doc("messages.json")["messages"]
COMPOUNDS = _doc("compound.json")["compounds"]
ENVELOPES = _doc("envelopes.json")["envelopes"]
INVALID = _doc("invalid.json")["invalid"]
PIECES = _doc("pieces.json")["pieces"]
needs_aes = pytest.mark.skipif(
    not aes_gcm_available(), reason="this CPU has no AES instructions: libsodium's AES-256-GCM is off"
)


def _ring(keys: list[str] | None) -> Keyring | None:
    return Keyring([bytes.fromhex(k) for k in keys]) if keys is not None else None


def test_every_message_type_has_a_vector() -> None:
    assert {v["type"] for v in MESSAGES} == set(gen.MESSAGE_TYPES)


@pytest.mark.parametrize("vec", MESSAGES, ids=[v["name"] for v in MESSAGES])
def test_message_encoding(vec: dict[str, Any]) -> None:
    cls = gen.MESSAGE_TYPES[vec["type"]]
    msg = gen.from_fields(cls, vec["fields"])
    raw = bytes.fromhex(vec["hex"])
    assert cls.__struct_config__.tag == vec["tag"]
    assert raw[1] == vec["tag"]  # [fixarray header][tag]: the tag is always the second byte
    assert wire.encode_message(msg) == raw
    assert wire.decode_body(wire.compound([raw])) == [msg]


@pytest.mark.parametrize("vec", COMPOUNDS, ids=[v["name"] for v in COMPOUNDS])
def test_compound(vec: dict[str, Any]) -> None:
    by_name = {v["name"]: v for v in MESSAGES}
    parts = [bytes.fromhex(by_name[n]["hex"]) for n in vec["parts"]]
    body = bytes.fromhex(vec["hex"])
    assert wire.compound(parts) == body
    assert wire.compound_size([len(p) for p in parts]) == len(body)
    msgs = wire.decode_body(body)
    assert [wire.encode_message(x) for x in msgs] == parts


@pytest.mark.parametrize("vec", ENVELOPES, ids=[v["name"] for v in ENVELOPES])
def test_envelope(vec: dict[str, Any]) -> None:
    ring = _ring(vec["keys"])
    nonce = bytes.fromhex(vec["nonce"]) if vec["nonce"] else bytes(24)
    sender = wire.Codec(
        vec["cluster"],
        ring,
        vec["compress"],
        node_id=vec["sender_node_id"],
        clock=SenderClock(lambda: vec["stamp"]),
        nonce_fn=lambda: nonce,
    )
    receiver = wire.Codec(vec["cluster"], ring, node_id="0b" * 16, guard=ReplayGuard())
    body = bytes.fromhex(vec["body"])
    sealed = bytes.fromhex(vec["envelope"])
    opened = receiver.open_envelope(sealed)
    assert opened.body == body
    assert opened.stamp == vec["stamp"]
    assert opened.sender == bytes.fromhex(vec["sender_node_id"])[:8]
    assert sender.seal(body, vec["receiver_node_id"]) == sealed
    codec = sender
    assert sealed[0] == wire.VERSION
    if ring is None:
        assert sealed[1:5] == bytes(4)
    else:
        assert sealed[1:5] == key_id(ring.primary) == bytes.fromhex(vec["primary_key_id"])
        assert sealed[5:29] == nonce
    assert len(sealed) <= len(body) + codec.overhead


@needs_aes
@pytest.mark.parametrize("vec", PIECES, ids=[v["name"] for v in PIECES])
def test_piece_envelope_in_aes_gcm(vec: dict[str, Any]) -> None:
    ring = _ring(vec["keys"])
    assert ring is not None
    nonce = bytes.fromhex(vec["nonce"])
    sender = wire.Codec(
        vec["cluster"],
        ring,
        False,
        node_id=vec["sender_node_id"],
        clock=SenderClock(lambda: vec["stamp"]),
        nonce_fn=lambda: nonce,
    )
    body = bytes.fromhex(vec["body"])
    sealed = bytes.fromhex(vec["envelope"])
    buf = bytearray(sender.overhead) + body + bytearray(wire.AES_TAIL)
    assert bytes(sender.seal_in_place(buf, vec["receiver_node_id"], aes=True)) == sealed
    assert sealed[0] == wire.VERSION_AES
    assert sealed[1:5] == key_id(ring.primary) == bytes.fromhex(vec["primary_key_id"])
    assert sealed[5:17] == nonce[:12]
    assert len(sealed) == len(body) + sender.overhead - 12
    receiver = wire.Codec(vec["cluster"], ring, node_id=vec["receiver_node_id"], guard=ReplayGuard())
    assert receiver.open_view(bytearray(sealed)) == body


@pytest.mark.parametrize("vec", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_envelope(vec: dict[str, Any]) -> None:
    codec = wire.Codec(
        vec["cluster"], _ring(vec["keys"]), node_id=vec["receiver_node_id"], guard=ReplayGuard()
    )
    for earlier in vec["opened_before"]:
        codec.unpack(bytes.fromhex(earlier))
    error = getattr(errors, vec["error"])
    with pytest.raises(error):
        codec.unpack(bytes.fromhex(vec["envelope"]))


@needs_aes  # the version 3 vector is built with AES-GCM
def test_generator_reproduces_files() -> None:
    for name, doc in gen.build().items():
        assert gen.render(doc) == (VECTORS / name).read_text(encoding="utf-8"), name


@needs_aes
def test_generator_check_mode(tmp_path: Path) -> None:
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert gen.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "messages.json").write_text("{}\n")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1


def test_digest_vectors_follow_the_spec() -> None:
    """proto/vectors/digest.json against PROTOCOL.md 4.5 written out again, not meshd.core.digest."""
    mask = (1 << 64) - 1
    doc = _doc("digest.json")
    buckets = {n: [0] * int(n) for n in doc["digests"]}
    for mem in doc["members"]:
        h = int.from_bytes(hashlib.blake2b(mem["name"].encode(), digest_size=8).digest(), "big")
        assert mem["hash"] == f"{h:016x}"
        z = (h ^ (mem["incarnation"] * 0x9E3779B97F4A7C15) ^ ((mem["state"] + 1) * 0xD1B54A32D192ED03)) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        assert mem["mix"] == f"{z ^ (z >> 31):016x}"
        assert mem["bucket_of_4"] == h >> 62
        for n, values in buckets.items():
            i = h >> (64 - (int(n).bit_length() - 1)) if int(n) > 1 else 0
            values[i] = (values[i] + (z ^ (z >> 31))) & mask
    for n, values in buckets.items():
        assert doc["digests"][n] == b"".join(v.to_bytes(8, "big") for v in values).hex()
