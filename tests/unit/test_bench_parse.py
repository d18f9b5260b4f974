"""The pure parsers of bench/membership.py: serf's msgpack RPC, loopback frames, /proc and /metrics."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[2] / "bench" / "membership.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_membership", BENCH)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


bench = _load()

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=300),
    lambda kids: st.lists(kids, max_size=20) | st.dictionaries(st.text(max_size=40), kids, max_size=20),
    max_leaves=60,
)


@given(json_like)
def test_msgpack_decode_reads_what_a_standard_encoder_writes(obj: Any) -> None:
    data = msgspec.msgpack.encode(obj)
    decoded, end = bench.msgpack_decode(data)
    assert end == len(data)
    assert decoded == obj


@given(json_like)
def test_msgpack_decode_asks_for_more_on_every_truncation(obj: Any) -> None:
    data = msgspec.msgpack.encode(obj)
    for cut in range(len(data)):
        with pytest.raises(bench.Incomplete):
            bench.msgpack_decode(data[:cut])


def test_msgpack_decode_two_objects_back_to_back() -> None:
    # A serf RPC reply is a header object followed by a body object in one stream.
    data = msgspec.msgpack.encode({"Seq": 1, "Error": ""}) + msgspec.msgpack.encode({"Members": []})
    header, end = bench.msgpack_decode(data)
    body, end2 = bench.msgpack_decode(data, end)
    assert header == {"Seq": 1, "Error": ""}
    assert body == {"Members": []}
    assert end2 == len(data)


def test_serf_member_with_raw_ip_bytes() -> None:
    # Serf's old-spec codec sends net.IP as a raw string: 16 bytes, not UTF-8.
    ip = b"\x00" * 10 + b"\xff\xff\x7f\x00\x00\x01"
    data = b"\x82" + b"\xa4Name" + b"\xa2s0" + b"\xa4Addr" + bytes([0xA0 | len(ip)]) + ip
    member, end = bench.msgpack_decode(data)
    assert end == len(data)
    assert member == {"Name": "s0", "Addr": ip}


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**32 - 1)
        | st.text(max_size=70000),
        lambda kids: st.lists(kids, max_size=20) | st.dictionaries(st.text(max_size=10), kids, max_size=20),
        max_leaves=30,
    )
)
def test_msgpack_encode_round_trips(obj: Any) -> None:
    assert bench.msgpack_decode(bench.msgpack_encode(obj)) == (obj, len(bench.msgpack_encode(obj)))
    assert msgspec.msgpack.decode(bench.msgpack_encode(obj)) == obj


def test_msgpack_encode_serf_request_header() -> None:
    assert bench.msgpack_encode({"Command": "members", "Seq": 3}) == (
        b"\x82\xa7Command\xa7members\xa3Seq\x03"
    )


def _frame(proto: int, sport: int, dport: int, payload: int, tcp_hlen: int = 20) -> bytes:
    l4 = (
        struct.pack(">HHHH", sport, dport, 8 + payload, 0)
        if proto == 17
        else (
            struct.pack(">HHIIBBHHH", sport, dport, 1, 2, (tcp_hlen // 4) << 4, 0x18, 512, 0, 0)
            + b"\x01" * (tcp_hlen - 20)
        )
    )
    total = 20 + len(l4) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, proto, 0, b"\x7f\0\0\1", b"\x7f\0\0\1")
    return b"\0" * 12 + b"\x08\x00" + ip + l4 + b"x" * payload


def test_parse_udp_frame() -> None:
    info = bench.parse_ipv4_frame(_frame(17, 27100, 27101, 120))
    assert info == bench.PacketInfo(proto=17, sport=27100, dport=27101, ip_len=148, payload_len=120)


def test_parse_tcp_frame_with_options_and_truncated_capture() -> None:
    frame = _frame(6, 40000, 27100, 1000, tcp_hlen=32)
    info = bench.parse_ipv4_frame(frame[:96])  # the counter reads 96 bytes of each frame
    assert info == bench.PacketInfo(proto=6, sport=40000, dport=27100, ip_len=1052, payload_len=1000)


def test_parse_frame_rejects_other_traffic() -> None:
    udp = _frame(17, 1, 2, 10)
    assert bench.parse_ipv4_frame(udp[:12] + b"\x86\xdd" + udp[14:]) is None  # IPv6 ethertype
    icmp = bytearray(udp)
    icmp[14 + 9] = 1
    assert bench.parse_ipv4_frame(bytes(icmp)) is None
    assert bench.parse_ipv4_frame(udp[:20]) is None


def test_parse_vm_kb() -> None:
    status = "Name:\tserf\nVmHWM:\t   15160 kB\nVmRSS:\t   14772 kB\nThreads:\t9\n"
    assert bench.parse_vm_kb(status) == 14772
    assert bench.parse_vm_kb(status, "VmHWM") == 15160
    assert bench.parse_vm_kb("Name:\tzombie\n") == 0


def test_parse_prometheus_sums_labelled_samples() -> None:
    text = (
        "# HELP meshd_members members by state\n# TYPE meshd_members gauge\n"
        'meshd_members{state="alive"} 19\nmeshd_members{state="dead",x="a b"} 1\n'
        "meshd_udp_sent_bytes_total 1.5e3\nmeshd_tcp_sent_bytes_total 20\n"
        "meshd_transfer_sent_bytes_total 7\nmeshd_udp_received_bytes_total 9\nbroken_line\n"
    )
    metrics = bench.parse_prometheus(text)
    assert metrics["meshd_members"] == 20
    assert metrics["meshd_udp_sent_bytes_total"] == 1500
    assert bench.pick_byte_counters(metrics) == {
        "meshd_udp_sent_bytes_total": 1500,
        "meshd_tcp_sent_bytes_total": 20,
    }


def test_window_plan_covers_one_push_pull_interval() -> None:
    assert bench.window_plan("lan", False, None) == (30.0, 30.0)
    assert bench.window_plan("local", False, None) == (15.0, 15.0)
    assert bench.window_plan("lan", True, None) == (0.0, 10.0)
    assert bench.window_plan("wan", False, 90.0) == (60.0, 90.0)


def test_ratio_and_formatting() -> None:
    assert bench.ratio(1.0, 2.0) == "0.50"
    assert bench.ratio(None, 2.0) == "n/a"
    assert bench.ratio(1.0, 0) == "n/a"
    assert bench.fmt_num(None) == "n/a"
    assert bench.fmt_num(0.12345, " s", 3) == "0.123 s"


def test_no_slower_verdict() -> None:
    assert bench.no_slower([0.30, 0.26, 0.40], [0.25, 0.26, 0.31], 0.05) is True
    assert bench.no_slower([7.4, 7.3], [6.8, 7.2, 8.9], 0.05) == "within serf's range"
    assert bench.no_slower([9.5, 9.6], [6.8, 7.2, 8.9], 0.05) is False
    assert bench.no_slower([], [1.0], 0.05) is None


def test_the_table_gives_each_figure_with_its_spread() -> None:
    assert bench._spread(1.234, [1.1, 1.234, 1.5], 2) == "1.23 (1.10-1.50)"
    assert bench._spread(None, [], 2) == "n/a"
