"""The site cache's decisions (meshd/registry/site_cache.py): the owner of a digest, leases,
advertisements, the upstream a request names, and the cache's LRU order and cap."""

from __future__ import annotations

import base64
import itertools

import pytest

from meshd.registry.site_cache import (
    ADVERT_KEY,
    MAX_ADVERTISED,
    MAX_LEASES,
    Attempt,
    CacheIndex,
    SiteMember,
    Step,
    advertises,
    decode_advert,
    decode_leases,
    decode_summary,
    encode_advert,
    encode_summary,
    lease_key,
    pick_upstream,
    plan,
    rendezvous_owner,
)
from tests.oci_images import sha

DIGESTS = [sha(bytes([i])) for i in range(200)]
D = DIGESTS[0]
NAMES = ["n1", "n2", "n3", "n4", "n5"]


def members(
    *names: str, blobs: dict[str, list[str]] | None = None, dead: tuple[str, ...] = ()
) -> list[SiteMember]:
    out = []
    for n in names:
        meta = {ADVERT_KEY: encode_advert((blobs or {}).get(n, []))}
        out.append(SiteMember.from_meta(n, f"addr-{n}", n * 4, n not in dead, meta))
    return out


# --- the owner ------------------------------------------------------------------------------


def test_every_node_with_the_same_view_picks_the_same_owner() -> None:
    for d in DIGESTS[:50]:
        owners = {rendezvous_owner(d, order) for order in itertools.permutations(NAMES)}
        assert len(owners) == 1


def test_owners_spread_over_the_site_and_a_gone_node_moves_only_its_own_digests() -> None:
    before = {d: rendezvous_owner(d, NAMES) for d in DIGESTS}
    assert set(before.values()) == set(NAMES)  # every node owns some
    after = {d: rendezvous_owner(d, [n for n in NAMES if n != "n3"]) for d in DIGESTS}
    moved = {d for d in DIGESTS if before[d] != after[d]}
    assert moved == {d for d in DIGESTS if before[d] == "n3"}
    assert rendezvous_owner(D, []) is None


def test_plan_asks_the_owner_and_skips_a_dead_one() -> None:
    d = next(d for d in DIGESTS if rendezvous_owner(d, NAMES) == "n2")
    p = plan(d, "n1", members("n2", "n3", "n4", "n5"), Attempt(), 0.0, have_upstream=True)
    assert p.step is Step.ASK_OWNER
    assert p.peer is not None
    assert p.peer.name == "n2"
    # n2 dead: the owner among the alive ones (the same on every node that sees n2 dead)
    alive_owner = rendezvous_owner(d, ["n1", "n3", "n4", "n5"])
    p = plan(d, "n1", members("n2", "n3", "n4", "n5", dead=("n2",)), Attempt(), 0.0, have_upstream=True)
    if alive_owner == "n1":
        assert p.step is Step.UPSTREAM
    else:
        assert p.step is Step.ASK_OWNER
        assert p.peer is not None
        assert p.peer.name == alive_owner


def test_the_owner_fetches_upstream_itself_and_a_failed_owner_means_upstream_here() -> None:
    d = next(d for d in DIGESTS if rendezvous_owner(d, NAMES) == "n1")
    assert (
        plan(d, "n1", members("n2", "n3", "n4", "n5"), Attempt(), 0.0, have_upstream=True).step
        is Step.UPSTREAM
    )
    d = next(d for d in DIGESTS if rendezvous_owner(d, NAMES) == "n4")
    p = plan(d, "n1", members("n2", "n3", "n4", "n5"), Attempt(failed={"n4"}), 0.0, have_upstream=True)
    assert p.step is Step.UPSTREAM


def test_a_holder_serves_first_and_without_upstream_nothing_left_is_a_give_up() -> None:
    site = members("n2", "n3", blobs={"n3": [D]})
    p = plan(D, "n1", site, Attempt(), 0.0, have_upstream=True)
    assert (p.step, p.peer.name if p.peer else None) == (Step.PEER, "n3")
    p = plan(D, "n1", site, Attempt(failed={"n3"}), 0.0, have_upstream=False)
    assert p.step is Step.GIVE_UP
    # dead members' advertisements do not count
    assert (
        plan(
            D, "n1", members("n3", blobs={"n3": [D]}, dead=("n3",)), Attempt(), 0.0, have_upstream=False
        ).step
        is Step.GIVE_UP
    )


def test_asks_are_bounded_then_upstream() -> None:
    site = members("n2", "n3", blobs={"n2": [D], "n3": [D]})
    assert plan(D, "n1", site, Attempt(asks=3), 0.0, have_upstream=True, max_asks=3).step is Step.UPSTREAM


# --- leases ---------------------------------------------------------------------------------


def test_a_lease_holder_is_joined_until_the_lease_times_out() -> None:
    d = next(d for d in DIGESTS if rendezvous_owner(d, NAMES) == "n1")  # n1 would pay itself
    leased = [
        SiteMember.from_meta("n4", "addr-n4", "", True, {lease_key(d): "1"}),
        *members("n2", "n3", "n5"),
    ]
    attempt = Attempt()
    p = plan(d, "n1", leased, attempt, 100.0, have_upstream=True, lease_timeout=30.0)
    assert (p.step, p.peer.name if p.peer else None) == (Step.JOIN, "n4")
    assert plan(d, "n1", leased, attempt, 129.0, have_upstream=True, lease_timeout=30.0).step is Step.JOIN
    # seen for the whole timeout and still there: no longer waited for
    assert plan(d, "n1", leased, attempt, 130.5, have_upstream=True, lease_timeout=30.0).step is Step.UPSTREAM
    # a lease holder that failed is not asked again
    p = plan(d, "n1", leased, Attempt(failed={"n4"}), 100.0, have_upstream=True)
    assert p.step is Step.UPSTREAM


def test_lease_keys_read_from_metadata_bounded_and_checked() -> None:
    meta = {lease_key(d): "1" for d in DIGESTS[: MAX_LEASES + 10]}
    meta.update({"ocifetch:XYZ": "1", "ocifetch:" + "a" * 13: "1", "site": "s"})
    leases = decode_leases(meta)
    assert len(leases) == MAX_LEASES
    assert all(k.startswith("ocifetch:") and len(k) == len("ocifetch:") + 12 for k in leases)
    with pytest.raises(ValueError, match="sha256"):
        lease_key("md5:abc")


# --- advertisements -------------------------------------------------------------------------


def test_advert_round_trip_keeps_the_most_recent_and_is_bounded() -> None:
    many = [sha(i.to_bytes(2, "big")) for i in range(MAX_ADVERTISED + 50)]
    value = encode_advert(many)
    assert len(value) <= 4 * MAX_ADVERTISED * 8 // 3 + 4
    prefixes = decode_advert(value)
    assert len(prefixes) == MAX_ADVERTISED
    assert all(advertises(prefixes, d) for d in many[:MAX_ADVERTISED])
    assert not any(advertises(prefixes, d) for d in many[MAX_ADVERTISED:])
    assert decode_advert(encode_advert([])) == frozenset()


@pytest.mark.parametrize(
    "bad",
    [
        None,
        123,
        "not base64!",
        base64.b64encode(b"1234567").decode(),  # not a whole prefix
        base64.b64encode(b"x" * 8 * (MAX_ADVERTISED + 1)).decode(),  # oversized
    ],
)
def test_a_malformed_advert_reads_as_nothing(bad: object) -> None:
    assert decode_advert(bad) == frozenset()


def test_cache_summary_round_trip_and_bad_input() -> None:
    assert decode_summary(encode_summary(5, 12345)) == (5, 12345)
    for bad in (None, "", "5", "-1 2", "5 x", "1 2 3", "9" * 13 + " 1"):
        assert decode_summary(bad) is None


# --- the upstream a request names -----------------------------------------------------------


def test_containerd_ns_picks_the_matching_upstream_else_the_first() -> None:
    ups = ["http://127.0.0.1:5001", "https://registry-1.docker.io", "https://ghcr.io/"]
    assert pick_upstream(ups, None) == ups[0]
    assert pick_upstream(ups, "elsewhere.example") == ups[0]
    assert pick_upstream(ups, "docker.io") == ups[1]
    assert pick_upstream(ups, "ghcr.io") == ups[2]
    assert pick_upstream(ups, "127.0.0.1:5001") == ups[0]
    assert pick_upstream([], "docker.io") is None


# --- the cache's order and cap --------------------------------------------------------------


def test_gc_removes_least_recently_used_first_until_under_the_cap() -> None:
    idx = CacheIndex()
    for i, d in enumerate(DIGESTS[:5]):
        idx.add(d, 100 * (i + 1))  # 100, 200, 300, 400, 500: 1500
    idx.touch(DIGESTS[0])  # used again: now the most recent
    assert idx.recent(2) == [DIGESTS[0], DIGESTS[4]]
    assert idx.victims(1500) == []
    assert idx.victims(1200) == [DIGESTS[1], DIGESTS[2]]  # 200 + 300 freed: 1000 left
    assert idx.victims(1200, keep=[DIGESTS[1]]) == [DIGESTS[2]]  # in use: skipped
    for d in idx.victims(0):
        idx.remove(d)
    assert (len(idx), idx.total) == (0, 0)


def test_re_adding_a_blob_counts_its_size_once() -> None:
    idx = CacheIndex()
    idx.add(D, 10)
    idx.add(D, 10)
    assert (len(idx), idx.total) == (1, 10)
