"""Adoption policy: one test (at least) per rule of the table in meshd/core/adoption.py.

Each test is a transcript: inputs with an explicit `now`, and the decisions in order.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from meshd.core.adoption import (
    DISCOVER_RETRY,
    DISCOVER_RETRY_MAX,
    FALLBACK_AFTER,
    JITTER,
    REJECT_RETRY,
    AdoptionPolicy,
    Discovery,
    Offer,
    Verdict,
    natural_key,
    newer,
    release_order,
)
from tests.fakes import Midpoint

D = Discovery
RID = "0123456789abcdef"
OTHER = "fedcba9876543210"


@dataclass(frozen=True)
class Rel:
    """A manifest as the policy sees it."""

    version: str
    seq: int = 0
    name: str = "app"
    release_id: str = RID + "0" * 48
    site: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    def matches(self, site: str, tags: Mapping[str, str]) -> bool:
        if self.site is not None and self.site != site:
            return False
        return all(tags.get(k) == v for k, v in self.tags.items())


def policy(rng: random.Random | None = None) -> AdoptionPolicy:
    return AdoptionPolicy("a", {"role": "pos"}, rng or Midpoint())


# --- discovery -----------------------------------------------------------------------------------


def test_discover_once_then_busy_until_discovered() -> None:
    p = policy()
    assert [
        p.announced(RID, 3, 0.0, known=False),
        p.announced(RID, 3, 0.1, known=False),
        p.announced(OTHER, 1, 0.1, known=False),
    ] == [D.FETCH_MANIFEST, D.BUSY, D.FETCH_MANIFEST]
    p.discovered(RID)
    assert p.announced(RID, 3, 0.2, known=False) is D.FETCH_MANIFEST


def test_nothing_yet_while_the_announcer_has_no_chunk() -> None:
    p = policy()
    assert p.announced(RID, 0, 0.0, known=False) is D.NOTHING_YET
    assert not p.discovering
    assert p.announced(RID, 1, 1.0, known=False) is D.FETCH_MANIFEST


def test_known_release_is_not_asked_for() -> None:
    p = policy()
    assert p.announced(RID, 5, 0.0, known=True) is D.KNOWN
    assert not p.discovering


def test_unanswered_backs_off_discover_retry() -> None:
    p = policy()
    assert p.announced(RID, 1, 10.0, known=False) is D.FETCH_MANIFEST
    p.unanswered(RID, 10.5)
    p.discovered(RID)
    assert p.next_deadline(10.5) == 10.5 + DISCOVER_RETRY
    assert [
        p.announced(RID, 1, 11.0, known=False),
        p.announced(RID, 1, 10.5 + DISCOVER_RETRY, known=False),  # the back-off has ended
    ] == [D.BACKING_OFF, D.FETCH_MANIFEST]


def test_refused_backs_off_reject_retry() -> None:
    p = policy()
    p.announced(RID, 1, 0.0, known=False)
    p.refused(RID, 1.0)
    p.discovered(RID)
    assert [
        p.announced(RID, 1, 1.0 + DISCOVER_RETRY, known=False),
        p.announced(RID, 1, 1.0 + REJECT_RETRY - 0.01, known=False),
        p.announced(RID, 1, 1.0 + REJECT_RETRY + 0.01, known=False),
    ] == [D.BACKING_OFF, D.BACKING_OFF, D.FETCH_MANIFEST]


def test_busy_and_ignored_come_before_known_and_back_off() -> None:
    p = policy()
    p.announced(RID, 1, 0.0, known=False)
    assert p.announced(RID, 0, 0.0, known=True) is D.BUSY
    p.judge(RID, Rel("1.0", site="b"), None, [])
    p.discovered(RID)
    p.refused(RID, 0.0)
    assert p.announced(RID, 1, 0.0, known=True) is D.IGNORED


def test_unanswered_backs_off_exponentially_up_to_the_cap() -> None:
    p = policy()
    delays = []
    for _ in range(8):
        p.unanswered(RID, 0.0)
        delays.append(p.retry_at[RID])
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert DISCOVER_RETRY == 2.0
    assert DISCOVER_RETRY_MAX == 60.0
    p.judge(RID, Rel("1.0"), None, [])  # an answer ends the back-off and its count
    assert RID not in p.retry_at
    assert RID not in p.failures


def test_back_offs_are_jittered_so_nodes_do_not_retry_together() -> None:
    seen = set()
    for seed in range(20):
        p = policy(random.Random(seed))
        p.unanswered(RID, 0.0)
        at = p.retry_at[RID]
        assert DISCOVER_RETRY * (1 - JITTER) <= at <= DISCOVER_RETRY * (1 + JITTER)
        seen.add(round(at, 6))
    assert len(seen) > 10


def test_next_deadline_is_the_earliest_running_back_off() -> None:
    p = policy()
    assert p.next_deadline(0.0) is None
    p.refused(RID, 0.0)
    p.unanswered(OTHER, 0.0)
    assert p.next_deadline(0.0) == DISCOVER_RETRY
    assert p.next_deadline(DISCOVER_RETRY) == REJECT_RETRY  # an ended one is dropped
    assert set(p.retry_at) == {RID}
    assert p.next_deadline(REJECT_RETRY) is None


# --- judgement -----------------------------------------------------------------------------------


def test_targeting_by_site_and_tags() -> None:
    p = policy()
    assert [
        p.judge(RID, Rel("1.0", site="b"), None, []),
        p.judge(OTHER, Rel("1.0", tags={"role": "cam"}), None, []),
        p.judge("1" * 16, Rel("1.0", site="a", tags={"role": "pos"}), None, []),
    ] == [Verdict.NOT_TARGETED, Verdict.NOT_TARGETED, Verdict.ADOPT]
    assert p.ignored == {RID: "not targeted at this node", OTHER: "not targeted at this node"}
    assert p.announced(RID, 9, 100.0, known=False) is D.IGNORED  # for good


def test_only_newer_than_current_is_adopted() -> None:
    p = policy()
    current = Rel("1.10", seq=5, release_id="c" * 64)
    assert [
        p.judge("1" * 16, Rel("1.9", seq=5), current, []),
        p.judge("2" * 16, Rel("1.10", seq=5, release_id="0" * 64), current, []),  # same: id decides
        p.judge("3" * 16, Rel("9.0", seq=4), current, []),  # published before it
        p.judge("4" * 16, Rel("1.11", seq=5), current, []),
        p.judge("5" * 16, Rel("0.1", seq=6), current, []),  # published after it: wins
    ] == [Verdict.OLDER, Verdict.OLDER, Verdict.OLDER, Verdict.ADOPT, Verdict.ADOPT]
    assert p.ignored["1" * 16] == "not newer than current 1.10"


def test_not_newer_than_a_held_release_is_older() -> None:
    p = policy()
    ahead = Rel("3.0", seq=3, release_id="d" * 64)  # being fetched, not current yet
    current = Rel("1.0", seq=1, release_id="e" * 64)
    assert p.judge(RID, Rel("2.0", seq=2), current, [ahead], ahead) is Verdict.OLDER
    assert p.ignored[RID] == "not newer than held 3.0"
    assert (
        p.judge(OTHER, Rel("4.0", seq=4, release_id=OTHER + "0" * 48), None, [ahead], ahead) is Verdict.ADOPT
    )
    # Held for others (the shell passes no `ahead`): it does not hide an older one for us.
    assert p.judge("5" * 16, Rel("2.5", seq=2, release_id="5" * 64), current, [ahead]) is Verdict.ADOPT


def test_a_version_taken_with_other_content_conflicts() -> None:
    p = policy()
    held = [Rel("2.0", release_id="a" * 64), Rel("2.0", name="other", release_id="b" * 64)]
    assert [
        p.judge(RID, Rel("2.0", release_id=RID + "1" * 48), None, held),
        p.judge(OTHER, Rel("2.0", release_id="a" * 64), None, held),  # the same release
        p.judge("1" * 16, Rel("2.1"), None, held),
    ] == [Verdict.CONFLICT, Verdict.ADOPT, Verdict.ADOPT]
    assert p.ignored == {RID: "version already installed with other content"}


def test_targeting_is_judged_before_age_and_conflict() -> None:
    p = policy()
    current = Rel("5.0", seq=5)
    taken = [Rel("1.0", release_id="x" * 64)]
    assert p.judge(RID, Rel("1.0", site="b"), current, taken) is Verdict.NOT_TARGETED
    assert p.judge(OTHER, Rel("1.0"), current, taken) is Verdict.OLDER


def test_activation_needs_targeted_and_newer_and_remembers_nothing() -> None:
    p = policy()
    current = Rel("1.0")
    assert [
        p.activation(Rel("2.0", site="b"), current),
        p.activation(Rel("0.9"), current),
        p.activation(Rel("2.0"), current),
        p.activation(Rel("0.1"), None),
    ] == [Verdict.NOT_TARGETED, Verdict.OLDER, Verdict.ADOPT, Verdict.ADOPT]
    assert not p.ignored
    assert not p.retry_at


# --- order of versions ---------------------------------------------------------------------------


def test_natural_version_order() -> None:
    versions = ["1.10", "1.9", "1.9a", "1.0-rc1", "1.0", "10", "2"]
    assert sorted(versions, key=natural_key) == ["1.0", "1.0-rc1", "1.9", "1.9a", "1.10", "2", "10"]
    assert newer(Rel("1.10"), Rel("1.9"))
    assert not newer(Rel("1.9"), Rel("1.10"))
    assert not newer(Rel("1.0"), Rel("1.0"))
    assert newer(Rel("0.1", seq=2), Rel("9.9", seq=1))


def test_order_takes_no_clock_only_the_signed_seq_version_and_id() -> None:
    a = Rel("2.0", seq=7, release_id="a" * 64)
    b = Rel("2.0", seq=7, release_id="b" * 64)
    assert release_order(a) == (7, natural_key("2.0"), "a" * 16)
    assert newer(b, a)
    assert not newer(a, b)


# --- picking the newest offer ----------------------------------------------------------------------


def offer(version: str, seq: int, rid16: str, have: int = 4) -> Offer:
    return Offer("app", version, seq, rid16, have)


V1, V2, V3 = "1" * 16, "2" * 16, "3" * 16


def test_pick_fetches_only_the_newest_offer() -> None:
    p = policy()
    offers = [offer("1.0", 1, V1), offer("2.0", 2, V2)]
    assert p.pick(offers, None, 0.0) == offers[1]
    assert p.discovering == {V2}  # until discovered()
    assert p.pick(offers, None, 0.0) is None  # busy with it: the older one is not fetched meanwhile
    assert p.pick(offers, release_order(Rel("2.0", seq=2, release_id=V2 + "0" * 48)), 0.0) is None
    fresh = policy()
    assert fresh.pick([offer("1.0", 1, V1), offer("2.0", 2, V2, have=0)], None, 0.0) is None  # wait for it
    assert not fresh.discovering


def test_pick_waits_while_the_newest_is_busy_or_backing_off() -> None:
    p = policy()
    offers = [offer("1.0", 1, V1), offer("2.0", 2, V2)]
    assert p.announced(V2, 4, 0.0, known=False) is D.FETCH_MANIFEST
    assert p.pick(offers, None, 0.0) is None
    p.unanswered(V2, 0.0)
    p.discovered(V2)
    assert p.pick(offers, None, 1.0) is None  # backing off: the older one is not fetched instead
    assert p.pick(offers, None, DISCOVER_RETRY) == offers[1]


def test_pick_falls_back_when_the_newest_is_never_served() -> None:
    p = policy()
    offers = [offer("1.0", 1, V1), offer("9.0", 9, V3)]  # a holder announcing a release it never serves
    for _ in range(FALLBACK_AFTER):
        p.unanswered(V3, 0.0)
    assert p.pick(offers, None, 1.0) == offers[0]
    assert p.pick(offers, None, 1000.0) == offers[1]  # and it is still retried on its timer


def test_pick_passes_over_an_offer_held_under_a_false_seq() -> None:
    p = policy()
    liar = offer("1.0", 10**12, V1)  # announced far above the seq its manifest carries
    real = offer("2.0", 2, V2)
    held = release_order(Rel("1.0", seq=1, release_id=V1 + "0" * 48))
    assert p.pick([liar, real], held, 0.0, known={V1}) == real


def test_pick_skips_ignored_offers() -> None:
    p = policy()
    offers = [offer("1.0", 1, V1), offer("2.0", 2, V2)]
    p.judge(V2, Rel("2.0", seq=2, site="b"), None, [])
    assert p.pick(offers, None, 0.0) == offers[0]
