"""Fetch scheduler: one test (at least) per rule of the table in meshd/core/swarm.py."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from meshd.core.pump import drain
from meshd.core.swarm import (
    ORIGIN,
    CancelRequest,
    FetchRequest,
    MiB,
    Outcome,
    Swarm,
    SwarmConfig,
    SwarmEvent,
    bitmap_indices,
    make_bitmap,
)

KiB = 1024


def ids(n: int, size: int = 64 * KiB) -> list[tuple[str, int]]:
    return [(f"{i:064x}", size) for i in range(n)]


def cid(i: int) -> str:
    return f"{i:064x}"


def idx(c: str) -> int:
    return int(c, 16)


def mk(n: int, *, have: tuple[int, ...] = (), size: int = 64 * KiB, seed: int = 1, **cfg: object) -> Swarm:
    return Swarm(ids(n, size), [cid(i) for i in have], random.Random(seed), 0.0, SwarmConfig(**cfg))  # type: ignore[arg-type]


def one_chunk_pieces(**cfg: Any) -> dict[str, Any]:
    return {"piece_target": 1, **cfg}


def bm(indices: range | list[int], n: int) -> bytes:
    return make_bitmap(indices, n)


def chunks_of(reqs: list[FetchRequest]) -> list[int]:
    return [idx(c) for r in reqs for c in r.chunks]


def complete(s: Swarm, r: FetchRequest, now: float) -> None:
    s.fetch_done(r.request_id, Outcome.OK, now)


# --- bitmaps -------------------------------------------------------------------------------


def test_bitmap_roundtrip_and_validation() -> None:
    assert make_bitmap([0, 9], 10) == bytes([0x80, 0x40])
    assert bitmap_indices(bytes([0x80, 0x40]), 10) == {0, 9}
    assert bitmap_indices(b"\x00", 10) is None  # wrong length
    assert bitmap_indices(bytes([0, 0x20]), 10) is None  # bit past the last chunk
    assert bitmap_indices(b"", 0) == set()


def test_bad_bitmap_is_counted_and_ignored() -> None:
    s = mk(10)
    assert not s.peer_update("p", 0.0, bitmap=b"\x00")
    assert s.counters["drops.bitmap"] == 1
    assert s.requests_to_send() == []


def test_local_bitmap() -> None:
    s = mk(10, have=(1, 2))
    assert bitmap_indices(s.local_bitmap(), 10) == {1, 2}


def test_local_bitmap_follows_chunks_received_and_lost() -> None:
    # Kept bit by bit (peers ask for it every second), never rebuilt: it must track both ways.
    s = mk(12, have=(0,), **one_chunk_pieces())
    s.peer_update("p", 0.0, complete=True)
    for r in s.requests_to_send():
        if idx(r.chunks[0]) in (3, 11):
            complete(s, r, 1.0)
    assert bitmap_indices(s.local_bitmap(), 12) == {0, 3, 11}
    s.lost([cid(3)], 2.0)
    s.add_have([cid(5)], 2.0)
    assert bitmap_indices(s.local_bitmap(), 12) == {0, 5, 11}


def test_bitmap_updates_count_like_a_fresh_swarm() -> None:
    # A partial peer's bitmap arrives again and again; its holder counts change only by what it
    # gained or lost, and must end where a swarm told the final bitmaps at once ends.
    n = 64
    cfg = one_chunk_pieces(max_requests_total=64, max_requests_per_peer=64)
    final: dict[str, range | list[int]] = {"a": range(0, 40), "b": range(20, 64, 2), "c": [1, 2, 3, 50]}
    step = mk(n, seed=5, **cfg)
    step.peer_update("b", 0.0, site="s1", same_site=True, bitmap=bm(range(20, 30), n))
    step.peer_update("a", 0.0, site="s1", same_site=True, bitmap=bm(range(10), n))
    step.peer_update("c", 0.0, site="s2", bitmap=bm(range(60), n))
    step.requests_to_send()
    for rid in list(step._requests):  # nothing answered: those requests go back
        step.fetch_done(rid, Outcome.ERROR, 0.0)
    step.retry_now(0.0)
    step.peer_update("a", 0.0, site="s1", same_site=True, bitmap=bm(final["a"], n))  # grew
    step.peer_update("b", 0.0, site="s1", same_site=True, bitmap=bm(final["b"], n))  # grew
    step.peer_update("c", 0.0, site="s2", bitmap=bm(final["c"], n))  # shrank (it dropped chunks)
    fresh = mk(n, seed=5, **cfg)
    for peer, site, same in (("b", "s1", True), ("a", "s1", True), ("c", "s2", False)):
        fresh.peer_update(peer, 0.0, site=site, same_site=same, bitmap=bm(final[peer], n))
    assert step._avail == fresh._avail
    assert step._site_avail == fresh._site_avail
    assert step._ordered() == fresh._ordered()


# --- rules ---------------------------------------------------------------------------------


def test_delta_chunks_already_had_are_never_requested() -> None:
    s = mk(20, have=tuple(range(0, 20, 2)))
    assert s.progress().have_chunks == 10
    s.peer_update("p", 0.0, complete=True)
    asked = chunks_of(s.requests_to_send())
    assert sorted(asked) == list(range(1, 20, 2))


def test_updates_recorded_without_a_pass_are_scheduled_by_one_reschedule() -> None:
    # The driver batches members' news: several updates, then one pass that sees them all.
    s = mk(20, **one_chunk_pieces(max_requests_per_peer=20, max_requests_total=40))
    s.peer_update("a", 0.0, bitmap=bm(range(10), 20), schedule=False)
    s.peer_update("b", 0.0, bitmap=bm([], 20), schedule=False)
    assert s.requests_to_send() == []
    s.reschedule(0.0)
    assert sorted(chunks_of(s.requests_to_send())) == list(range(10))  # all of a's, from a
    # b gets everything and a goes, without a pass: nothing moves until the next one, which
    # gives a's chunks (back in the queue) and the rest to b.
    s.peer_update("b", 0.0, bitmap=bm(range(20), 20), schedule=False)
    s.peer_gone("a", 0.0, schedule=False)
    assert s.requests_to_send() == []
    s.reschedule(0.0)
    again = s.requests_to_send()
    assert {r.peer for r in again} == {"b"}
    assert sorted(chunks_of(again)) == list(range(20))


def test_rarest_first() -> None:
    n = 20
    s = mk(n, **one_chunk_pieces(max_requests_total=1, max_requests_per_peer=1))
    s.peer_update("a", 0.0, complete=True)  # has everything
    s.peer_update("b", 0.0, bitmap=bm(range(10), n))
    s.peer_update("c", 0.0, bitmap=bm(range(5), n))
    order: list[int] = []
    now = 0.0
    for _ in range(n):
        reqs = s.requests_to_send()
        assert len(reqs) == 1
        order += chunks_of(reqs)
        now += 0.1
        complete(s, reqs[0], now)
    # Held by one peer first, then by two, then by all three.
    assert set(order[:10]) == set(range(10, 20))
    assert set(order[10:15]) == set(range(5, 10))
    assert set(order[15:]) == set(range(5))
    assert s.complete


def held_back(n: int, seed: int, **cfg: Any) -> Swarm:
    """A swarm whose rate cap holds every request back until one_pass(): its peers can all be
    told first, so that one scheduling pass sees them together."""
    s = mk(n, seed=seed, rate_limit=1.0, **cfg)
    s._tokens = 0.0
    return s


def one_pass(s: Swarm) -> dict[str, list[int]]:
    assert s.requests_to_send() == []
    s._tokens = float(1 << 40)
    s.retry_now(0.0)  # an input: one scheduling pass
    by_peer: dict[str, list[int]] = {}
    for r in s.requests_to_send():
        by_peer.setdefault(r.peer, []).extend(chunks_of([r]))
    return by_peer


@pytest.mark.parametrize("seed", range(5))
def test_seeds_last_partial_holders_are_asked_first(seed: int) -> None:
    # The complete holder (the publisher, whose uplink is the scarce one) is asked only for
    # what no ready partial holder has, even while that holder's slots are all taken.
    n = 20
    s = held_back(n, seed, **one_chunk_pieces(max_requests_per_peer=2, max_requests_total=16))
    s.peer_update("origin", 0.0, complete=True)
    s.peer_update("p1", 0.0, bitmap=bm(range(n - 1), n))  # chunk 19: the origin's alone
    by_peer = one_pass(s)
    assert len(by_peer["p1"]) == 2  # its slots full: the rest waits for it, not the origin
    assert by_peer["origin"] == [19]
    # When p1 fails and cools down, the origin is the only ready holder: it serves the rest.
    for rid, req in list(s._requests.items()):
        s.fetch_done(rid, Outcome.OK if req.peer == "origin" else Outcome.ERROR, 0.0)
    assert {r.peer for r in s.requests_to_send()} == {"origin"}


@pytest.mark.parametrize("seed", range(5))
def test_a_seed_cut_to_our_share_is_still_asked_last(seed: int) -> None:
    n = 16
    s = held_back(n, seed, **one_chunk_pieces(max_requests_per_peer=1, max_requests_total=16))
    s.peer_update("origin", 0.0, bitmap=bm(range(0, n, 2), n), seed=True)  # our share of it
    s.peer_update("p1", 0.0, bitmap=bm([0, 2, 4], n))
    s.peer_update("p2", 0.0, bitmap=bm([0, 2, 4], n))
    by_peer = one_pass(s)
    # Chunks 0, 2, 4 are held by three, the rest of the share by the seed alone: the seed gets
    # one of those, the partial peers two of theirs.
    assert len(by_peer["origin"]) == 1
    assert by_peer["origin"][0] in range(6, n, 2)
    assert sorted(by_peer["p1"] + by_peer["p2"])[0] in (0, 2, 4)
    assert len(by_peer["p1"] + by_peer["p2"]) == 2


def test_rarity_ties_are_broken_by_the_seeded_rng() -> None:
    def first(seed: int) -> list[int]:
        s = mk(50, seed=seed, **one_chunk_pieces(max_requests_total=3))
        s.peer_update("a", 0.0, complete=True)
        return chunks_of(s.requests_to_send())

    assert first(1) == first(1)  # deterministic
    assert len({tuple(first(seed)) for seed in range(6)}) > 1  # but not always 0, 1, 2


def test_same_site_peers_first_even_when_busy() -> None:
    n = 20
    s = mk(n, **one_chunk_pieces(max_requests_per_peer=1))
    s.peer_update("local", 0.0, same_site=True, site="x", bitmap=bm(range(10), n))
    s.peer_update("remote", 0.0, same_site=False, site="y", complete=True)
    now = 0.0
    by_peer: dict[str, set[int]] = {"local": set(), "remote": set()}
    while not s.complete:
        reqs = s.requests_to_send()
        for r in reqs:
            by_peer[r.peer] |= set(chunks_of([r]))
        now += 1.0
        for r in reqs:
            complete(s, r, now)
    assert by_peer["local"] == set(range(10))
    assert by_peer["remote"] == set(range(10, 20))  # only what no site peer has


def test_remote_peer_used_while_the_site_peer_cools_down() -> None:
    n = 4
    s = mk(n, **one_chunk_pieces(max_requests_per_peer=4))
    s.peer_update("local", 0.0, same_site=True, complete=True)
    reqs = s.requests_to_send()
    assert {r.peer for r in reqs} == {"local"}
    s.peer_update("remote", 0.0, complete=True)
    assert s.requests_to_send() == []  # everything is in flight locally
    s.fetch_done(reqs[0].request_id, Outcome.ERROR, 1.0)
    retry = [r for r in s.requests_to_send() if not r.endgame]
    assert [r.peer for r in retry] == ["remote"]
    assert chunks_of(retry) == chunks_of([reqs[0]])


def test_batching_into_pieces() -> None:
    rng = random.Random(3)
    sizes = [rng.randint(16 * KiB, 256 * KiB) for _ in range(200)]
    chunks = [(cid(i), sz) for i, sz in enumerate(sizes)]
    s = Swarm(
        chunks, [], random.Random(1), 0.0, SwarmConfig(max_requests_per_peer=100, max_requests_total=100)
    )
    s.peer_update("a", 0.0, complete=True)
    reqs = s.requests_to_send()
    assert sum(r.size for r in reqs) == sum(sizes)  # everything requested once
    assert sorted(chunks_of(reqs)) == list(range(200))
    for r in reqs:
        assert r.size == sum(sizes[idx(c)] for c in r.chunks)
        assert r.size <= 4 * MiB
    assert all(r.size >= 2 * MiB for r in reqs[:-1])
    assert len(reqs) < 200 // 4  # many chunks per request, not one GET per chunk


def test_per_peer_bound() -> None:
    s = mk(100, **one_chunk_pieces(max_requests_per_peer=3))
    s.peer_update("a", 0.0, complete=True)
    reqs = s.requests_to_send()
    assert len(reqs) == 3
    assert s.requests_to_send() == []
    complete(s, reqs[0], 1.0)
    more = s.requests_to_send()
    assert len(more) == 1
    assert more[0].peer == "a"


def test_total_bound() -> None:
    s = mk(100, **one_chunk_pieces(max_requests_per_peer=4, max_requests_total=6))
    for p in "abcde":
        s.peer_update(p, 0.0, complete=True)
    reqs = s.requests_to_send()
    assert len(reqs) == 6
    assert max(Counter(r.peer for r in reqs).values()) <= 4


def test_rate_cap_token_bucket() -> None:
    rate = 1 * MiB
    s = mk(
        200,
        size=256 * KiB,
        rate_limit=rate,
        rate_burst=4 * MiB,
        max_requests_per_peer=50,
        max_requests_total=50,
    )
    s.peer_update("a", 0.0, complete=True)
    first = s.requests_to_send()
    assert sum(r.size for r in first) == 4 * MiB  # the burst
    timer = s.get_timer()
    assert timer == pytest.approx(2.0)  # 2 MiB piece at 1 MiB/s
    for r in first:
        complete(s, r, 0.5)
    assert s.requests_to_send() == []  # done fast, but the bucket is empty
    requested = 4 * MiB
    now = 0.5
    while not s.complete and now < 100:
        now = s.get_timer() or now + 1
        s.handle_timer(now)
        for r in s.requests_to_send():
            requested += r.size
            complete(s, r, now)
        assert requested <= 4 * MiB + rate * now + 1
    assert s.complete
    assert now == pytest.approx((200 * 256 * KiB - 4 * MiB) / rate, rel=0.05)


def test_endgame_duplicates_the_tail_and_cancels_the_loser() -> None:
    s = mk(3, **one_chunk_pieces(max_requests_per_peer=2))
    s.peer_update("a", 0.0, complete=True)
    s.peer_update("b", 0.0, complete=True)
    normal = s.requests_to_send()
    assert sorted(chunks_of(normal)) == [0, 1, 2]
    assert not any(r.endgame for r in normal)
    assert s.get_timer() == pytest.approx(SwarmConfig().endgame_after)
    s.handle_timer(SwarmConfig().endgame_after)
    dups = s.requests_to_send()
    reqs = normal + dups
    assert dups, "slow tail requests get a duplicate"
    assert all(r.endgame for r in dups)
    for d in dups:
        twin = next(r for r in normal if set(r.chunks) & set(d.chunks))
        assert twin.peer != d.peer  # never the same peer twice
    copies = Counter(chunks_of(reqs))
    assert max(copies.values()) <= 2
    d = dups[0]
    twin = next(r for r in normal if set(r.chunks) == set(d.chunks))
    complete(s, twin, 1.5)
    assert d.request_id in s.requests_to_cancel()
    assert s.counters["requests.endgame"] >= 1


def test_a_small_delta_answered_promptly_is_fetched_once() -> None:
    s = mk(3, **one_chunk_pieces(max_requests_per_peer=2))
    s.peer_update("a", 0.0, complete=True)
    s.peer_update("b", 0.0, complete=True)
    reqs = s.requests_to_send()
    for r in reqs:
        complete(s, r, 0.2)
    s.handle_timer(5.0)
    assert s.complete
    assert s.requests_to_send() == []
    assert s.counters["requests.endgame"] == 0
    assert s.counters["bytes.peers"] == 3 * 64 * KiB


def test_no_endgame_while_much_is_missing() -> None:
    s = mk(50, **one_chunk_pieces(max_requests_per_peer=100, max_requests_total=100, endgame_chunks=8))
    s.peer_update("a", 0.0, complete=True)
    s.peer_update("b", 0.0, complete=True)
    reqs = s.requests_to_send()
    assert len(reqs) == 50
    assert not any(r.endgame for r in reqs)


def test_timeout_requeues_elsewhere_and_cools_the_peer() -> None:
    s = mk(4, **one_chunk_pieces(max_requests_per_peer=1, endgame_chunks=0))
    s.peer_update("slow", 0.0, complete=True)
    (r,) = s.requests_to_send()
    assert r.deadline == pytest.approx(4.0)  # max(4 s, 4 s/MiB x 64 KiB)
    assert s.get_timer() == pytest.approx(4.0)
    s.peer_update("fast", 1.0, complete=True)
    (r2,) = s.requests_to_send()
    assert r2.peer == "fast"
    s.handle_timer(4.0)
    assert r.request_id in s.requests_to_cancel()
    assert [e.kind for e in s.events()] == ["request_timeout"]
    retry = s.requests_to_send()
    assert retry == []  # fast is busy, slow is cooling down
    complete(s, r2, 4.5)
    retry = s.requests_to_send()
    assert [x.peer for x in retry] == ["fast"]
    assert s.counters["timeouts"] == 1


def test_an_answer_still_flowing_is_not_timed_out_until_it_stalls() -> None:
    s = mk(4, **one_chunk_pieces(max_requests_per_peer=1, endgame_chunks=0, stall_timeout=2.0))
    s.peer_update("slow", 0.0, complete=True)
    (r,) = s.requests_to_send()
    assert r.deadline == pytest.approx(4.0)
    s.answer_flowing(r.request_id, 3.5)  # bytes at 3.5 s: the deadline moves to 5.5 s
    s.handle_timer(4.0)
    assert s.requests_to_cancel() == []
    assert s.get_timer() == pytest.approx(5.5)
    s.answer_flowing(r.request_id, 1.0)  # an older report never pulls the deadline back
    s.handle_timer(5.0)
    assert s.requests_to_cancel() == []
    s.handle_timer(5.5)  # no bytes for stall_timeout: timed out as before
    assert s.requests_to_cancel() == [r.request_id]
    assert [e.kind for e in s.events()] == ["request_timeout"]
    assert s.counters["deadlines.extended"] == 1
    s.answer_flowing(r.request_id, 6.0)  # a report after the cancel changes nothing
    assert s.counters["deadlines.extended"] == 1


def test_take_effects_drains_requests_then_cancels_then_events() -> None:
    s = mk(4, **one_chunk_pieces(max_requests_per_peer=1, endgame_chunks=0))
    s.peer_update("slow", 0.0, complete=True)
    (r,) = s.take_effects()
    assert isinstance(r, FetchRequest)
    assert r.peer == "slow"
    s.handle_timer(4.0)  # times out; nobody else to ask
    s.peer_update("fast", 4.0, complete=True)
    effects = s.take_effects()
    assert [type(e).__name__ for e in effects] == ["FetchRequest", "CancelRequest", "SwarmEvent"]
    retry, cancel, event = effects
    assert isinstance(retry, FetchRequest)
    assert retry.peer == "fast"
    assert retry.chunks == r.chunks
    assert cancel == CancelRequest(r.request_id)
    assert isinstance(event, SwarmEvent)
    assert (event.kind, event.peer) == ("request_timeout", "slow")
    assert s.take_effects() == []
    assert s.requests_to_send() == []
    assert s.requests_to_cancel() == []
    assert s.events() == []


class SwarmRecorder:
    """A SwarmEffectHandler that writes down what it was asked to do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.sent: list[FetchRequest] = []

    def send_request(self, req: FetchRequest) -> None:
        self.sent.append(req)
        self.calls.append(("send_request", req.peer))

    def cancel_request(self, request_id: int) -> None:
        self.calls.append(("cancel_request", request_id))

    def swarm_event(self, ev: SwarmEvent) -> None:
        self.calls.append(("swarm_event", ev.kind))


def test_the_pump_drains_a_swarm_to_its_handler_in_order() -> None:
    s = mk(4, **one_chunk_pieces(max_requests_per_peer=1, endgame_chunks=0))
    s.peer_update("slow", 0.0, complete=True)
    rec = SwarmRecorder()
    drain(s, rec)
    assert rec.calls == [("send_request", "slow")]
    (first,) = rec.sent
    s.handle_timer(4.0)
    s.peer_update("fast", 4.0, complete=True)
    rec.calls.clear()
    drain(s, rec)
    assert rec.calls == [
        ("send_request", "fast"),
        ("cancel_request", first.request_id),
        ("swarm_event", "request_timeout"),
    ]
    assert s.take_effects() == []


def test_error_backoff_doubles_then_resets() -> None:
    s = mk(10, **one_chunk_pieces(max_requests_per_peer=1, backoff_base=2.0))
    s.peer_update("a", 0.0, complete=True)
    (r,) = s.requests_to_send()
    s.fetch_done(r.request_id, Outcome.ERROR, 0.0)
    assert s.requests_to_send() == []
    assert s.get_timer() == pytest.approx(2.0)
    s.handle_timer(2.0)
    (r,) = s.requests_to_send()
    s.fetch_done(r.request_id, Outcome.ERROR, 2.0)
    assert s.get_timer() == pytest.approx(6.0)  # 2 s, then 4 s
    s.handle_timer(6.0)
    (r,) = s.requests_to_send()
    complete(s, r, 6.5)
    (r,) = s.requests_to_send()
    s.fetch_done(r.request_id, Outcome.ERROR, 7.0)
    assert s.get_timer() == pytest.approx(9.0)  # success reset the backoff


def test_retry_now_clears_the_named_cool_downs_at_once() -> None:
    s = mk(
        10,
        **one_chunk_pieces(
            max_requests_per_peer=1, backoff_base=30.0, origin_enabled=False, endgame_chunks=0
        ),
    )
    s.peer_update("a", 0.0, complete=True)
    s.peer_update("b", 0.0, complete=True)
    reqs = {r.peer: r for r in s.requests_to_send()}
    assert set(reqs) == {"a", "b"}
    for r in reqs.values():  # both answers could not be stored (the disk was full): 30 s cool-down
        s.fetch_done(r.request_id, Outcome.OK, 1.0, received=[])
    assert s.requests_to_send() == []
    assert s.get_timer() == pytest.approx(31.0)
    # Space came back; "a" failed because of it, "b" for another reason: only "a" is asked now.
    assert s.retry_now(2.0, ["a", "gone"]) == 1
    assert [r.peer for r in s.requests_to_send()] == ["a"]
    assert s.counters["retries.now"] == 1
    (r,) = s.in_flight()
    complete(s, r, 2.5)
    assert [r.peer for r in s.requests_to_send()] == ["a"]  # b's cool-down is untouched
    # The failure count was reset too: a new failure backs off from the base (30 s) again.
    (r,) = s.in_flight()
    s.fetch_done(r.request_id, Outcome.ERROR, 3.0)
    s.handle_timer(32.0)
    assert {r.peer for r in s.requests_to_send()} == {"b"}  # a cools until 33, not 63
    s.handle_timer(33.0)
    assert {r.peer for r in s.requests_to_send()} == {"a"}
    assert s.retry_now(34.0) == 0  # nobody cooling down


def test_retry_now_clears_the_origin_cool_down() -> None:
    s = mk(4, origin_delay=0.0, backoff_base=30.0)
    (r,) = s.requests_to_send()
    s.fetch_done(r.request_id, Outcome.OK, 1.0, received=[])
    s.handle_timer(5.0)
    assert s.requests_to_send() == []  # cooling down until 31
    assert s.retry_now(6.0, [ORIGIN]) == 1
    assert [x.peer for x in s.requests_to_send()] == [ORIGIN]


def test_bad_hash_bans_the_peer_for_this_release() -> None:
    n = 40
    s = mk(n, **one_chunk_pieces(max_requests_per_peer=2))
    s.peer_update("liar", 0.0, same_site=True, complete=True)
    s.peer_update("honest", 0.0, complete=True)
    reqs = s.requests_to_send()
    liar = [r for r in reqs if r.peer == "liar"]
    assert len(liar) == 2
    s.fetch_done(liar[0].request_id, Outcome.BAD_HASH, 1.0, received=[])
    events = s.events()
    assert any(e.kind == "peer_banned" and e.peer == "liar" for e in events)
    assert liar[1].request_id in s.requests_to_cancel()
    assert s.is_banned("liar")
    assert not s.peer_update("liar", 2.0, complete=True)  # ignored from now on
    now = 2.0
    while not s.complete:
        reqs = s.requests_to_send()
        assert reqs
        assert all(r.peer == "honest" for r in reqs)
        now += 1
        for r in reqs:
            complete(s, r, now)


def test_chunks_verified_before_the_bad_one_are_kept() -> None:
    s = mk(4, max_requests_per_peer=1)
    s.peer_update("p", 0.0, complete=True)
    (r,) = s.requests_to_send()
    s.fetch_done(r.request_id, Outcome.BAD_HASH, 1.0, received=list(r.chunks[:2]))
    assert s.progress().have_chunks == 2


def test_short_answer_requeues_the_rest() -> None:
    s = mk(4, max_requests_per_peer=1)
    s.peer_update("p", 0.0, complete=True)
    s.peer_update("q", 0.0, complete=True)
    reqs = s.requests_to_send()
    r = reqs[0]
    s.fetch_done(r.request_id, Outcome.OK, 1.0, received=[r.chunks[0]])
    assert s.progress().have_chunks >= 1
    assert s.counters["errors"] == 1
    again = s.requests_to_send()
    assert set(r.chunks[1:]) <= {c for x in again for c in x.chunks} | {
        c for x in s.in_flight() for c in x.chunks
    }


def test_origin_only_after_the_delay_and_only_for_chunks_no_peer_has() -> None:
    n = 10
    s = mk(
        n,
        **one_chunk_pieces(
            origin_delay=30.0, max_requests_per_peer=20, max_requests_total=20, endgame_chunks=0
        ),
    )
    s.peer_update("p", 0.0, bitmap=bm(range(5), n))
    first = s.requests_to_send()
    assert {r.peer for r in first} == {"p"}
    assert s.get_timer() == pytest.approx(4.0)  # request deadlines come first
    for r in first:
        complete(s, r, 1.0)
    assert s.get_timer() == pytest.approx(30.0)
    s.handle_timer(29.9)
    assert s.requests_to_send() == []
    s.handle_timer(30.0)
    origin = s.requests_to_send()
    assert origin
    assert {r.peer for r in origin} == {ORIGIN}
    assert sorted(chunks_of(origin)) == list(range(5, 10))
    assert [e.kind for e in s.events()] == ["origin_fallback"]
    for r in origin:
        complete(s, r, 31.0)
    assert s.complete
    assert s.counters["bytes.origin"] == 5 * 64 * KiB
    assert s.counters["bytes.peers"] == 5 * 64 * KiB


def test_a_peer_appearing_before_the_delay_saves_the_origin() -> None:
    s = mk(4, origin_delay=30.0)
    assert s.requests_to_send() == []
    s.handle_timer(20.0)
    s.peer_update("p", 20.0, complete=True)
    reqs = s.requests_to_send()
    assert reqs
    assert all(r.peer == "p" for r in reqs)
    s.handle_timer(31.0)
    assert all(r.peer != ORIGIN for r in s.requests_to_send())


def test_origin_disabled_and_origin_bounded() -> None:
    s = mk(4, origin_enabled=False)
    s.handle_timer(1000.0)
    assert s.requests_to_send() == []
    assert s.get_timer() is None
    s = mk(100, size=256 * KiB, origin_delay=0.0, origin_max_requests=2)
    reqs = s.requests_to_send()
    assert len(reqs) == 2
    assert all(r.peer == ORIGIN for r in reqs)


def test_origin_bad_hash_cools_down_instead_of_ban() -> None:
    s = mk(4, origin_delay=0.0)
    (r,) = s.requests_to_send()
    s.fetch_done(r.request_id, Outcome.BAD_HASH, 1.0)
    assert s.requests_to_send() == []
    assert not s.is_banned(ORIGIN)
    s.handle_timer(1.0 + SwarmConfig().backoff_max)
    assert [x.peer for x in s.requests_to_send()] == [ORIGIN]


def test_late_result_still_counts() -> None:
    s = mk(4, max_requests_per_peer=1)
    s.peer_update("p", 0.0, complete=True)
    (r,) = s.requests_to_send()
    s.handle_timer(r.deadline)
    s.fetch_done(r.request_id, Outcome.OK, r.deadline + 1, received=list(r.chunks))
    assert s.counters["results.late"] == 1
    assert s.complete


def test_peer_gone_requeues() -> None:
    s = mk(8, **one_chunk_pieces(max_requests_per_peer=8))
    s.peer_update("a", 0.0, same_site=True, complete=True)
    s.peer_update("b", 0.0, complete=True)
    reqs = s.requests_to_send()
    assert {r.peer for r in reqs} == {"a"}
    s.peer_gone("a", 1.0)
    assert sorted(s.requests_to_cancel()) == sorted(r.request_id for r in reqs)
    again = s.requests_to_send()
    assert {r.peer for r in again} == {"b"}
    assert sorted(chunks_of(again)) == list(range(8))


def test_lost_chunk_is_fetched_again() -> None:
    s = mk(3, have=(0, 1, 2))
    assert s.complete
    assert s.get_timer() is None
    assert [e.kind for e in s.events()] == ["complete"]
    s.peer_update("p", 0.0, complete=True)
    assert s.requests_to_send() == []
    s.lost([cid(1)], 1.0)
    assert chunks_of(s.requests_to_send()) == [1]


def test_complete_event_once_and_then_quiet() -> None:
    s = mk(3)
    s.peer_update("p", 0.0, complete=True)
    for r in s.requests_to_send():
        complete(s, r, 1.0)
    assert s.complete
    assert s.progress().fraction == 1.0
    s.add_have([cid(0)], 2.0)
    s.handle_timer(3.0)
    assert [e.kind for e in s.events()].count("complete") == 1
    assert s.requests_to_send() == []
    assert s.get_timer() is None


def test_add_have_from_elsewhere() -> None:
    s = mk(3)
    s.add_have([cid(0), cid(2), "ff" * 32], 0.0)
    assert s.progress().have_chunks == 2
    assert s.missing_ids() == [cid(1)]


# --- a randomised swarm run: invariants hold, the release completes -------------------------


@pytest.mark.parametrize("seed", range(5))
def test_random_faults_still_complete(seed: int) -> None:
    rng = random.Random(seed)
    n = 120
    cfg = SwarmConfig(
        piece_target=256 * KiB,
        piece_max=512 * KiB,
        max_requests_per_peer=2,
        max_requests_total=6,
        origin_delay=50.0,
    )
    s = Swarm(ids(n), [], random.Random(seed), 0.0, cfg)
    peers = {f"p{i}": set(rng.sample(range(n), rng.randint(20, n))) for i in range(6)}
    liar = "p0"
    for p, have in peers.items():
        s.peer_update(p, 0.0, same_site=rng.random() < 0.5, bitmap=make_bitmap(have, n))
    now = 0.0
    pending: list[FetchRequest] = []
    while not s.complete and now < 2000:
        new = s.requests_to_send()
        missing = set(s.missing_ids())
        for r in new:
            assert set(r.chunks) <= missing  # never a chunk already had
            assert r.peer != liar or not s.is_banned(liar)
        pending += new
        cancelled = set(s.requests_to_cancel())
        pending = [r for r in pending if r.request_id not in cancelled]
        # Invariants.
        flight = s.in_flight()
        per_peer = Counter(r.peer for r in flight)
        assert all(v <= 2 for k, v in per_peer.items() if k != ORIGIN)
        assert len(flight) <= 6 + cfg.origin_max_requests
        assert not s.is_banned(liar) or liar not in per_peer
        now += 1.0
        if pending and rng.random() < 0.8:
            r = pending.pop(rng.randrange(len(pending)))
            roll = rng.random()
            if r.peer == liar:
                s.fetch_done(r.request_id, Outcome.BAD_HASH, now, received=[])
            elif roll < 0.1:
                s.fetch_done(r.request_id, Outcome.ERROR, now)
            elif roll < 0.15:
                pass  # lost: the core times it out
            else:
                s.fetch_done(r.request_id, Outcome.OK, now)
        timer = s.get_timer()
        if timer is not None and timer <= now:
            s.handle_timer(now)
    assert s.complete, s.progress()
    assert s.is_banned(liar)
    total = s.counters["bytes.peers"] + s.counters["bytes.origin"]
    assert total == n * 64 * KiB  # every chunk counted once, duplicates apart
