"""meshd.wire: bodies, compounds and the envelope (proto/PROTOCOL.md)."""

from __future__ import annotations

import os
import random
import typing

import lz4.block
import msgspec
import pytest

from meshd import wire
from meshd.core import messages as m
from meshd.crypto import Keyring, key_id
from meshd.errors import AuthError, DecodeError

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def _alive(i: int, meta_size: int = 2) -> m.Alive:
    return m.Alive(
        incarnation=i,
        name=f"gw-{i:04d}",
        node_id=f"{i:032x}",
        addr=f"198.18.0.{i % 250}:7788",
        meta={f"k{j}": "passing" for j in range(meta_size)},
    )


SAMPLES: list[m.Message] = [
    m.Ping(seq=1, target="b", source="a", source_addr="127.0.0.1:1"),
    m.IndirectPing(seq=2, target="c", target_addr="127.0.0.1:3", source="a", source_addr="x"),
    m.Ack(seq=3),
    m.Nack(seq=4),
    _alive(5),
    m.Suspect(incarnation=1, name="b", source="a"),
    m.Dead(incarnation=1, name="b", source="b"),
    m.PushPull(
        join=True,
        states=[m.PushNodeState("n", "id", "127.0.0.1:2", 3, m.MemberState.DEAD, {"a": "b"})],
    ),
    m.KeyOp(op_id=9, op="use", key=KEY_B),
    m.Query(ltime=1, id=2, name="q", payload=b"\x00", origin="a", origin_addr="127.0.0.1:1"),
    m.QueryResponse(ltime=1, id=2, source="b", payload=b"r"),
    m.Relay(dest="a", dest_addr="127.0.0.1:1", response=m.QueryResponse(1, 2, "b", b"")),
]


def _codec(keys: list[bytes] | None = None, cluster: str = "default", **kw: typing.Any) -> wire.Codec:
    return wire.Codec(cluster, Keyring(keys) if keys is not None else None, **kw)


# --- bodies ---------------------------------------------------------------------------------------


def test_samples_cover_every_message_type() -> None:
    assert {type(x) for x in SAMPLES} == set(typing.get_args(m.Message))


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_message_roundtrip(msg: m.Message) -> None:
    raw = wire.encode_message(msg)
    assert raw[1] == msg.__struct_config__.tag
    assert wire.decode_body(wire.compound([raw])) == [msg]


def test_compound_equals_encode_body_and_size_is_exact() -> None:
    for n in (0, 1, 15, 16, 17, 300, 65535, 65536, 70000):
        msgs: list[m.Message] = [m.Nack(seq=i % 200) for i in range(n)]
        parts = [wire.encode_message(x) for x in msgs]
        body = wire.compound(parts)
        assert body == wire.encode_body(msgs)
        assert wire.compound_size([len(p) for p in parts]) == len(body)
        assert wire.decode_body(body) == msgs


def test_large_part_in_compound() -> None:
    big = m.PushPull(
        join=False,
        states=[
            m.PushNodeState(f"n{i}", f"{i:032x}", "127.0.0.1:1", i, m.MemberState.ALIVE, {"x": "y" * 50})
            for i in range(2000)
        ],
    )
    parts = [wire.encode_message(big), wire.encode_message(m.Ack(seq=1))]
    assert len(parts[0]) > 65535  # bigger than memberlist's u16 part length
    assert wire.decode_body(wire.compound(parts)) == [big, m.Ack(seq=1)]


def test_unknown_tag_is_decode_error() -> None:
    body = wire.compound([wire.encode_message(m.Ack(seq=1)), b"\x92\x63\x00"])  # [99, 0]
    with pytest.raises(DecodeError, match="bad body"):
        wire.decode_body(body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x91",  # array of one, nothing in it
        b"\xc0",  # nil, not an array
        b"\x91\x92\x03",  # Ack missing seq
        b"\x91\x92\x03\xa1",  # truncated string
        b"\x91\x93\x03\x01\xa1\xff",  # invalid UTF-8 in a str field
        b"\x91\x92\x03\xcb\x00\x00\x00\x00\x00\x00\x00\x00",  # float where int is due
        b"\x90\x00",  # trailing byte
        b"\xdd\xff\xff\xff\xff",  # claims 4 billion messages
    ],
)
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(DecodeError):
        wire.decode_body(body)


def test_bad_member_state_is_decode_error() -> None:
    good = wire.encode_message(
        m.PushPull(join=True, states=[m.PushNodeState("n", "i", "a", 1, m.MemberState.ALIVE)])
    )
    bad = good.replace(b"\x01\x00\x80", b"\x01\x09\x80")  # incarnation 1, state 0 -> 9, meta {}
    assert bad != good
    with pytest.raises(DecodeError):
        wire.decode_body(wire.compound([bad]))


def test_trailing_fields_are_ignored() -> None:
    """Forward compatibility: a newer sender may append fields (PROTOCOL.md, versioning)."""
    newer = msgspec.msgpack.encode([3, 7, "gw-b", "a field from the future", 12])
    assert wire.decode_body(wire.compound([newer])) == [m.Ack(seq=7, source="gw-b")]


# --- envelope -------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [None, [KEY_A], [KEY_A, KEY_B]])
@pytest.mark.parametrize("compress", [True, False])
def test_pack_unpack_roundtrip(keys: list[bytes] | None, compress: bool) -> None:
    codec = _codec(keys, compress=compress)
    for msgs in (SAMPLES, [_alive(i) for i in range(40)], []):
        packet = codec.pack([wire.encode_message(x) for x in msgs])
        assert codec.unpack(packet) == msgs


def test_envelope_layout() -> None:
    body = wire.encode_body([m.Ack(seq=1)])
    plain = _codec(None).seal(body)
    assert plain == b"\x01\x00\x00\x00\x00" + b"\x00\x07default" + body
    sealed = _codec([KEY_A, KEY_B], nonce_fn=lambda: b"N" * 24).seal(body)
    assert sealed[:5] == b"\x01" + key_id(KEY_A)
    assert sealed[5:29] == b"N" * 24
    assert len(sealed) == len(plain) + 40


def test_overhead_is_an_upper_bound() -> None:
    rng = random.Random(1)
    for keys in (None, [KEY_A]):
        codec = _codec(keys, cluster="plant-7")
        assert codec.overhead == 5 + (40 if keys else 0) + 2 + len("plant-7")
        assert codec.body_budget(1400) == 1400 - codec.overhead
        for size in (0, 1, 63, 64, 65, 500, 1400, 10_000):
            for body in (rng.randbytes(size), b"a" * size):
                assert len(codec.seal(body)) <= size + codec.overhead


def test_nonces_are_fresh() -> None:
    codec = _codec([KEY_A])
    body = wire.encode_body([m.Ack(seq=1)])
    sealed = {codec.seal(body)[5:29] for _ in range(100)}
    assert len(sealed) == 100


def test_lz4_only_when_smaller() -> None:
    codec = _codec(None)  # insecure, so the flags byte is visible at offset 5
    incompressible = wire.encode_body([m.KeyOp(op_id=1, op="install", key=os.urandom(32))])
    random_body = wire.encode_body([m.QueryResponse(ltime=1, id=1, source="x", payload=os.urandom(1000))])
    compressible = wire.encode_body([_alive(i) for i in range(30)])
    for body, flagged in ((incompressible, 0), (random_body, 0), (compressible, 1)):
        packet = codec.seal(body)
        assert packet[5] == flagged
        assert codec.open(packet) == body
    packet = codec.seal(compressible)
    assert len(packet) < len(compressible)
    assert _codec(None, compress=False).seal(compressible)[5] == 0
    # a receiver with compression off still reads compressed packets
    assert _codec(None, compress=False).open(packet) == compressible


def test_short_bodies_are_not_compressed() -> None:
    body = b"\x91" + b"\xa0" * (wire.COMPRESS_MIN - 2)
    assert _codec(None).seal(body)[5] == 0


def test_wrong_key_is_auth_error() -> None:
    packet = _codec([KEY_A]).pack([wire.encode_message(m.Ack(seq=1))])
    with pytest.raises(AuthError, match="unknown key id"):
        _codec([KEY_B]).open(packet)


def test_same_key_id_but_wrong_key_is_auth_error() -> None:
    packet = bytearray(_codec([KEY_A]).pack([wire.encode_message(m.Ack(seq=1))]))
    packet[1:5] = key_id(KEY_B)  # claims key B: decrypting with B fails the MAC
    with pytest.raises(AuthError, match="authenticate"):
        _codec([KEY_B]).open(bytes(packet))


def test_other_cluster_is_auth_error() -> None:
    for keys in (None, [KEY_A]):
        packet = _codec(keys, cluster="site-a").pack([wire.encode_message(m.Ack(seq=1))])
        for other in ("site-b", "site-a2", "site", ""):
            with pytest.raises(AuthError, match="another cluster"):
                _codec(keys, cluster=other).open(packet)


def test_secure_and_insecure_refuse_each_other() -> None:
    body = wire.encode_body([m.Ack(seq=1)])
    with pytest.raises(AuthError):
        _codec([KEY_A]).open(_codec(None).seal(body))
    with pytest.raises(AuthError):
        _codec(None).open(_codec([KEY_A]).seal(body))


def test_tampering_is_auth_error() -> None:
    codec = _codec([KEY_A])
    packet = codec.seal(wire.encode_body(SAMPLES))
    for i in range(5, len(packet)):
        flipped = bytearray(packet)
        flipped[i] ^= 0x40
        with pytest.raises(AuthError):
            codec.open(bytes(flipped))


def test_bad_version_and_flags() -> None:
    codec = _codec(None)
    packet = codec.seal(wire.encode_body([m.Ack(seq=1)]))
    with pytest.raises(DecodeError, match="version"):
        codec.open(b"\x02" + packet[1:])
    with pytest.raises(DecodeError, match="flags"):
        codec.open(packet[:5] + b"\x80" + packet[6:])


@pytest.mark.parametrize("keys", [None, [KEY_A]])
def test_truncated_packets(keys: list[bytes] | None) -> None:
    codec = _codec(keys)
    packet = codec.pack([wire.encode_message(x) for x in SAMPLES])
    for cut in range(len(packet)):
        with pytest.raises(DecodeError):
            codec.unpack(packet[:cut])


def test_oversized_envelope() -> None:
    codec = _codec(None, compress=False)
    body = wire.encode_body([m.QueryResponse(1, 1, "x", b"\x00" * 5000)])
    packet = codec.seal(body)
    assert codec.open(packet, max_size=len(body)) == body
    with pytest.raises(DecodeError, match="too large"):
        codec.open(packet, max_size=len(body) - 1)


def test_decompressed_size_is_capped() -> None:
    codec = _codec(None)
    body = wire.encode_body([m.QueryResponse(1, 1, "x", b"\x00" * 100_000)])
    packet = codec.seal(body)
    assert packet[5] == 1
    assert len(packet) < 1000
    assert codec.open(packet, max_size=len(body)) == body
    with pytest.raises(DecodeError, match="exceeds"):
        codec.open(packet, max_size=len(body) - 1)


def test_lz4_lies_are_decode_errors() -> None:
    codec = _codec(None)
    head = b"\x01\x00\x00\x00\x00\x01\x07default"
    block = lz4.block.compress(b"x" * 1000, store_size=False)
    cases = [
        (2**31).to_bytes(4, "little") + block,  # bomb: refused before allocating
        (999).to_bytes(4, "little") + block,  # wrong size
        (1001).to_bytes(4, "little") + block,
        (1000).to_bytes(4, "little") + block[:-3],  # cut block
        (1000).to_bytes(4, "little") + b"\xff" * 20,  # garbage block
        b"\x10\x00",  # no room for the size
    ]
    for payload in cases:
        with pytest.raises(DecodeError):
            codec.open(head + payload)
    assert codec.open(head + (1000).to_bytes(4, "little") + block) == b"x" * 1000


def test_cluster_name_limits() -> None:
    wire.Codec("x" * 255, None)
    with pytest.raises(ValueError, match="cluster name longer"):
        wire.Codec("x" * 256, None)
    codec = wire.Codec("zürich-ß", None)
    assert codec.unpack(codec.pack([wire.encode_message(m.Ack(seq=1))])) == [m.Ack(seq=1)]


def test_key_rotation() -> None:
    """install everywhere -> use everywhere -> remove everywhere; no packet is lost."""
    ring_a, ring_b = Keyring([KEY_A]), Keyring([KEY_A])
    a, b = wire.Codec("c", ring_a), wire.Codec("c", ring_b)
    body = wire.encode_body([m.Ack(seq=1)])

    ring_a.install(KEY_B)
    ring_b.install(KEY_B)
    assert a.seal(body)[1:5] == key_id(KEY_A)  # install does not change what encrypts
    assert b.open(a.seal(body)) == body

    ring_a.use(KEY_B)  # a switched, b not yet: both still read each other
    assert a.seal(body)[1:5] == key_id(KEY_B)
    assert b.open(a.seal(body)) == body
    assert a.open(b.seal(body)) == body

    ring_b.use(KEY_B)
    old_packet = wire.Codec("c", Keyring([KEY_A])).seal(body)
    ring_a.remove(KEY_A)
    ring_b.remove(KEY_A)
    assert b.open(a.seal(body)) == body
    with pytest.raises(AuthError):
        a.open(old_packet)


def test_open_accepts_bytearray() -> None:
    codec = _codec([KEY_A])
    packet = codec.pack([wire.encode_message(m.Ack(seq=1))])
    assert codec.unpack(bytearray(packet)) == [m.Ack(seq=1)]  # type: ignore[arg-type]


def test_auth_error_is_a_decode_error() -> None:
    # callers that only count drops can catch DecodeError; AuthError is the finer reason
    assert issubclass(AuthError, DecodeError)
