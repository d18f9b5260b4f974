#!/usr/bin/env python3
"""Membership benchmark: meshd against HashiCorp Serf, side by side, on 127.0.0.1.

One run starts N meshd nodes, measures them, stops them, then does the same with N Debian `serf`
agents at the same timing preset, and writes a COMPASS-style table to bench/results/membership.md.

Measured per system (see bench/README.md for the method):
- join: N-1 nodes converged, a fresh node joins the seed; time until every member lists it alive;
- failure detection: kill -9 of one member; time until every survivor lists it dead ('failed' in serf);
- resident memory per node (VmRSS of the node's process group, mean and max);
- gossip bytes per node per second in a steady N-node cluster, counted by a packet socket on `lo`
  (AF_PACKET, outgoing copies only) for the nodes' gossip ports, UDP and TCP alike: the same method
  for both systems, nothing installed and no firewall rules.

Everything stays on loopback. Every process is started in its own session and its process group is
killed in a finally block, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "membership.md"
HOST = "127.0.0.1"

# --------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested in tests/unit/test_bench_parse.py)
# --------------------------------------------------------------------------------------------------


class Incomplete(Exception):
    """The buffer ends inside a msgpack object: read more bytes."""


def msgpack_decode(buf: bytes, pos: int = 0) -> tuple[Any, int]:
    """Decode one msgpack object at buf[pos:]; return (object, end position).

    Serf's RPC speaks the old msgpack spec, where byte strings (such as member IPs) travel as raw
    strings: a raw that is not UTF-8 is returned as bytes. Raises Incomplete when buf is short.
    """

    def need(n: int) -> None:
        if pos + n > len(buf):
            raise Incomplete

    need(1)
    b = buf[pos]
    pos += 1

    def raw(n: int) -> tuple[Any, int]:
        need(n)
        data = buf[pos : pos + n]
        try:
            return data.decode(), pos + n
        except UnicodeDecodeError:
            return bytes(data), pos + n

    def seq(n: int, p: int, is_map: bool) -> tuple[Any, int]:
        if is_map:
            out_map: dict[Any, Any] = {}
            for _ in range(n):
                k, p = msgpack_decode(buf, p)
                v, p = msgpack_decode(buf, p)
                out_map[k if not isinstance(k, bytes) else k.decode(errors="replace")] = v
            return out_map, p
        out_list = []
        for _ in range(n):
            v, p = msgpack_decode(buf, p)
            out_list.append(v)
        return out_list, p

    def fixed(fmt: str) -> tuple[Any, int]:
        size = struct.calcsize(fmt)
        need(size)
        return struct.unpack_from(fmt, buf, pos)[0], pos + size

    if b <= 0x7F:
        return b, pos
    if 0x80 <= b <= 0x8F:
        return seq(b & 0x0F, pos, True)
    if 0x90 <= b <= 0x9F:
        return seq(b & 0x0F, pos, False)
    if 0xA0 <= b <= 0xBF:
        return raw(b & 0x1F)
    if b >= 0xE0:
        return b - 0x100, pos
    if b == 0xC0:
        return None, pos
    if b == 0xC2:
        return False, pos
    if b == 0xC3:
        return True, pos
    if b in (0xC4, 0xD9):  # bin8, str8
        n, pos = fixed(">B")
        return raw(n) if b == 0xD9 else _bin(buf, pos, n)
    if b in (0xC5, 0xDA):
        n, pos = fixed(">H")
        return raw(n) if b == 0xDA else _bin(buf, pos, n)
    if b in (0xC6, 0xDB):
        n, pos = fixed(">I")
        return raw(n) if b == 0xDB else _bin(buf, pos, n)
    simple = {
        0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
        0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
    }  # fmt: skip
    if b in simple:
        return fixed(simple[b])
    if b in (0xDC, 0xDD, 0xDE, 0xDF):
        n, pos = fixed(">H" if b in (0xDC, 0xDE) else ">I")
        return seq(n, pos, b in (0xDE, 0xDF))
    ext = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
    if b in ext:
        need(1 + ext[b])
        return ("ext", buf[pos], bytes(buf[pos + 1 : pos + 1 + ext[b]])), pos + 1 + ext[b]
    if b in (0xC7, 0xC8, 0xC9):
        n, pos = fixed({0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}[b])
        need(1 + n)
        return ("ext", buf[pos], bytes(buf[pos + 1 : pos + 1 + n])), pos + 1 + n
    raise ValueError(f"msgpack: unknown type byte 0x{b:02x}")


def _bin(buf: bytes, pos: int, n: int) -> tuple[bytes, int]:
    if pos + n > len(buf):
        raise Incomplete
    return bytes(buf[pos : pos + n]), pos + n


def msgpack_encode(obj: Any) -> bytes:
    """Encode the few types serf RPC requests use: dict, list, str, bytes, int, bool, None."""
    if obj is None:
        return b"\xc0"
    if obj is True:
        return b"\xc3"
    if obj is False:
        return b"\xc2"
    if isinstance(obj, int):
        if 0 <= obj <= 0x7F:
            return bytes([obj])
        if -32 <= obj < 0:
            return struct.pack(">b", obj)
        if 0 <= obj <= 0xFFFFFFFF:
            return b"\xce" + struct.pack(">I", obj)
        return b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, str):
        data = obj.encode()
        # Old-spec raw types only (fixraw, raw16, raw32): what serf's codec expects.
        if len(data) <= 31:
            return bytes([0xA0 | len(data)]) + data
        if len(data) <= 0xFFFF:
            return b"\xda" + struct.pack(">H", len(data)) + data
        return b"\xdb" + struct.pack(">I", len(data)) + data
    if isinstance(obj, bytes):
        return b"\xda" + struct.pack(">H", len(obj)) + obj
    if isinstance(obj, (list, tuple)):
        head = bytes([0x90 | len(obj)]) if len(obj) <= 15 else b"\xdc" + struct.pack(">H", len(obj))
        return head + b"".join(msgpack_encode(x) for x in obj)
    if isinstance(obj, dict):
        head = bytes([0x80 | len(obj)]) if len(obj) <= 15 else b"\xde" + struct.pack(">H", len(obj))
        return head + b"".join(msgpack_encode(k) + msgpack_encode(v) for k, v in obj.items())
    raise TypeError(f"msgpack_encode: {type(obj).__name__}")


# memberlist's PushPullInterval per preset (the same in meshd's presets); below 32 nodes it is not
# scaled, so one window of this length in steady state holds exactly one push-pull per node.
PUSH_PULL_S = {"lan": 30.0, "wan": 60.0, "local": 15.0}


def window_plan(profile: str, quick: bool, bw_seconds: float | None) -> tuple[float, float]:
    """(warm-up since the last node started, counting window) for the bandwidth measurement.

    memberlist's first periodic push-pull comes a random stagger plus one interval after start, so a
    window that begins one interval after the last start and lasts one interval counts exactly one
    push-pull per node. --quick skips the warm-up and counts mostly the UDP probe/gossip traffic.
    """
    interval = PUSH_PULL_S[profile]
    if quick:
        return 0.0, bw_seconds or 10.0
    return interval, bw_seconds or interval


ETH_HLEN = 14  # loopback frames carry a zeroed Ethernet header
IPPROTO_TCP = 6
IPPROTO_UDP = 17


@dataclass(frozen=True)
class PacketInfo:
    proto: int  # 6 TCP, 17 UDP
    sport: int
    dport: int
    ip_len: int  # IPv4 total length: IP + transport headers + payload
    payload_len: int  # transport payload


def parse_ipv4_frame(frame: bytes) -> PacketInfo | None:
    """Parse the head of an Ethernet frame seen on `lo`; None unless IPv4 TCP/UDP.

    Only the first ~64 bytes are needed: sizes come from the IP and TCP headers, not from the
    captured length, so the capture can truncate.
    """
    if len(frame) < ETH_HLEN + 20 or frame[12:14] != b"\x08\x00":
        return None
    ip = ETH_HLEN
    vihl = frame[ip]
    if vihl >> 4 != 4:
        return None
    ihl = (vihl & 0x0F) * 4
    total = struct.unpack_from(">H", frame, ip + 2)[0]
    proto = frame[ip + 9]
    l4 = ip + ihl
    if proto not in (IPPROTO_TCP, IPPROTO_UDP) or len(frame) < l4 + 4:
        return None
    sport, dport = struct.unpack_from(">HH", frame, l4)
    if proto == IPPROTO_UDP:
        payload = total - ihl - 8
    else:
        if len(frame) < l4 + 13:
            return None
        payload = total - ihl - (frame[l4 + 12] >> 4) * 4
    return PacketInfo(proto, sport, dport, total, max(payload, 0))


def parse_vm_kb(status_text: str, key: str = "VmRSS") -> int:
    """The kB value of `key:` in a /proc/PID/status text (0 when absent, e.g. a zombie)."""
    for line in status_text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum the samples of each metric name in a Prometheus text exposition (labels dropped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name_part, _, rest = line.partition(" ") if "{" not in line.split(" ")[0] else line.partition("}")
        name = name_part.split("{")[0]
        fields = rest.split()
        if not fields:
            continue
        try:
            out[name] = out.get(name, 0.0) + float(fields[0])
        except ValueError:
            continue
    return out


def pick_byte_counters(metrics: dict[str, float]) -> dict[str, float]:
    """The sent-bytes counters of a meshd /metrics page (names holding 'bytes' and out/sent/tx)."""
    return {
        k: v
        for k, v in metrics.items()
        if "bytes" in k
        and any(w in k for w in ("_out", "sent", "_tx"))
        and "transfer" not in k
        and "origin" not in k
    }


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def fmt_num(v: float | None, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}{unit}"


# --------------------------------------------------------------------------------------------------
# Processes, memory, CPU
# --------------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_pids(pgid: int) -> list[int]:
    """Every live process in process group pgid (a node and whatever it forked)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def group_rss_kb(pgid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in kB summed over the process group."""
    rss = hwm = 0
    for pid in group_pids(pgid):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss += parse_vm_kb(text, "VmRSS")
        hwm += parse_vm_kb(text, "VmHWM")
    return rss, hwm


def group_cpu_s(pgid: int) -> float:
    total = 0
    for pid in group_pids(pgid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def port_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                return False
    return True


def free_port_block(start: int, count: int) -> int:
    """First base >= start such that base..base+count-1 are free for TCP and UDP on 127.0.0.1."""
    base = start
    while base + count < 65000:
        bad = next((p for p in range(base, base + count) if not port_free(p)), None)
        if bad is None:
            return base
        base = bad + 1
    raise RuntimeError("no free port block on 127.0.0.1")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# Every process this script started, so the last finally can kill whatever is left.
SPAWNED: list[Proc] = []


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    fh = open(log, "wb")  # noqa: SIM115 - the child owns it
    try:
        popen = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )  # fmt: skip
    finally:
        fh.close()
    proc = Proc(name, popen, log)
    SPAWNED.append(proc)
    return proc


# --------------------------------------------------------------------------------------------------
# Loopback byte counter (AF_PACKET on lo)
# --------------------------------------------------------------------------------------------------

SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003


SO_ATTACH_FILTER = 26
SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # SKF_AD_OFF + SKF_AD_PKTTYPE: the packet's direction
SNAP = 96  # bytes kept of each frame: enough for the Ethernet, IPv4 and TCP/UDP headers


def port_range_filter(lo: int, hi: int) -> bytes:
    """A classic BPF program: keep outgoing IPv4 TCP/UDP frames with a port in [lo, hi], cut to SNAP.

    The kernel then queues only the packets of the nodes under test, so other loopback traffic on a
    busy machine cannot overflow the socket (dropped packets would be uncounted bytes).
    """
    ld_w, ld_h, ld_b, ldx_msh, ld_h_ind = 0x20, 0x28, 0x30, 0xB1, 0x48
    jeq, jgt, jge, jset, ret = 0x15, 0x25, 0x35, 0x45, 0x06
    accept, drop = 16, 17
    prog = [  # (code, jump-if-true target, jump-if-false target, k): targets are indexes here
        (ld_w, 0, 0, SKF_AD_PKTTYPE),  # 0
        (jeq, 2, drop, PACKET_OUTGOING),  # 1
        (ld_h, 0, 0, 12),  # 2 ethertype
        (jeq, 4, drop, 0x0800),  # 3
        (ld_b, 0, 0, ETH_HLEN + 9),  # 4 IP protocol
        (jeq, 7, 6, IPPROTO_UDP),  # 5
        (jeq, 7, drop, IPPROTO_TCP),  # 6
        (ld_h, 0, 0, ETH_HLEN + 6),  # 7 flags + fragment offset
        (jset, drop, 9, 0x1FFF),  # 8 a later fragment carries no ports
        (ldx_msh, 0, 0, ETH_HLEN),  # 9 x = IP header length
        (ld_h_ind, 0, 0, ETH_HLEN),  # 10 source port
        (jge, 12, 13, lo),  # 11
        (jgt, 13, accept, hi),  # 12
        (ld_h_ind, 0, 0, ETH_HLEN + 2),  # 13 destination port
        (jge, 15, drop, lo),  # 14
        (jgt, drop, accept, hi),  # 15
        (ret, 0, 0, SNAP),  # 16 accept
        (ret, 0, 0, 0),  # 17 drop
    ]
    jumps = (jeq, jgt, jge, jset)
    out = b""
    for pc, (code, jt, jf, k) in enumerate(prog):
        rel_t, rel_f = (jt - pc - 1, jf - pc - 1) if code in jumps else (0, 0)
        out += struct.pack("HBBI", code, rel_t, rel_f, k)
    return out


class LoopbackCounter:
    """Counts bytes of TCP/UDP packets on `lo` whose source or destination port is a gossip port.

    Every loopback packet shows up twice on a packet socket (sent and received); only the outgoing
    copy is counted, so each packet counts once. TCP packets count when either end is a gossip
    port (push-pull connections come from ephemeral ports). Needs CAP_NET_RAW (root).
    """

    def __init__(self, ports: Iterable[int]) -> None:
        self.ports = frozenset(ports)
        self.udp_bytes = self.tcp_bytes = self.udp_payload = self.tcp_payload = 0
        self.udp_packets = self.tcp_packets = 0
        self.drops = 0
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        prog = port_range_filter(min(self.ports), max(self.ports))
        code = ctypes.create_string_buffer(prog, len(prog))
        fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(code))  # struct sock_fprog
        self._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, name="lo-counter", daemon=True)
        self.started = self.stopped = 0.0

    def start(self) -> None:
        self._drain()
        self.started = time.monotonic()
        self._thread.start()

    def _drain(self) -> None:
        self._sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self._sock.recv(64)
        self._sock.settimeout(0.2)
        self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)  # reading resets the counters

    def _run(self) -> None:
        buf = bytearray(SNAP)
        view = memoryview(buf)
        ports = self.ports
        while not self._stop.is_set():
            try:
                n, addr = self._sock.recvfrom_into(view, SNAP)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] != PACKET_OUTGOING:
                continue
            info = parse_ipv4_frame(bytes(view[:n]))
            if info is None:
                continue
            if info.proto == IPPROTO_UDP:
                if info.sport in ports:
                    self.udp_bytes += info.ip_len
                    self.udp_payload += info.payload_len
                    self.udp_packets += 1
            elif info.sport in ports or info.dport in ports:
                self.tcp_bytes += info.ip_len
                self.tcp_payload += info.payload_len
                self.tcp_packets += 1

    def stop(self) -> float:
        self.stopped = time.monotonic()
        self._stop.set()
        self._thread.join(2)
        with contextlib.suppress(OSError):
            _packets, self.drops = struct.unpack(
                "II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            )
        self._sock.close()
        return self.stopped - self.started


# --------------------------------------------------------------------------------------------------
# The two systems
# --------------------------------------------------------------------------------------------------


class System:
    """One membership system: how to start a node, join it, and read its member list."""

    label = ""
    alive_state = "alive"
    dead_states: frozenset[str] = frozenset()

    def __init__(self, n: int, profile: str, workdir: Path, base_port: int, key: str | None) -> None:
        self.n = n
        self.profile = profile
        self.workdir = workdir
        self.base = base_port
        self.key = key
        self.procs: dict[int, Proc] = {}

    def name(self, i: int) -> str:
        raise NotImplementedError

    def gossip_port(self, i: int) -> int:
        return self.base + i

    def ctl_port(self, i: int) -> int:
        return self.base + 100 + i

    def start(self, i: int, join_seed: bool) -> Proc:
        raise NotImplementedError

    async def ready(self, i: int) -> bool:
        raise NotImplementedError

    async def join(self, i: int, seed: int) -> None:
        raise NotImplementedError

    async def members(self, i: int) -> dict[str, str]:
        raise NotImplementedError

    async def metrics(self, i: int) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        pass

    def kill_all(self) -> None:
        for p in self.procs.values():
            p.kill_group()
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(5)


class SerfRPC:
    """A persistent serf RPC connection (msgpack header + body, as `serf members` uses)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seq = 0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = b""
        self.lock = asyncio.Lock()

    async def _read_obj(self) -> Any:
        assert self.reader is not None
        while True:
            try:
                obj, end = msgpack_decode(self.buf)
                self.buf = self.buf[end:]
                return obj
            except Incomplete:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise ConnectionError("serf RPC closed") from None
                self.buf += chunk

    async def call(self, command: str, body: dict[str, Any] | None, has_reply_body: bool) -> Any:
        async with self.lock:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
                self.buf = b""
                await self._request("handshake", {"Version": 1}, False)
            return await self._request(command, body, has_reply_body)

    async def _request(self, command: str, body: dict[str, Any] | None, has_reply_body: bool) -> Any:
        assert self.writer is not None
        self.seq += 1
        data = msgpack_encode({"Command": command, "Seq": self.seq})
        if body is not None:
            data += msgpack_encode(body)
        self.writer.write(data)
        await self.writer.drain()
        header = await self._read_obj()
        if header.get("Error"):
            raise RuntimeError(f"serf RPC {command}: {header['Error']}")
        return await self._read_obj() if has_reply_body else None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            self.writer = None


class Serf(System):
    label = "serf"
    dead_states = frozenset({"failed"})

    def __init__(self, *a: Any, serf_bin: str = "serf", **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.serf_bin = serf_bin
        self.rpc: dict[int, SerfRPC] = {}

    def name(self, i: int) -> str:
        return f"s{i}"

    def start(self, i: int, join_seed: bool) -> Proc:
        argv = [
            self.serf_bin, "agent", f"-node={self.name(i)}",
            f"-bind={HOST}:{self.gossip_port(i)}", f"-rpc-addr={HOST}:{self.ctl_port(i)}",
            f"-profile={self.profile}", "-log-level=info",
        ]  # fmt: skip
        if self.key:
            argv.append(f"-encrypt={self.key}")
        if join_seed:
            argv.append(f"-join={HOST}:{self.gossip_port(0)}")
        proc = spawn(self.name(i), argv, self.workdir / f"{self.name(i)}.log")
        self.procs[i] = proc
        self.rpc[i] = SerfRPC(self.ctl_port(i))
        return proc

    async def ready(self, i: int) -> bool:
        try:
            await self.members(i)
            return True
        except (OSError, ConnectionError, RuntimeError):
            await self.rpc[i].close()
            return False

    async def join(self, i: int, seed: int) -> None:
        reply = await self.rpc[i].call(
            "join", {"Existing": [f"{HOST}:{self.gossip_port(seed)}"], "Replay": False}, True
        )
        if not reply.get("Num"):
            raise RuntimeError(f"serf join returned {reply}")

    async def members(self, i: int) -> dict[str, str]:
        reply = await self.rpc[i].call("members", None, True)
        return {m["Name"]: m["Status"] for m in reply["Members"]}

    async def close(self) -> None:
        for r in self.rpc.values():
            await r.close()


class Meshd(System):
    label = "meshd"
    dead_states = frozenset({"dead"})

    def __init__(self, *a: Any, meshd_cmd: list[str], **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.cmd = meshd_cmd
        self.session: Any = None
        self.key_file: Path | None = None
        if self.key:
            self.key_file = self.workdir / "cluster.key"
            self.key_file.write_text(self.key + "\n")
            self.key_file.chmod(0o600)

    def name(self, i: int) -> str:
        return f"m{i}"

    def data_dir(self, i: int) -> Path:
        return self.workdir / self.name(i)

    def start(self, i: int, join_seed: bool) -> Proc:
        argv = [
            *self.cmd, "run", "--name", self.name(i), "--bind", f"{HOST}:{self.gossip_port(i)}",
            "--api", f"{HOST}:{self.ctl_port(i)}", "--data-dir", str(self.data_dir(i)),
            "--profile", self.profile, "--no-mdns",
        ]  # fmt: skip
        argv += ["--cluster-key-file", str(self.key_file)] if self.key_file else ["--insecure"]
        if join_seed:
            argv += ["--join", f"{HOST}:{self.gossip_port(0)}"]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        proc = spawn(self.name(i), argv, self.workdir / f"{self.name(i)}.log", env)
        self.procs[i] = proc
        return proc

    async def _session(self) -> Any:
        if self.session is None:
            import aiohttp

            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=2), connector=aiohttp.TCPConnector(limit=0)
            )
        return self.session

    def _url(self, i: int, path: str) -> str:
        return f"http://{HOST}:{self.ctl_port(i)}{path}"

    async def ready(self, i: int) -> bool:
        try:
            await self.members(i)
            return (self.data_dir(i) / "api-token").exists()
        except Exception:
            return False

    async def join(self, i: int, seed: int) -> None:
        s = await self._session()
        token = (self.data_dir(i) / "api-token").read_text().strip()
        async with s.post(
            self._url(i, "/v1/join"),
            json={"addrs": [f"{HOST}:{self.gossip_port(seed)}"]},
            headers={"Authorization": f"Bearer {token}"},
            timeout=__import__("aiohttp").ClientTimeout(total=15),
        ) as r:
            if r.status != 200:
                raise RuntimeError(f"meshd join: HTTP {r.status}: {await r.text()}")

    async def members(self, i: int) -> dict[str, str]:
        s = await self._session()
        async with s.get(self._url(i, "/v1/members")) as r:
            r.raise_for_status()
            doc = await r.json(content_type=None)
        return {m["name"]: m["state"] for m in doc["members"]}

    async def metrics(self, i: int) -> dict[str, float]:
        s = await self._session()
        try:
            async with s.get(self._url(i, "/metrics")) as r:
                return parse_prometheus(await r.text()) if r.status == 200 else {}
        except Exception:
            return {}

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


NOT_RUN = "not run"


async def poll_until(
    system: System,
    nodes: Sequence[int],
    done: Callable[[dict[str, str]], bool],
    timeout: float,
    interval: float,
    t0: float,
) -> dict[int, float]:
    """Poll each node's member list until done(view) holds for every node.

    Returns, per node, the time (since t0) of the first answer where done held. A node that has
    shown it once is not polled again, so the load of polling falls as the news spreads.
    """
    seen: dict[int, float] = {}
    deadline = t0 + timeout

    async def one(i: int) -> None:
        try:
            view = await asyncio.wait_for(system.members(i), 2)
        except Exception:
            return
        if done(view):
            seen.setdefault(i, time.monotonic() - t0)

    while len(seen) < len(nodes):
        if time.monotonic() > deadline:
            missing = [system.name(i) for i in nodes if i not in seen]
            raise BenchError(f"{system.label}: timed out after {timeout:.0f}s; not yet: {', '.join(missing)}")
        check_running(system, [i for i in nodes if i not in seen], "while being polled")
        tick = time.monotonic()
        await asyncio.gather(*(one(i) for i in nodes if i not in seen))
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - tick)))
    return seen


async def wait_ready(system: System, nodes: Sequence[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(nodes)
    while pending:
        for i in list(pending):
            if not system.procs[i].alive():
                raise BenchError(f"{system.name(i)} exited:\n{system.procs[i].tail()}")
        results = await asyncio.gather(*(system.ready(i) for i in pending))
        pending -= {i for i, ok in zip(list(pending), results, strict=True) if ok}
        if pending and time.monotonic() > deadline:
            names = ", ".join(system.name(i) for i in sorted(pending))
            raise BenchError(f"{system.label}: not ready after {timeout:.0f}s: {names}")
        await asyncio.sleep(0.1)


def check_running(system: System, nodes: Iterable[int], phase: str) -> None:
    """Fail loudly when a node died on its own (a crash, or a signal from something else)."""
    for i in nodes:
        proc = system.procs[i]
        if not proc.alive():
            raise BenchError(
                f"{system.name(i)} exited with code {proc.popen.returncode} {phase}; log tail:\n{proc.tail()}"
            )


def listed_dead(name: str, dead_states: frozenset[str]) -> Callable[[dict[str, str]], bool]:
    return lambda view: view.get(name) in dead_states


def all_alive(names: Iterable[str], alive: str) -> Callable[[dict[str, str]], bool]:
    want = list(names)
    return lambda view: all(view.get(n) == alive for n in want)


@dataclass
class Result:
    system: str
    profile: str
    nodes: int
    startup_s: float = 0.0
    converge_s: float = 0.0
    joins: list[float] = field(default_factory=list)  # last member to list the new node alive
    join_first: list[float] = field(default_factory=list)
    join_call: list[float] = field(default_factory=list)  # time the join call itself took
    kills: list[float] = field(default_factory=list)  # last survivor to list the victim dead
    kill_first: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    hwm_kb: list[int] = field(default_factory=list)
    cpu_pct: list[float] = field(default_factory=list)  # per node, % of one core, steady window
    bw_seconds: float = 0.0
    bw_udp: int = 0
    bw_tcp: int = 0
    bw_udp_payload: int = 0
    bw_tcp_payload: int = 0
    bw_packets: int = 0
    bw_drops: int = 0
    metrics_bytes: dict[str, float] = field(default_factory=dict)
    poll_interval: float = 0.05
    errors: list[str] = field(default_factory=list)

    @property
    def bytes_per_node_s(self) -> float | None:
        if not self.bw_seconds:
            return None
        return (self.bw_udp + self.bw_tcp) / self.nodes / self.bw_seconds


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def run_system(system: System, args: argparse.Namespace) -> Result:
    n = system.n
    res = Result(system.label, system.profile, n, poll_interval=args.poll)
    alive = system.alive_state
    # Start n - joins nodes; each measured join adds one, so the last join makes n.
    base_nodes = list(range(n - args.joins))
    t_start = time.monotonic()
    log(f"{system.label}: starting {len(base_nodes)} nodes (profile {system.profile})")
    system.start(0, join_seed=False)
    await wait_ready(system, [0], args.start_timeout)
    for i in base_nodes[1:]:
        system.start(i, join_seed=True)
    await wait_ready(system, base_nodes, args.start_timeout)
    res.startup_s = time.monotonic() - t_start
    t0 = time.monotonic()
    names = [system.name(i) for i in base_nodes]
    await poll_until(system, base_nodes, all_alive(names, alive), args.start_timeout, 0.25, t0)
    res.converge_s = time.monotonic() - t0
    up, conv = res.startup_s, res.converge_s
    log(f"{system.label}: {len(base_nodes)} nodes up in {up:.1f}s, all listed alive {conv:.1f}s later")

    # --- joins
    members = list(base_nodes)
    last_start = time.monotonic()
    for new in range(n - args.joins, n):
        last_start = time.monotonic()
        system.start(new, join_seed=False)
        await wait_ready(system, [new], args.start_timeout)
        await asyncio.sleep(args.settle)
        t0 = time.monotonic()
        await system.join(new, 0)
        res.join_call.append(time.monotonic() - t0)
        members.append(new)
        seen = await poll_until(
            system, members, all_alive([system.name(new)], alive), args.event_timeout, args.poll, t0
        )
        res.joins.append(max(seen.values()))
        res.join_first.append(min(v for i, v in seen.items() if i != new))
        log(f"{system.label}: join of {system.name(new)} seen by all {len(members)} in {res.joins[-1]:.3f}s")
    # The new nodes must also have the full view before the steady window.
    names = [system.name(i) for i in members]
    await poll_until(system, members, all_alive(names, alive), args.event_timeout, 0.25, time.monotonic())

    # --- steady state: memory, CPU, bandwidth
    warmup, window = window_plan(system.profile, args.quick, args.bw_seconds)
    wait = max(args.settle, warmup - (time.monotonic() - last_start))
    log(f"{system.label}: waiting {wait:.0f}s for steady state (periodic push-pull under way)")
    await asyncio.sleep(wait)
    m_before = {i: await system.metrics(i) for i in members}
    cpu_before = {i: group_cpu_s(system.procs[i].pid) for i in members}
    counter = LoopbackCounter(system.gossip_port(i) for i in members)
    counter.start()
    log(f"{system.label}: counting gossip bytes for {window:.0f}s")
    await asyncio.sleep(window)
    res.bw_seconds = counter.stop()
    check_running(system, members, "before the end of the steady window")
    cpu_after = {i: group_cpu_s(system.procs[i].pid) for i in members}
    m_after = {i: await system.metrics(i) for i in members}
    res.bw_udp, res.bw_tcp = counter.udp_bytes, counter.tcp_bytes
    res.bw_udp_payload, res.bw_tcp_payload = counter.udp_payload, counter.tcp_payload
    res.bw_packets, res.bw_drops = counter.udp_packets + counter.tcp_packets, counter.drops
    res.cpu_pct = [100 * (cpu_after[i] - cpu_before[i]) / res.bw_seconds for i in members]
    for i in members:
        rss, hwm = group_rss_kb(system.procs[i].pid)
        res.rss_kb.append(rss)
        res.hwm_kb.append(hwm)
    for i in members:
        for k, v in pick_byte_counters(m_after[i]).items():
            before = pick_byte_counters(m_before[i]).get(k, 0.0)
            res.metrics_bytes[k] = res.metrics_bytes.get(k, 0.0) + (v - before)
    log(
        f"{system.label}: {res.bytes_per_node_s or 0:.0f} B/s per node, RSS mean "
        f"{statistics.mean(res.rss_kb) / 1024:.1f} MiB, CPU {statistics.mean(res.cpu_pct):.1f}%/node"
    )

    # --- failure detection: kill -9 one member at a time (never the seed 0)
    victims = members[1 : 1 + args.kills]
    survivors = list(members)
    for victim in victims:
        await asyncio.sleep(args.settle)
        check_running(system, survivors, "before a kill")
        survivors.remove(victim)
        vname = system.name(victim)
        t0 = time.monotonic()
        system.procs[victim].kill_group(signal.SIGKILL)
        seen = await poll_until(
            system, survivors, listed_dead(vname, system.dead_states), args.event_timeout, args.poll, t0
        )
        res.kills.append(max(seen.values()))
        res.kill_first.append(min(seen.values()))
        log(f"{system.label}: kill -9 of {vname} seen by all {len(survivors)} in {res.kills[-1]:.2f}s")
    return res


async def bench_system(system: System, args: argparse.Namespace) -> Result:
    try:
        return await asyncio.wait_for(run_system(system, args), args.system_timeout)
    except (BenchError, TimeoutError, RuntimeError, OSError) as e:
        res = Result(system.label, system.profile, system.n)
        msg = (
            f"{type(e).__name__}: {e}"
            if str(e)
            else f"{type(e).__name__} (system timeout {args.system_timeout:.0f}s)"
        )
        res.errors.append(msg)
        log(f"{system.label}: FAILED: {msg}")
        for _i, p in sorted(system.procs.items()):
            if not p.alive() and p.popen.returncode not in (-signal.SIGKILL,):
                log(f"  {p.name} exited {p.popen.returncode}:\n{p.tail()}")
        return res
    finally:
        await system.close()
        system.kill_all()


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _mean(xs: Sequence[float]) -> float | None:
    return statistics.mean(xs) if xs else None


def _max(xs: Sequence[float]) -> float | None:
    return max(xs) if xs else None


def _spread(median: float | None, xs: Sequence[float], digits: int) -> str:
    """The median and the range of the runs behind it: 1.23 (1.10-1.40)."""
    if median is None:
        return "n/a"
    return f"{median:.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def _list(xs: Sequence[float], digits: int) -> str:
    return ", ".join(f"{x:.{digits}f}" for x in xs) if xs else "n/a"


def verdict(ok: bool | str | None) -> str:
    if isinstance(ok, str):
        return ok
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def no_slower(mine: Sequence[float], theirs: Sequence[float], slack: float) -> bool | str | None:
    """Median against median, with `slack` for polling; a median inside serf's own range of samples
    is reported as such rather than as a miss, since a few samples of a randomised protocol vary."""
    if not mine or not theirs:
        return None
    med = statistics.median(mine)
    if med <= statistics.median(theirs) + slack:
        return True
    if med <= max(theirs) + slack:
        return "within serf's range"
    return False


def _mib(kb: float | None) -> float | None:
    return None if kb is None else kb / 1024


METHOD = """\
Method (`bench/README.md` has more):

- **Join**: {base} nodes start (one seed, the others joining it) and converge. Then each measured node
  starts alone; once its API answers it is told to join the seed (meshd `POST /v1/join`, serf RPC
  `join`, which is what `serf join` does). The clock starts just before that call. Every member's list
  (meshd `GET /v1/members`, serf RPC `members`) is polled every {poll_ms:.0f} ms until it lists the new
  node alive; a member that has is not polled again. Each join grows the cluster by one, the last one
  to {nodes}. The figures are upper bounds, late by at most one polling interval plus one request.
- **Failure detection**: SIGKILL to the process group of a non-seed member; the clock starts at the
  signal. The survivors are polled until each lists the victim `dead` (meshd) or `failed` (serf).
  Each kill shrinks the cluster by one.
- **Memory**: VmRSS from /proc/PID/status, summed over the node's process group, read at the end of
  the steady window.
- **Bandwidth**: no polling during the window. A packet socket (AF_PACKET) on `lo` counts each
  loopback packet once (its outgoing copy) when it is UDP from a gossip port, or TCP to or from one
  (push-pull, TCP fallback pings), by its IPv4 total length (IP and UDP/TCP headers included).
  The total is divided by the node count and the window length. The window starts one push-pull
  interval after the last node started and lasts one interval (30 s lan, 15 s local), so it holds
  one periodic push-pull per node; `--quick` counts 10 s without that warm-up.
- **CPU**: utime + stime of the node's processes over the steady window.
- **Verdicts**: "no slower" compares medians with one polling interval of slack; a meshd median
  that is slower than serf's median but inside the range of serf's own samples says so. 60 MB is
  decimal (57.2 MiB), checked against the largest node.
"""


def render(results: list[tuple[Result, Result]], args: argparse.Namespace, env: dict[str, str]) -> str:
    crypto = (
        "both encrypted with the same 32-byte key"
        if args.encrypt
        else "both unencrypted (meshd --insecure, serf without -encrypt)"
    )
    out = [
        "# Membership: meshd against HashiCorp Serf",
        "",
        f"Generated by `{env['cmd']}` on {env['date']} ({env['cpus']} CPUs, Linux {env['kernel']}, "
        f"Python {env['python']}, Debian serf {env['serf']}; load average {env['load']} at the start). "
        f"{args.nodes} nodes per system on 127.0.0.1, one system after the other in the same run; "
        f"{crypto}; meshd with --no-mdns.",
        "",
    ]
    for m, s in results:
        out += _profile_section(m, s, args)
    out.append(METHOD.format(base=args.nodes - args.joins, poll_ms=args.poll * 1000, nodes=args.nodes))
    return "\n".join(out)


def _profile_section(m: Result, s: Result, args: argparse.Namespace) -> list[str]:
    prof = m.profile
    slack = args.poll
    jm, js = _median(m.joins), _median(s.joins)
    km, ks = _median(m.kills), _median(s.kills)
    rm, rs = _mib(_mean(m.rss_kb)), _mib(_mean(s.rss_kb))
    rmx, rsx = _mib(_max(m.rss_kb)), _mib(_max(s.rss_kb))
    bm, bs = m.bytes_per_node_s, s.bytes_per_node_s
    cm, cs = _mean(m.cpu_pct), _mean(s.cpu_pct)
    n_joins = max(len(m.joins), len(s.joins))
    n_kills = max(len(m.kills), len(s.kills))

    def row(metric: str, a: str, b: str, r: str, goal: str = "", ok: bool | str | None = None) -> str:
        return f"| {metric} | {a} | {b} | {r} | {goal} | {verdict(ok) if goal else ''} |"

    lines = [
        f"## Profile `{prof}` (meshd `--profile {prof}`, serf `-profile={prof}`), {m.nodes} nodes",
        "",
        "| metric | meshd | serf | ratio (meshd/serf) | goal | verdict |",
        "|---|---:|---:|---:|---|---|",
        row(
            f"join seen by every member, median (min-max) of {n_joins} (s)",
            _spread(jm, m.joins, 3),
            _spread(js, s.joins, 3),
            ratio(jm, js),
            "no slower than serf",
            no_slower(m.joins, s.joins, slack),
        ),
        row(
            f"kill -9 seen as dead by every survivor, median (min-max) of {n_kills} (s)",
            _spread(km, m.kills, 2),
            _spread(ks, s.kills, 2),
            ratio(km, ks),
            "no slower than serf",
            no_slower(m.kills, s.kills, slack),
        ),
        row(
            "resident memory per node, mean (MiB)",
            fmt_num(rm, "", 1),
            fmt_num(rs, "", 1),
            ratio(rm, rs),
            "meshd <= 60 MB",
            None if rmx is None else rmx * 1.048576 <= 60,
        ),
        row("resident memory per node, max (MiB)", fmt_num(rmx, "", 1), fmt_num(rsx, "", 1), ratio(rmx, rsx)),
        row(
            "gossip bytes per node per second (IP bytes, UDP + TCP)",
            fmt_num(bm, "", 0),
            fmt_num(bs, "", 0),
            ratio(bm, bs),
            "within 2x of serf",
            None if bm is None or bs is None else bm <= 2 * bs,
        ),
        row(
            "CPU per node, steady window (% of one core)",
            fmt_num(cm, "", 2),
            fmt_num(cs, "", 2),
            ratio(cm, cs),
        ),
        "",
        "| detail | meshd | serf |",
        "|---|---|---|",
        f"| start the first {args.nodes - args.joins} nodes until every API answers (s) "
        f"| {fmt_num(m.startup_s or None, '', 1)} | {fmt_num(s.startup_s or None, '', 1)} |",
        f"| then until every one lists all alive (s) "
        f"| {fmt_num(m.converge_s or None)} | {fmt_num(s.converge_s or None)} |",
        f"| each join: last member (s) | {_list(m.joins, 3)} | {_list(s.joins, 3)} |",
        f"| each join: first other member (s) | {_list(m.join_first, 3)} | {_list(s.join_first, 3)} |",
        f"| each join: the join call itself (s) | {_list(m.join_call, 3)} | {_list(s.join_call, 3)} |",
        f"| each kill: last survivor (s) | {_list(m.kills, 2)} | {_list(s.kills, 2)} |",
        f"| each kill: first survivor (s) | {_list(m.kill_first, 2)} | {_list(s.kill_first, 2)} |",
        f"| peak RSS (VmHWM) of the largest node (MiB) "
        f"| {fmt_num(_mib(_max(m.hwm_kb)), '', 1)} | {fmt_num(_mib(_max(s.hwm_kb)), '', 1)} |",
        f"| steady window (s) | {fmt_num(m.bw_seconds or None, '', 1)} "
        f"| {fmt_num(s.bw_seconds or None, '', 1)} |",
        f"| UDP / TCP IP bytes per node per second | {_split(m)} | {_split(s)} |",
        f"| payload bytes per node per second (no IP/UDP/TCP headers) | {_payload(m)} | {_payload(s)} |",
        f"| packets per node per second | {_pps(m)} | {_pps(s)} |",
        f"| packets the counter dropped | {m.bw_drops} | {s.bw_drops} |",
    ]
    if m.metrics_bytes and m.bw_seconds:
        per = ", ".join(f"`{k}` {v / m.nodes / m.bw_seconds:.0f}" for k, v in sorted(m.metrics_bytes.items()))
        lines.append(f"| meshd's own /metrics sent-byte counters, per node per second | {per} | |")
    for r in (m, s):
        if r.errors == [NOT_RUN]:
            continue
        for e in r.errors:
            lines.append(f"| **{r.system} failed** | {e.splitlines()[0]} | |")
    lines.append("")
    return lines


def _split(r: Result) -> str:
    if not r.bw_seconds:
        return "n/a"
    d = r.nodes * r.bw_seconds
    return f"{r.bw_udp / d:.0f} / {r.bw_tcp / d:.0f}"


def _payload(r: Result) -> str:
    if not r.bw_seconds:
        return "n/a"
    return f"{(r.bw_udp_payload + r.bw_tcp_payload) / r.nodes / r.bw_seconds:.0f}"


def _pps(r: Result) -> str:
    if not r.bw_seconds:
        return "n/a"
    return f"{r.bw_packets / r.nodes / r.bw_seconds:.1f}"


def environment() -> dict[str, str]:
    serf_v = "?"
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "serf"], capture_output=True, text=True, timeout=5
        )
        serf_v = out.stdout.strip() or serf_v
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "host": socket.gethostname(),
        "cpus": str(os.cpu_count()),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "serf": serf_v,
        "cmd": " ".join(["bench/membership.py", *sys.argv[1:]]),
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def serf_keygen(serf_bin: str) -> str:
    out = subprocess.run([serf_bin, "keygen"], capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--nodes", type=int, default=20, help="nodes per system (default 20)")
    p.add_argument(
        "--profile", action="append", choices=["lan", "wan", "local"],
        help="timing preset, same for both systems; repeat for several (default lan)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="1 join and 1 kill per system, 10 s bandwidth window")
    p.add_argument("--systems", default="meshd,serf", help="comma list of meshd,serf (default both)")
    p.add_argument("--joins", type=int, help="joins measured per system (default 5, quick 1)")
    p.add_argument("--kills", type=int, help="kill -9 detections measured per system (default 5, quick 1)")
    p.add_argument(
        "--bw-seconds",
        type=float,
        help="steady-state bandwidth window (default: the push-pull interval, 30 s lan; quick 10 s)",
    )
    p.add_argument("--poll", type=float, default=0.05, help="member-list polling interval, s (default 0.05)")
    p.add_argument("--settle", type=float, default=2.0, help="quiet time before each measurement, s")
    p.add_argument("--encrypt", action="store_true", help="encrypt both systems with one cluster key")
    p.add_argument("--base-port", type=int, default=27100, help="first port tried (default 27100)")
    p.add_argument("--serf", default=shutil.which("serf") or "/usr/bin/serf", help="serf binary")
    p.add_argument(
        "--meshd", default=f"{sys.executable} -m meshd.cli.meshd",
        help="meshd command (default: this Python, -m meshd.cli.meshd, repo on PYTHONPATH)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS, help=f"markdown output (default {RESULTS})")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, data dirs)")
    args = p.parse_args(argv)
    args.profile = args.profile or ["lan"]
    args.joins = args.joins or (1 if args.quick else 5)
    args.kills = args.kills or (1 if args.quick else 5)
    args.start_timeout = 60.0
    # Detection at LAN settings can take the full Lifeguard suspicion max (6x the minimum).
    args.event_timeout = 90.0 if "wan" not in args.profile else 400.0
    args.system_timeout = 600.0 if "wan" not in args.profile else 1800.0
    if args.nodes < args.joins + 2 or args.nodes < args.kills + 3:
        p.error("--nodes must be at least joins + 2 and kills + 3")
    systems = set(args.systems.split(","))
    if not systems <= {"meshd", "serf"} or not systems:
        p.error("--systems takes meshd and/or serf")
    args.systems = [s for s in ("meshd", "serf") if s in systems]
    return args


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="meshd-bench-"))
    log(f"work dir {workdir}")
    key = serf_keygen(args.serf) if args.encrypt else None
    results: list[tuple[Result, Result]] = []
    live: list[System] = []
    try:
        for prof in args.profile:
            pair: dict[str, Result] = {}
            for label in args.systems:
                sys_dir = workdir / f"{label}-{prof}"
                sys_dir.mkdir()
                base = free_port_block(args.base_port, 100 + args.nodes)
                system: System
                if label == "serf":
                    system = Serf(args.nodes, prof, sys_dir, base, key, serf_bin=args.serf)
                else:
                    system = Meshd(args.nodes, prof, sys_dir, base, key, meshd_cmd=args.meshd.split())
                live.append(system)
                pair[label] = await bench_system(system, args)
            empty = {lbl: Result(lbl, prof, args.nodes, errors=[NOT_RUN]) for lbl in ("meshd", "serf")}
            results.append((pair.get("meshd", empty["meshd"]), pair.get("serf", empty["serf"])))
    finally:
        for system in live:
            system.kill_all()
        if not args.keep and not any(r.errors and r.errors != [NOT_RUN] for pair in results for r in pair):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}")
    text = render(results, args, environment())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    log(f"wrote {args.out}")
    failed = [r for pair in results for r in pair if r.errors and r.errors != [NOT_RUN]]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("membership.py needs root: it counts loopback bytes with a packet socket", file=sys.stderr)
        return 2

    # SIGTERM/SIGHUP become KeyboardInterrupt, so the finally blocks kill every node.
    def _raise(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        print("interrupted; nodes killed", file=sys.stderr)
        return 130
    finally:
        for proc in SPAWNED:
            proc.kill_group()


if __name__ == "__main__":
    sys.exit(main())
