"""meshd.wire: bodies, compounds and the envelope (proto/PROTOCOL.md)."""

from __future__ import annotations

import functools
import os
import random
import typing

import lz4.block
import msgspec
import nacl.bindings
import nacl.exceptions
import pytest

from meshd import wire
from meshd.core import messages as m
from meshd.crypto import Keyring, aes_gcm_available, aes_piece_key, key_id
from meshd.errors import AuthError, DecodeError, ReplayError
from meshd.replay import ReplayGuard, SenderClock

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
    m.SiteSummary(1, 2, "s1", "b", b"{}", ["b"], ["c"]),
    m.PushPullDigest(buckets=bytes(16), query_ltime=5),
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
    clock = SenderClock(lambda: 0x0102)
    plain = _codec(None, node_id="ab" * 16, clock=clock).seal(body, "cd" * 16)
    stamp = (0x0102).to_bytes(8, "little")
    assert plain == b"\x02\x00\x00\x00\x00" + b"\x00\x07default" + stamp + b"\xab" * 8 + b"\xcd" * 8 + body
    sealed = _codec([KEY_A, KEY_B], nonce_fn=lambda: b"N" * 24).seal(body)
    assert sealed[:5] == b"\x02" + key_id(KEY_A)
    assert sealed[5:29] == b"N" * 24
    assert len(sealed) == len(plain) + 40


def test_overhead_is_an_upper_bound() -> None:
    rng = random.Random(1)
    for keys in (None, [KEY_A]):
        codec = _codec(keys, cluster="plant-7")
        assert codec.overhead == 5 + (40 if keys else 0) + 2 + len("plant-7") + 24
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
        codec.open(b"\x01" + packet[1:])
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
    head = b"\x02\x00\x00\x00\x00\x01\x07default" + bytes(8) + b"\x01" * 8 + bytes(8)
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


# --- replay protection (meshd/replay.py, PROTOCOL.md 2.4) -------------------------------------


def _pair(keys: list[bytes] | None = None) -> tuple[wire.Codec, wire.Codec]:
    """A sender gw-a and a receiver gw-b with a replay guard."""
    sender = _codec(keys if keys is not None else [KEY_A], node_id="aa" * 16)
    receiver = _codec(keys if keys is not None else [KEY_A], node_id="bb" * 16, guard=ReplayGuard())
    return sender, receiver


def test_a_replayed_envelope_is_refused_once_opened() -> None:
    sender, receiver = _pair()
    body = wire.encode_body([m.Ack(seq=1)])
    packet = sender.seal(body, "bb" * 16)
    assert receiver.open(packet) == body
    with pytest.raises(ReplayError, match="replay"):
        receiver.open(packet)
    assert receiver.open(sender.seal(body, "bb" * 16)) == body  # a fresh one still goes


def test_an_envelope_for_another_node_is_refused_before_the_guard_records_it() -> None:
    sender, receiver = _pair()
    other = _codec([KEY_A], node_id="cc" * 16, guard=receiver.guard)
    packet = sender.seal(b"\x90", "cc" * 16)
    with pytest.raises(ReplayError, match="another node"):
        receiver.open(packet)
    assert other.open(packet) == b"\x90"  # the node it was meant for takes it
    assert receiver.open(sender.seal(b"\x90")) == b"\x90"  # no receiver named: any node


def test_stale_envelopes_are_refused_by_the_senders_own_clock() -> None:
    wall = [10**15]
    sender = _codec([KEY_A], node_id="aa" * 16, clock=SenderClock(lambda: wall[0]))
    receiver = _codec([KEY_A], node_id="bb" * 16, guard=ReplayGuard())
    old = sender.seal(b"\x90")
    wall[0] += 121_000_000  # 121 s of the SENDER's clock later
    receiver.open(sender.seal(b"\x90"))
    with pytest.raises(ReplayError, match="stale"):
        receiver.open(old)


def test_clocks_hours_apart_do_not_matter() -> None:
    # The receiver never reads a clock: a sender 400 days ahead or at 1970 is heard.
    receiver = _codec([KEY_A], node_id="bb" * 16, guard=ReplayGuard())
    for node, wall in (("aa", 10**15 + 400 * 86_400 * 10**6), ("cc", 5)):
        sender = _codec([KEY_A], node_id=node * 16, clock=SenderClock(functools.partial(int, wall)))
        for _ in range(3):
            assert receiver.open(sender.seal(b"\x90")) == b"\x90"


def test_sender_clock_never_goes_back() -> None:
    wall = [1000]
    clock = SenderClock(lambda: wall[0], floor=5000)  # resumed from persisted state
    stamps = [clock.stamp() for _ in range(3)]
    assert stamps == [5001, 5002, 5003]
    wall[0] = 9000
    assert clock.stamp() == 9000
    wall[0] = 10  # an NTP step back, an RTC reset
    assert clock.stamp() == 9001


def test_guard_survives_a_restart_through_its_export() -> None:
    sender, receiver = _pair()
    seen = [sender.seal(b"\x90", "bb" * 16) for _ in range(3)]
    for p in seen:
        receiver.open(p)
    restarted = _codec([KEY_A], node_id="bb" * 16, guard=ReplayGuard())
    assert restarted.guard is not None
    assert receiver.guard is not None
    restarted.guard.restore(receiver.guard.export())
    for p in seen:
        with pytest.raises(ReplayError):
            restarted.open(p)
    assert restarted.open(sender.seal(b"\x90", "bb" * 16)) == b"\x90"


def test_guard_memory_is_bounded() -> None:
    guard = ReplayGuard(max_senders=100)
    for i in range(1, 1001):
        assert guard.check(i.to_bytes(8, "big"), 1) is None
    assert len(guard) == 100
    assert guard.evicted == 900
    one = b"\x01" * 8
    for t in range(1, 200_000):  # a flood inside one window from one sender
        assert guard.check(one, t) is None
    assert guard.check(one, 199_999) == "replay"
    assert guard.check(one, 2) == "stale"


def test_anonymous_envelopes_are_refused_where_a_guard_runs() -> None:
    anonymous = _codec([KEY_A])
    _, receiver = _pair()
    with pytest.raises(ReplayError, match="anonymous"):
        receiver.open(anonymous.seal(b"\x90"))


def test_variant_shares_clock_guard_and_identity() -> None:
    sender, receiver = _pair()
    plain = receiver.variant(compress=False)
    packet = sender.seal(b"\x90", "bb" * 16)
    plain.open(packet)
    with pytest.raises(ReplayError):
        receiver.open(packet)


# --- large bodies: seal_in_place / open_view (release pieces) --------------------------------------


@pytest.mark.parametrize("keys", [[KEY_A], None])
def test_seal_in_place_is_the_uncompressed_envelope_of_its_body(keys: list[bytes] | None) -> None:
    # Same layout as seal(compress=False): with a fixed nonce and stamp, byte for byte.
    body = b"MDP1" + os.urandom(3000) + bytes(4900)

    def twin() -> wire.Codec:
        clock = SenderClock(lambda: 5_000_000)
        return _codec(keys, node_id="aa" * 8, nonce_fn=lambda: b"\x07" * 24, clock=clock)

    sealer = twin()
    sealed = bytes(sealer.seal_in_place(bytearray(sealer.overhead) + body, "bb" * 8))
    assert sealed == twin().seal(body, "bb" * 8, compress=False)
    receiver = _codec(keys, node_id="bb" * 8)
    assert receiver.open(sealed) == body


@pytest.mark.parametrize("keys", [[KEY_A], None])
def test_open_view_opens_what_seal_makes(keys: list[bytes] | None) -> None:
    body = os.urandom(200_000)
    for compress in (True, False):
        sealed = _codec(keys, compress=compress).seal(body + bytes(5000))
        view = _codec(keys).open_view(sealed)
        assert isinstance(view, memoryview)
        assert view == body + bytes(5000)


def test_open_view_of_a_bytearray_decrypts_where_it_lies() -> None:
    body = os.urandom(300_000)
    sealed = bytearray(_codec([KEY_A]).seal(body, compress=False))
    view = _codec([KEY_A]).open_view(sealed)
    assert view == body
    assert view.obj is sealed  # no second buffer: the body is a view of what was received


def test_open_view_of_a_tampered_bytearray_refuses_and_leaves_it_alone() -> None:
    sealed = bytearray(_codec([KEY_A]).seal(os.urandom(50_000), compress=False))
    sealed[-1] ^= 1
    before = bytes(sealed)
    with pytest.raises(AuthError):
        _codec([KEY_A]).open_view(sealed)
    assert sealed == before  # the MAC is checked before anything is decrypted


@pytest.mark.parametrize("keys", [[KEY_A], None])
def test_seal_in_place_seals_what_follows_the_room_left_for_the_header(keys: list[bytes] | None) -> None:
    body = os.urandom(70_000)
    codec = _codec(keys, node_id="aa" * 8)
    buf = bytearray(codec.overhead) + body
    sealed = codec.seal_in_place(buf, "bb" * 8)
    assert sealed is buf
    assert bytes(_codec(keys, node_id="bb" * 8).open_view(bytes(sealed))) == body
    with pytest.raises(ValueError, match="smaller than the envelope's header"):
        codec.seal_in_place(bytearray(codec.overhead - 1))


def test_open_view_refuses_like_open() -> None:
    good = _codec([KEY_A]).seal(os.urandom(10_000), compress=False)
    tampered = bytearray(good)
    tampered[-1] ^= 1
    with pytest.raises(AuthError):
        _codec([KEY_A]).open_view(bytes(tampered))
    with pytest.raises(AuthError):
        _codec([KEY_B]).open_view(good)  # unknown key id
    with pytest.raises(AuthError):
        _codec([KEY_A]).open_view(_codec(None).seal(b"x" * 100))  # unencrypted
    with pytest.raises(AuthError):
        _codec([KEY_A], cluster="other").open_view(good)
    with pytest.raises(DecodeError):
        _codec([KEY_A]).open_view(good, max_size=1000)
    with pytest.raises(DecodeError):
        _codec([KEY_A]).open_view(good[:20])
    guard = ReplayGuard()
    once = _codec([KEY_A], node_id="aa" * 8).seal(b"y" * 500, "bb" * 8)
    opener = _codec([KEY_A], node_id="bb" * 8, guard=guard)
    assert opener.open_view(once) == b"y" * 500
    with pytest.raises(ReplayError):
        opener.open_view(once)
    with pytest.raises(ReplayError):
        _codec([KEY_A], node_id="cc" * 8).open_view(once)  # meant for another node


# --- version 3: release pieces in AES-256-GCM, for a requester that asks --------------------------

needs_aes = pytest.mark.skipif(
    not aes_gcm_available(), reason="this CPU has no AES instructions: libsodium's AES-256-GCM is off"
)


def _aes_piece(codec: wire.Codec, body: bytes, to: str = "bb" * 8) -> bytearray:
    buf = bytearray(codec.overhead) + body + bytearray(wire.AES_TAIL)
    return bytearray(codec.seal_in_place(buf, to, aes=True))


@needs_aes
def test_an_aes_piece_is_a_version_3_envelope_that_opens_where_it_lies() -> None:
    body = b"MDP1" + os.urandom(200_000)
    sealer = _codec([KEY_A], node_id="aa" * 8)
    assert sealer.aes
    sealed = _aes_piece(sealer, body)
    assert sealed[0] == wire.VERSION_AES
    assert sealed[1 : wire.HEADER_SIZE] == key_id(KEY_A)
    # 12 bytes shorter than version 2's envelope of the same body: a 12-byte nonce, not 24.
    assert len(sealed) == len(sealer.seal(body, "bb" * 8, compress=False)) - 12
    view = _codec([KEY_A], node_id="bb" * 8).open_view(sealed)
    assert view == body
    assert view.obj is sealed  # no second buffer
    assert _codec([KEY_A], node_id="bb" * 8).open_view(bytes(_aes_piece(sealer, body))) == body


@needs_aes
def test_an_aes_piece_is_sealed_under_a_key_derived_from_the_cluster_key() -> None:
    sealed = bytes(_aes_piece(_codec([KEY_A]), b"x" * 1000))
    nonce, box = sealed[5:17], sealed[17:]
    assert aes_piece_key(KEY_A) != KEY_A
    with pytest.raises(nacl.exceptions.CryptoError):  # one key is never used by two ciphers
        nacl.bindings.crypto_aead_aes256gcm_decrypt(box, None, nonce, KEY_A)
    inner = nacl.bindings.crypto_aead_aes256gcm_decrypt(box, None, nonce, aes_piece_key(KEY_A))
    assert inner.endswith(b"x" * 1000)


@needs_aes
def test_an_aes_piece_is_refused_like_any_envelope() -> None:
    good = bytes(_aes_piece(_codec([KEY_A], node_id="aa" * 8), os.urandom(10_000)))
    opener = functools.partial(_codec, node_id="bb" * 8)
    for at in (20, len(good) // 2, len(good) - 1):  # ciphertext, tag
        tampered = bytearray(good)
        tampered[at] ^= 1
        with pytest.raises(AuthError):
            opener([KEY_A]).open_view(tampered)
    with pytest.raises(AuthError):
        opener([KEY_B]).open_view(good)  # unknown key id
    with pytest.raises(AuthError):
        opener([KEY_A], cluster="other").open_view(good)
    with pytest.raises(ReplayError):
        _codec([KEY_A], node_id="cc" * 8).open_view(good)  # meant for another node
    with pytest.raises(DecodeError):
        opener([KEY_A]).open_view(good, max_size=1000)
    with pytest.raises(DecodeError):
        opener([KEY_A]).open_view(good[:32])  # shorter than header, nonce and tag
    guard = ReplayGuard()
    assert opener([KEY_A], guard=guard).open_view(good)
    with pytest.raises(ReplayError):
        opener([KEY_A], guard=guard).open_view(good)
    with pytest.raises(DecodeError, match="unknown envelope version"):
        opener([KEY_A]).open(good)  # gossip and small bodies stay version 2


def test_a_codec_without_aes_answers_in_version_2_and_refuses_version_3() -> None:
    body = os.urandom(5000)
    old = _codec([KEY_A], node_id="aa" * 8)
    old._aes = False  # a CPU without AES instructions (or a node from before version 3)
    sealed = _aes_piece(old, body)
    assert sealed[0] == wire.VERSION
    assert _codec([KEY_A], node_id="bb" * 8).open_view(sealed) == body  # the tail room cut off
    insecure = _aes_piece(_codec(None), body)
    assert _codec(None).open_view(insecure) == body
    if aes_gcm_available():
        v3 = _aes_piece(_codec([KEY_A]), body)
        with pytest.raises(DecodeError, match="unknown envelope version"):
            old.open_view(v3)
    with pytest.raises(ValueError, match="smaller than the envelope's header"):
        old.seal_in_place(bytearray(old.overhead + wire.AES_TAIL - 1), aes=True)
