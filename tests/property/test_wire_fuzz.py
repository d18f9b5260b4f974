"""Property tests: every message round-trips; no input makes wire raise anything but
DecodeError/AuthError (random bytes, and valid packets with flipped bits, cuts and extensions)."""

from __future__ import annotations

import contextlib
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd import wire
from meshd.core import messages as m
from meshd.crypto import Keyring
from meshd.errors import AuthError, DecodeError

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = bytes(range(32))

u64 = st.integers(min_value=0, max_value=2**64 - 1)
text = st.text(max_size=20)
meta = st.dictionaries(text, text, max_size=4)
states = st.builds(
    m.PushNodeState,
    name=text,
    node_id=text,
    addr=text,
    incarnation=u64,
    state=st.sampled_from(m.MemberState),
    meta=meta,
    protocol=u64,
)
response = st.builds(m.QueryResponse, ltime=u64, id=u64, source=text, payload=st.binary(max_size=40))

STRATEGIES: dict[type, st.SearchStrategy[typing.Any]] = {
    m.Ping: st.builds(m.Ping, seq=u64, target=text, source=text, source_addr=text),
    m.IndirectPing: st.builds(
        m.IndirectPing,
        seq=u64,
        target=text,
        target_addr=text,
        source=text,
        source_addr=text,
        nack=st.booleans(),
    ),
    m.Ack: st.builds(m.Ack, seq=u64, source=text),
    m.Nack: st.builds(m.Nack, seq=u64),
    m.Alive: st.builds(
        m.Alive,
        incarnation=u64,
        name=text,
        node_id=text,
        addr=text,
        meta=meta,
        protocol=st.integers(0, 255),
    ),
    m.Suspect: st.builds(m.Suspect, incarnation=u64, name=text, source=text),
    m.Dead: st.builds(m.Dead, incarnation=u64, name=text, source=text),
    m.PushPull: st.builds(
        m.PushPull,
        join=st.booleans(),
        states=st.lists(states, max_size=4),
        reply=st.booleans(),
        query_ltime=u64,
        buckets=st.lists(u64, max_size=4),
        bucket_count=u64,
    ),
    m.KeyOp: st.builds(m.KeyOp, op_id=u64, op=text, key=st.binary(max_size=32)),
    m.Query: st.builds(
        m.Query,
        ltime=u64,
        id=u64,
        name=text,
        payload=st.binary(max_size=40),
        origin=text,
        origin_addr=text,
        filters=st.builds(m.QueryFilter, nodes=st.lists(text, max_size=3), site=text, tags=meta),
        relay_factor=st.integers(0, 10),
        timeout=st.floats(allow_nan=False),
        aggregate=text,
    ),
    m.QueryResponse: response,
    m.Relay: st.builds(m.Relay, dest=text, dest_addr=text, response=response, aggregate=text),
    m.SiteSummary: st.builds(
        m.SiteSummary,
        ltime=u64,
        id=u64,
        site=text,
        source=text,
        payload=st.binary(max_size=40),
        answered=st.lists(text, max_size=3),
        missing=st.lists(text, max_size=3),
    ),
    m.PushPullDigest: st.builds(m.PushPullDigest, buckets=st.binary(max_size=64), query_ltime=u64),
}
messages = st.one_of(*STRATEGIES.values())


def test_strategies_cover_every_message_type() -> None:
    assert set(STRATEGIES) == set(typing.get_args(m.Message))


CODECS = {
    "insecure": wire.Codec("default", None),
    "encrypted": wire.Codec("default", Keyring([KEY])),
}


def _only_wire_errors(codec: wire.Codec, data: bytes) -> None:
    with contextlib.suppress(DecodeError, AuthError):  # anything else fails the test
        codec.unpack(data, max_size=1 << 20)


@FUZZ
@given(msgs=st.lists(messages, max_size=8), secure=st.booleans(), compress=st.booleans())
def test_roundtrip(msgs: list[m.Message], secure: bool, compress: bool) -> None:
    codec = wire.Codec("c", Keyring([KEY]) if secure else None, compress)
    parts = [wire.encode_message(x) for x in msgs]
    body = wire.compound(parts)
    assert len(body) == wire.compound_size([len(p) for p in parts])
    packet = codec.seal(body)
    assert len(packet) <= len(body) + codec.overhead
    assert codec.unpack(packet) == msgs


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    for codec in CODECS.values():
        _only_wire_errors(codec, data)
        _only_wire_errors(codec, b"\x01\x00\x00\x00\x00" + data)  # past the header checks
    with contextlib.suppress(DecodeError):
        wire.decode_body(data)


@st.composite
def mutated_packet(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(CODECS)))
    msgs = draw(st.lists(messages, min_size=1, max_size=6))
    packet = bytearray(CODECS[name].pack([wire.encode_message(x) for x in msgs]))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "extend", "set", "splice"]))
        if kind == "flip" and packet:
            i = draw(st.integers(0, len(packet) - 1))
            packet[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del packet[draw(st.integers(0, len(packet))) :]
        elif kind == "extend":
            packet += draw(st.binary(min_size=1, max_size=20))
        elif kind == "set" and packet:
            packet[draw(st.integers(0, len(packet) - 1))] = draw(st.integers(0, 255))
        elif kind == "splice":
            i = draw(st.integers(0, len(packet)))
            packet[i:i] = draw(st.binary(min_size=1, max_size=8))
    return name, bytes(packet)


@FUZZ
@given(case=mutated_packet())
def test_mutated_packets(case: tuple[str, bytes]) -> None:
    name, packet = case
    _only_wire_errors(CODECS[name], packet)


@FUZZ
@given(msgs=st.lists(messages, min_size=1, max_size=6), data=st.data())
def test_mutated_bodies(msgs: list[m.Message], data: st.DataObject) -> None:
    """Bodies mutated *inside* a valid envelope reach the msgpack/lz4 layers of the decoder."""
    body = bytearray(wire.encode_body(msgs))
    i = data.draw(st.integers(0, len(body) - 1))
    body[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del body[data.draw(st.integers(0, len(body))) :]
    for codec in CODECS.values():
        _only_wire_errors(codec, codec.seal(bytes(body)))


@FUZZ
@given(payload=st.binary(max_size=200), size=st.integers(0, 2**32 - 1))
def test_forged_lz4_payloads(payload: bytes, size: int) -> None:
    packet = b"\x01\x00\x00\x00\x00\x01\x07default" + size.to_bytes(4, "little") + payload
    _only_wire_errors(CODECS["insecure"], packet)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_single_byte_value_at_every_offset(name: str) -> None:
    """Exhaustive over one small packet: each offset set to each of a few telling values."""
    codec = CODECS[name]
    packet = codec.pack([wire.encode_message(m.Ack(seq=1, source="gw"))])
    for i in range(len(packet)):
        for v in (0x00, 0x01, 0x7F, 0x80, 0x90, 0xC1, 0xDD, 0xFF):
            _only_wire_errors(codec, packet[:i] + bytes((v,)) + packet[i + 1 :])
