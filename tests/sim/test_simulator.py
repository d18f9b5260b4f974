"""The simulator's model and one small run of it."""

import math

import pytest

from meshd.sim import epidemic_fraction, epidemic_time, run_spread


def test_epidemic_model_matches_serf_table() -> None:
    # reference/gossip-membership.md 2.4: N=30, Serf defaults, 99.99% at about 1.8 s.
    t = epidemic_time(30, 3, 0.0, 0.2, 0.9999)
    assert 1.6 <= t <= 2.0
    rounds = t / 0.2
    assert epidemic_fraction(30, 3, 0.0, rounds) == pytest.approx(0.9999, abs=1e-6)


def test_small_simulation_spreads_news_and_detects_a_kill() -> None:
    r = run_spread(30, "local", loss=0.05, seed=4)
    assert math.isfinite(r.t100)
    assert r.t50 <= r.t90 <= r.t99 <= r.t100 < 10.0
    assert math.isfinite(r.detect_all)
    assert r.detect_first <= r.detect_all
