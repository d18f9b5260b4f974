"""An in-memory network with a virtual clock, for deterministic tests and the simulator.

It carries the same sealed bytes real sockets would, between core Nodes, with seeded loss,
delay, duplication and partitions. Nothing here sleeps: time jumps to the next event. Each
node's effects are carried out by the same pump as the real runtime's (meshd.core.pump).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshd import wire
from meshd.core.aggregate import Reducer
from meshd.core.config import ProtocolConfig
from meshd.core.effects import MemberEvent, OpenStream
from meshd.core.members import RecordPool
from meshd.core.node import Node
from meshd.core.pump import pump
from meshd.core.query import QueryAction, QueryResult

QueryHandler = Callable[[Node, QueryAction], bytes]


@dataclass
class Link:
    """What happens to traffic: probability of loss and duplication, one-way delay range."""

    loss: float = 0.0
    duplicate: float = 0.0
    delay_min: float = 0.0005
    delay_max: float = 0.002


@dataclass
class NetStats:
    datagrams: int = 0
    datagram_bytes: int = 0
    dropped: int = 0
    streams: int = 0
    stream_bytes: int = 0


# (at, seq, action): a plain tuple, so the heap compares in C (seq is unique: never the action).
_Event = tuple[float, int, Callable[[], None]]


class MemoryNetwork:
    """Nodes addressed by "host:port" strings; run_until() advances the virtual clock."""

    def __init__(self, seed: int = 0, link: Link | None = None) -> None:
        self.rng = random.Random(seed)
        self.link = link or Link()
        self.now = 0.0
        self.nodes: dict[str, Node] = {}
        self.down: set[str] = set()  # addrs of crashed nodes (they neither send nor receive)
        self.groups: dict[str, int] = {}  # partition: addr -> group; traffic only within a group
        self.blocked: set[tuple[str, str]] = set()  # one-way faults: (src, dst) datagrams lost
        self.stats = NetStats()
        self.events: list[tuple[float, str, MemberEvent]] = []
        self.record_events = True
        self.on_event: Callable[[str, MemberEvent], None] | None = None  # (node name, event)
        self.pool: RecordPool | None = None  # one record pool for every node added (None: their own)
        self.query_handler: QueryHandler | None = None  # plays the shell's handler runner
        self.answer_delay: Callable[[Node], float] | None = None  # a slow handler: seconds per node
        self.reducer: Reducer | None = None  # given to nodes added from now on (aggregated queries)
        self.query_results: list[tuple[str, QueryResult]] = []  # (asking node's name, result)
        self._heap: list[_Event] = []
        self._seq = 0
        self._timer_at: dict[str, float] = {}
        self._addrs: dict[str, str] = {}

    # --- building ------------------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        config: ProtocolConfig,
        codec: wire.Codec,
        meta: dict[str, str] | None = None,
        addr: str | None = None,
        node_id: str | None = None,
        incarnation: int = 0,
    ) -> Node:
        addr = addr or self._addr_of(name)
        node = Node(
            name,
            node_id or f"id-{name}",
            addr,
            config,
            codec,
            random.Random(self.rng.getrandbits(64)),
            self.now,
            meta,
            incarnation,
            reducer=self.reducer,
            pool=self.pool,
        )
        self.nodes[addr] = node
        self.down.discard(addr)
        self._flush(node)
        return node

    def _addr_of(self, name: str) -> str:
        """A lab-range IP per name (the core takes only literal IP:port), the same on a restart."""
        if name not in self._addrs:
            k = len(self._addrs) + 1
            self._addrs[name] = f"198.{18 + (k >> 16)}.{(k >> 8) & 255}.{k & 255}:7788"
        return self._addrs[name]

    def kill(self, node: Node) -> None:
        """Crash: the node stops without a word."""
        self.down.add(node.addr)

    def remove(self, node: Node) -> None:
        self.down.add(node.addr)
        self.nodes.pop(node.addr, None)

    def partition(self, *groups: Iterable[Node]) -> None:
        self.groups = {n.addr: i for i, g in enumerate(groups) for n in g}

    def heal(self) -> None:
        self.groups = {}
        self.blocked = set()

    def block(self, src: Node, dst: Node) -> None:
        """Lose every datagram from src to dst (TCP still works): a one-way UDP fault."""
        self.blocked.add((src.addr, dst.addr))

    def reachable(self, a: str, b: str) -> bool:
        if a in self.down or b in self.down or b not in self.nodes:
            return False
        if self.groups:
            return self.groups.get(a, -1) == self.groups.get(b, -1)
        return True

    # --- running -------------------------------------------------------------------------------

    def call_at(self, at: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, action))

    def run_until(self, t: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= t:
            at, _, action = heapq.heappop(heap)
            self.now = max(self.now, at)
            action()
        self.now = max(self.now, t)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until_true(self, cond: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
        """Advance in steps until cond() holds; False if it still does not after timeout."""
        end = self.now + timeout
        while self.now < end:
            if cond():
                return True
            self.run_until(min(end, self.now + step))
        return cond()

    def _delay(self) -> float:
        lk = self.link
        return lk.delay_min + self.rng.random() * (lk.delay_max - lk.delay_min)

    def _flush(self, node: Node) -> None:
        """Carry out what the node asked for and re-arm its timer."""
        at = pump(node, _Port(self, node))
        if self._timer_at.get(node.addr) != at:
            self._timer_at[node.addr] = at
            self.call_at(at, lambda: self._fire_timer(node, at))

    def _fire_timer(self, node: Node, at: float) -> None:
        if self._timer_at.get(node.addr) != at or self.nodes.get(node.addr) is not node:
            return  # superseded
        if node.addr in self.down:
            return
        self._timer_at.pop(node.addr, None)
        node.handle_timer(self.now)
        self._flush(node)

    def _send_datagram(self, src: str, dst: str, data: bytes) -> None:
        self.stats.datagrams += 1
        self.stats.datagram_bytes += len(data)
        copies = 1
        if self.rng.random() < self.link.loss:
            copies = 0
        elif self.rng.random() < self.link.duplicate:
            copies = 2
        if copies == 0:
            self.stats.dropped += 1
        for _ in range(copies):
            self.call_at(self.now + self._delay(), lambda: self._deliver(src, dst, data))

    def _deliver(self, src: str, dst: str, data: bytes) -> None:
        if not self.reachable(src, dst) or (src, dst) in self.blocked:
            self.stats.dropped += 1
            return
        node = self.nodes[dst]
        node.receive_datagram(data, src, self.now)
        self._flush(node)

    def _open_stream(self, client: Node, req: OpenStream) -> None:
        """A TCP exchange: reliable when reachable, a failure after the timeout otherwise."""
        self.stats.streams += 1
        self.stats.stream_bytes += len(req.data)
        src = client.addr

        def fail() -> None:
            if client.addr not in self.down:
                client.stream_done(req.id, None, self.now)
                self._flush(client)

        def arrive() -> None:
            if not self.reachable(src, req.addr):
                self.call_at(src_start + req.timeout, fail)
                return
            server = self.nodes[req.addr]
            reply = server.handle_stream(req.data, src, self.now)
            self._flush(server)
            if reply is not None:
                self.stats.stream_bytes += len(reply)

            def back() -> None:
                if not self.reachable(req.addr, src) and src not in self.down:
                    fail()
                    return
                if src in self.down:
                    return
                client.stream_done(req.id, reply, self.now)
                self._flush(client)

            self.call_at(self.now + self._delay(), back)

        src_start = self.now
        self.call_at(self.now + self._delay(), arrive)

    # --- driving nodes from outside (operator calls) -------------------------------------------

    def poke(self, node: Node) -> None:
        """Flush a node after calling one of its operator methods directly."""
        self._flush(node)


class _Port:
    """One node's attachment to the network: the EffectHandler its effects are pumped into."""

    __slots__ = ("net", "node")

    def __init__(self, net: MemoryNetwork, node: Node) -> None:
        self.net = net
        self.node = node

    def send_datagram(self, data: bytes, addr: str) -> None:
        self.net._send_datagram(self.node.addr, addr, data)

    def open_stream(self, req: OpenStream) -> None:
        self.net._open_stream(self.node, req)

    def member_event(self, ev: MemberEvent) -> None:
        if self.net.record_events:
            self.net.events.append((self.net.now, self.node.name, ev))
        if self.net.on_event is not None:
            self.net.on_event(self.node.name, ev)

    def answer_query(self, action: QueryAction) -> None:
        net, node, handler = self.net, self.node, self.net.query_handler
        if handler is None:
            return
        payload = handler(node, action)
        delay = net.answer_delay(node) if net.answer_delay is not None else 0.0
        if delay <= 0:
            node.respond_query(action, payload, net.now)
            return

        def later() -> None:
            if node.addr not in net.down and net.nodes.get(node.addr) is node:
                node.respond_query(action, payload, net.now)
                net._flush(node)

        net.call_at(net.now + delay, later)

    def query_done(self, result: QueryResult) -> None:
        self.net.query_results.append((self.node.name, result))
