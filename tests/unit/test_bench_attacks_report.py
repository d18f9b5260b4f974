"""The pure parts of bench/bench_attacks.py: quantiles, 'median (min-max)' cells, /proc/PID/limits,
the probe helper's output and the table row built from several runs."""

from __future__ import annotations

import json

import pytest

from bench.bench_attacks import (
    Run,
    parse_nofile,
    parse_probe_lines,
    percentile,
    render,
    row_cells,
    spread,
)

LIMITS = """Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 20000                files
Max locked memory         8388608              8388608              bytes
"""


def test_percentile_is_nearest_rank_and_none_without_samples() -> None:
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 0.5) == 3.0
    assert percentile(xs, 0.0) == 1.0
    assert percentile(xs, 1.0) == 5.0
    assert percentile(list(map(float, range(1, 101))), 0.95) == 95.0
    assert percentile([], 0.5) is None


def test_spread_gives_median_and_range_over_runs_ignoring_missing_values() -> None:
    fmt = lambda x: f"{x:.0f}"  # noqa: E731
    assert spread([3.0, 1.0, 10.0], fmt) == "3 (1-10)"
    assert spread([7.0, None], fmt) == "7"
    assert spread([None, None], fmt) == "-"


def test_parse_nofile_reads_soft_and_hard_limits() -> None:
    assert parse_nofile(LIMITS) == "1024/20000"
    assert parse_nofile("Limit Soft Hard\n") == "?"


def test_parse_probe_lines_counts_round_trips_losses_and_errors() -> None:
    lines = [json.dumps({"rtt_ms": 0.5}), json.dumps({"lost": True}), "not json", json.dumps({"rtt_ms": 2})]
    assert parse_probe_lines("\n".join(lines)) == ([0.5, 2.0], 1, None)
    rtts, lost, error = parse_probe_lines(json.dumps({"error": "TypeError: pack() missing 'to'"}))
    assert (rtts, lost, error) == ([], 0, "TypeError: pack() missing 'to'")


def _run(**kw: object) -> Run:
    base: dict[str, object] = {
        "probe_ms": [1.0, 2.0, 3.0],
        "api_ms": [float(x) for x in range(1, 21)],
        "rss_max_kb": 51200,
        "rss_after_kb": 40960,
        "fds_max": 1018,
        "fds_after": 16,
        "alive_seen": 10,
        "alive_polls": 10,
        "outcome": "1000/1000 opened",
    }
    base.update(kw)
    return Run(**base)  # type: ignore[arg-type]


def test_row_cells_for_one_healthy_run() -> None:
    probe, api, rss, fds, alive, attack = row_cells([_run()])
    assert probe == "2.0 ms"
    assert api == "11 / p95 19"  # q50 and q95 of 1..20 ms by nearest rank (index round(q x 19))
    assert rss == "50 / 40"  # MiB
    assert fds == "1018 / 16"
    assert alive == "yes"
    assert attack == "1000/1000 opened"


def test_row_cells_show_failures_losses_deaths_and_spread() -> None:
    runs = [
        _run(probe_ms=[1.0], probe_lost=3, api_failed=5, alive_seen=7, rss_max_kb=1024 * 100),
        _run(probe_ms=[], probe_error="boom", rss_max_kb=1024 * 300, target_died=True, outcome="x"),
        _run(rss_max_kb=1024 * 200),
    ]
    probe, api, rss, _fds, alive, attack = row_cells(runs)
    assert probe == "1.5 (1.0-2.0) ms, 3/7 lost (error: boom)"
    assert api.endswith("5/65 failed")
    assert rss.startswith("200 (100-300) / ")
    assert alive == "TARGET DIED; 27/30 polls"
    assert attack == "1000/1000 opened; x"


def test_render_writes_one_row_per_scenario_and_system() -> None:
    text = render(
        [("rest", "meshd main @abc", [_run()]), ("rest", "meshd wt @def", [_run(), _run()])],
        ["header line"],
        ["a note"],
    )
    rows = [line for line in text.splitlines() if line.startswith("| rest |")]
    assert len(rows) == 2
    assert rows[1].split(" | ")[1:3] == ["meshd wt @def", "2"]
    assert all(line.count("|") == 10 for line in rows)
    assert "- a note" in text


@pytest.mark.parametrize("q", [0.5, 0.95])
def test_percentile_of_one_sample_is_that_sample(q: float) -> None:
    assert percentile([4.0], q) == 4.0
