"""Pumps the sans-IO core from asyncio, the way aioquic's asyncio/protocol.py drives QUIC.

Every input (datagram, inbound stream, finished outbound stream, timer, operator call) is
handed to the node with time.monotonic() (the clock loop.time() reads on Linux, but fine: uvloop's
loop.time() moves in whole milliseconds, so a LAN probe's round trip read 0); then `_flush` runs
meshd.core.pump, which hands each of the node's effects to this runtime (it is the
EffectHandler): datagrams are sent, streams become tasks, events go to subscribers, queries this
node matches go to the answerer (each a task, at most MAX_ANSWERING at once), finished queries
resolve the `ask()` waiting for them; then one timer (meshd.loop_timer) is re-armed from
node.get_timer(). An exception from the core, or from carrying out one effect, is logged and
counted, never allowed to stop the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from meshd.core.effects import MemberEvent, MemberView, OpenStream
from meshd.core.messages import MemberState, QueryFilter
from meshd.core.node import JOIN_TIMEOUT_MIN, MembershipCore
from meshd.core.pump import pump
from meshd.core.query import QueryAction, QueryResult
from meshd.loop_timer import DeadlineTimer
from meshd.metrics import Exposition
from meshd.net.peer_http import PeerClient
from meshd.net.udp import UDPEndpoint

log = logging.getLogger("meshd.runtime")

EventListener = Callable[[MemberEvent], None]
QueryAnswerer = Callable[[QueryAction], Awaitable[bytes]]
SUBSCRIBER_QUEUE = 1024
MAX_ANSWERING = 64  # queries being answered at once; beyond that the asker gets a "busy" answer
ASK_GRACE = 5.0  # the core finishes a query at its deadline; this only guards against a lost result


@dataclass(frozen=True)
class NodeEvent:
    """An event the shell raises itself: "health" (a member's health summary changed),
    "release" (update distribution), "query" (one this node asked started or finished).
    The event stream sends `payload` as the SSE data, with `kind` as the SSE event name."""

    kind: str
    member: MemberView | None
    payload: dict[str, Any]


StreamEvent = MemberEvent | NodeEvent


class Subscription:
    """A bounded queue of member events; a slow reader loses events (counted), not memory."""

    def __init__(self, runtime: NodeRuntime, maxsize: int) -> None:
        self._runtime = runtime
        self.queue: asyncio.Queue[StreamEvent] = asyncio.Queue(maxsize)
        self.dropped = 0

    def put(self, ev: StreamEvent) -> None:
        try:
            self.queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.dropped += 1

    async def get(self) -> StreamEvent:
        return await self.queue.get()

    def close(self) -> None:
        self._runtime._subscribers.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        while True:
            yield await self.queue.get()


class NodeRuntime:
    """Owns the node's I/O. Attach the UDP endpoint and peer client, then `start()`.

    It is the membership core's EffectHandler (send_datagram ... query_done below)."""

    def __init__(
        self,
        node: MembershipCore,
        udp: UDPEndpoint | None = None,
        peer_client: PeerClient | None = None,
    ) -> None:
        self.node = node
        self.udp = udp
        # The default client seals its request tokens with the node's own codec.
        self.peer_client = peer_client or PeerClient(node.codec)
        self.errors = 0  # core exceptions caught at this boundary
        self.events_dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer = DeadlineTimer(self._on_timer)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscribers: set[Subscription] = set()
        self._listeners: list[EventListener] = []
        self._stream_waiters: dict[int, asyncio.Future[bool]] = {}
        self._stream_caps: dict[int, float] = {}  # join(timeout=): the exchange's own bound
        self._query_waiters: dict[int, asyncio.Future[QueryResult]] = {}
        self._answerer: QueryAnswerer | None = None
        self._answering = 0
        self.queries_busy = 0  # queries answered "busy" because MAX_ANSWERING were running
        self._closed = False
        # Called before the effects of every core call go out (the daemon persists the
        # incarnation there, so no peer hears one that a restart could go back on).
        self.before_effects: Callable[[], None] | None = None
        # Gets the probe round trips the core measured: ("direct"|"indirect", seconds).
        self.on_probe_rtt: Callable[[str, float], None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._flush()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def now(self) -> float:
        return time.monotonic()

    async def close(self) -> None:
        self._closed = True
        self._timer.cancel()
        for sub in list(self._subscribers):
            sub.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for fut in self._stream_waiters.values():
            if not fut.done():
                fut.set_result(False)
        self._stream_waiters.clear()
        for qfut in self._query_waiters.values():
            qfut.cancel()
        self._query_waiters.clear()
        await self.peer_client.close()

    # --- inputs ------------------------------------------------------------------------------

    def on_datagram(self, data: bytes, addr: str) -> None:
        self._call(self.node.receive_datagram, data, addr, self.now())
        self._flush()

    def handle_stream(self, data: bytes, addr: str) -> bytes | None:
        """Server side of one peer exchange (called by the peer HTTP app)."""
        reply: bytes | None = self._call(self.node.handle_stream, data, addr, self.now())
        self._flush()
        return reply

    async def join(self, addrs: list[str], timeout: float | None = None) -> int:
        """Push-pull with each address; how many answered (a member list came back)."""
        if not addrs:
            return 0
        ids: list[int] | None = self._call(self.node.join, addrs, self.now())
        waiters = []
        for sid in ids or []:
            fut: asyncio.Future[bool] = self.loop.create_future()
            self._stream_waiters[sid] = fut
            waiters.append(fut)
            if timeout is not None:
                self._stream_caps[sid] = timeout
        self._flush()
        if not waiters:
            return 0
        default = max(self.node.config.tcp_timeout, JOIN_TIMEOUT_MIN)
        limit = (timeout if timeout is not None else default) + 1.0
        done, pending = await asyncio.wait(waiters, timeout=limit)
        for fut in pending:
            fut.cancel()
        return sum(1 for fut in done if not fut.cancelled() and fut.result())

    def leave(self) -> None:
        self._call(self.node.leave, self.now())
        self._flush()

    async def leave_and_wait(self, timeout: float) -> None:
        """Broadcast our leave and give gossip a moment to carry it (bounded by timeout)."""
        self.leave()
        if not self._call(self.node.num_active):
            return  # nobody to tell
        deadline = self.now() + timeout
        # At least a few gossip rounds, so the news goes out more than once.
        min_wait = min(timeout, 3 * self.node.config.gossip_interval)
        while self.now() < deadline:
            waited = self.now() - (deadline - timeout)
            if waited >= min_wait and not self._call(self.node.leave_pending):
                break
            await asyncio.sleep(min(0.05, self.node.config.gossip_interval / 2))

    def key_op(self, op: str, key: bytes) -> None:
        """Apply a keyring change locally and gossip it (errors from the core propagate)."""
        try:
            self.node.key_op(op, key, self.now())
        finally:
            self._flush()

    def set_meta(self, meta: dict[str, str]) -> None:
        self._call(self.node.set_meta, meta, self.now())
        self._flush()

    def set_addr(self, addr: str) -> None:
        self._call(self.node.set_addr, addr, self.now())
        self._flush()

    # --- queries -----------------------------------------------------------------------------

    def set_query_answerer(self, answerer: QueryAnswerer) -> None:
        """Who answers the queries this node matches (runs the handler, returns the payload).
        Without one, matched queries are not answered and the asker names this node missing."""
        self._answerer = answerer

    async def ask(
        self,
        name: str,
        payload: bytes,
        filters: QueryFilter,
        timeout: float,
        relay_factor: int = 0,
        aggregate: str = "",
    ) -> QueryResult:
        """Gossip a query and wait for its result: every expected answer, or the timeout.

        ConfigError for bad arguments, StateError when too many queries are in flight (both
        from the core). Cancelling the wait forgets the query.
        """
        qid: int = self.node.ask(name, payload, filters, timeout, relay_factor, self.now(), aggregate)
        fut: asyncio.Future[QueryResult] = self.loop.create_future()
        self._query_waiters[qid] = fut  # before the flush: the result may already be there
        filters_json = {"nodes": filters.nodes, "site": filters.site, "tags": filters.tags}
        self._query_event(qid, name, "started", timeout_s=timeout, filters=filters_json)
        self._flush()
        try:
            result = await asyncio.wait_for(fut, timeout + ASK_GRACE)
            self._query_event(
                qid,
                name,
                "done",
                answered=len(result.responses),
                missing=list(result.missing),
                elapsed_ms=result.elapsed_ms,
                timed_out=result.timed_out,
            )
            return result
        finally:
            self._query_waiters.pop(qid, None)
            if not fut.done() or fut.cancelled():
                self._call(self.node.cancel_query, qid)

    def _query_event(self, qid: int, name: str, state: str, **fields: Any) -> None:
        """A "query" event on the event stream: one this node asked started or finished."""
        self.publish(NodeEvent("query", None, {"id": qid, "name": name, "state": state, **fields}))

    def answer_query(self, action: QueryAction) -> None:
        """Effect: run the answerer for a query this node matches (or answer "busy")."""
        if self._answerer is None:
            return
        if self._answering >= MAX_ANSWERING:
            self.queries_busy += 1
            busy = {"error": "busy", "detail": f"{MAX_ANSWERING} queries already being answered"}
            self._call(self.node.respond_query, action, orjson.dumps(busy), self.now())
            return
        self._answering += 1
        task = self.loop.create_task(self._answer(self._answerer, action))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, answerer: QueryAnswerer, action: QueryAction) -> None:
        try:
            try:
                payload = await answerer(action)
            except Exception as e:  # a handler bug must still give the asker an answer
                self.errors += 1
                log.exception("answering query %r failed", action.query.name)
                payload = orjson.dumps({"error": "failed", "detail": f"{type(e).__name__}: {e}"})
        finally:
            self._answering -= 1
        if self._closed:
            return
        self._call(self.node.respond_query, action, payload, self.now())
        self._flush()

    def query_done(self, result: QueryResult) -> None:
        """Effect: a query this node asked finished; wake the ask() waiting for it."""
        fut = self._query_waiters.pop(result.id, None)
        if fut is not None and not fut.done():
            fut.set_result(result)

    # --- subscribers -------------------------------------------------------------------------

    def subscribe(self, maxsize: int = SUBSCRIBER_QUEUE) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subscribers.add(sub)
        return sub

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def add_listener(self, listener: EventListener) -> None:
        """A synchronous callback for every event (persisting the keyring, the snapshot...)."""
        self._listeners.append(listener)

    def publish(self, ev: NodeEvent) -> None:
        """Hand a shell event to the subscribers (the event stream); listeners see core events only."""
        self._offer(ev)

    def _offer(self, ev: StreamEvent) -> None:
        for sub in list(self._subscribers):
            before = sub.dropped
            sub.put(ev)
            self.events_dropped += sub.dropped - before

    # --- metrics -----------------------------------------------------------------------------

    def collect_metrics(self, out: Exposition) -> None:
        """Membership, the runtime's own counts, the node's and the query engine's counters."""
        node = self.node
        counts = dict.fromkeys((s.name.lower() for s in MemberState), 0)
        for m in node.members():
            counts[m.state.name.lower()] += 1
        out.labelled(
            "meshd_members", "gauge", "members by state", [({"state": s}, n) for s, n in counts.items()]
        )
        stats = node.stats()
        out.gauge("meshd_health_score", "Lifeguard local health (0 = healthy)", stats.health_score)
        out.gauge("meshd_broadcast_queue", "messages waiting to be gossiped", stats.broadcast_queue)
        out.counter("meshd_runtime_errors_total", "core exceptions caught by the shell", self.errors)
        out.counter("meshd_events_dropped_total", "events lost by slow subscribers", self.events_dropped)
        out.gauge("meshd_event_subscribers", "open event streams", self.subscriber_count)
        out.core_counters(stats.counters)
        out.gauge(
            "meshd_queries_in_flight", "queries this node asked, not finished yet", stats.queries_in_flight
        )
        out.counter("meshd_queries_busy_total", "queries answered busy (too many running)", self.queries_busy)

    # --- driving the core --------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            self.errors += 1
            log.exception("core error in %s", getattr(fn, "__name__", fn))
            return None

    def _on_timer(self) -> None:
        self._call(self.node.handle_timer, self.now())
        self._flush()

    def _flush(self) -> None:
        if self._closed:
            return
        if self.before_effects is not None:
            self._call(self.before_effects)
        rtts = self.node.take_probe_rtts()
        if rtts and self.on_probe_rtt is not None:
            for path, seconds in rtts:
                self.on_probe_rtt(path, seconds)
        deadline = pump(self.node, self, self._pump_failed)
        # Whatever happened, the protocol keeps ticking (a failing core: try again in a second).
        self._timer.arm(deadline if deadline is not None else self.now() + 1.0)

    def _pump_failed(self, what: str, exc: Exception) -> None:
        self.errors += 1
        log.error("error in %s", what, exc_info=exc)

    # --- effects: the EffectHandler the pump hands the core's effects to ----------------------
    # (answer_query and query_done are with the queries above)

    def send_datagram(self, data: bytes, addr: str) -> None:
        if self.udp is not None:
            self.udp.sendto(data, addr)

    def open_stream(self, req: OpenStream) -> None:
        cap = self._stream_caps.pop(req.id, None)
        if cap is not None and cap < req.timeout:
            # A blackholed address must not hold an outgoing connection for the core's long timeout.
            req = dataclasses.replace(req, timeout=cap)
        task = self.loop.create_task(self._run_stream(req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def member_event(self, ev: MemberEvent) -> None:
        if ev.kind not in ("keyring",):
            # An update (new metadata: release progress each second per fetching member) is
            # routine; at info it was a log line per member per second on every node.
            log.log(
                logging.DEBUG if ev.kind == "update" else logging.INFO,
                "member %s: %s (%s)",
                ev.kind,
                ev.member.name,
                ev.member.addr,
                extra={"member": ev.member.name, "event": ev.kind, "addr": str(ev.member.addr)},
            )
        for listener in self._listeners:
            try:
                listener(ev)
            except Exception:
                self.errors += 1
                log.exception("event listener failed")
        self._offer(ev)

    async def _run_stream(self, req: OpenStream) -> None:
        reply = await self.peer_client.exchange(req.addr, req.data, req.timeout, req.to)
        if self._closed:
            return
        self._call(self.node.stream_done, req.id, reply, self.now())
        waiter = self._stream_waiters.pop(req.id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply is not None)
        self._flush()
