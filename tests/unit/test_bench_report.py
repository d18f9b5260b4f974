"""The pure parts of the benchmark report (issue 11): median and spread over runs, the result
files rendered from raw runs, the headlines (protocol figure for queries, same reconnect interval
in the heal test) and bench/report.py reading the JSON files, the simulator's included."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.bench_discovery import render as render_discovery
from bench.bench_distribution import (
    HOOK,
    Config,
    hook_times,
    parse_config,
    summarize_runs,
)
from bench.bench_distribution import render as render_distribution
from bench.bench_queries import headline
from bench.benchstats import cell, summary

MB = 1_000_000
ENV = {"date": "d", "host": "h", "kernel": "k", "cpus": 2, "load_1m_at_start": 0.1, "python": "3.11"}


def test_summary_counts_failed_runs_and_never_hides_them() -> None:
    s = summary([3.0, None, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"], s["failed"]) == (2.0, 1.0, 3.0, 3, 1)
    assert cell(s) == "2.00 s (1.00 s-3.00 s), n=3, 1 failed"
    assert cell(summary([None, None])) == "- (all 2 runs failed)"
    assert cell(summary([0.25])) == "250 ms, n=1"


def test_config_names_sites_by_hosts() -> None:
    c = parse_config("2x8")
    assert (c.sites, c.clients_per_site, c.clients, c.name) == (2, 8, 16, "2x8")
    assert parse_config("1x32").clients == 32
    with pytest.raises(argparse.ArgumentTypeError):
        parse_config("16")


def test_torrent_completion_is_the_hook_stamp_not_a_file_or_poll_time() -> None:
    # The hook stamps wall time when aria2c runs it; the figure is that, moved to the monotonic clock.
    assert "on-bt-download-complete" in HOOK
    assert "date +%s.%N" in HOOK
    assert ".aria2" not in HOOK
    seen = hook_times({"s1h2": "1000.5\n", "s1h3": "1007.25\n"}, t0=50.0, t0_wall=1000.0)
    assert seen == {"s1h2": 50.5, "s1h3": 57.25}


def _distribution_doc() -> dict[str, Any]:
    def runs(times: list[float | None], egress: float) -> list[dict[str, Any]]:
        return [
            {"error": "timed out"}
            if t is None
            else {"time_s": t, "egress_bytes": egress * 40 * MB, "thin_link_bytes": 0, "ok": True}
            for t in times
        ]

    configs = []
    for cfg, scale in ((Config(1, 8), 1.0), (Config(2, 8), 1.5)):
        r = {
            "http": runs([30.0 * scale] * 3, 8.0),
            "torrent": runs([7.0 * scale, 8.0 * scale, 8.5 * scale], 1.6),
            "meshd": runs([6.0 * scale, None, 6.5 * scale], 1.05),
        }
        configs.append(
            {
                "name": cfg.name,
                "sites": cfg.sites,
                "clients": cfg.clients,
                "clients_per_site": cfg.clients_per_site,
                "runs": r,
                "summary": {s: summarize_runs(v, 40 * MB) for s, v in r.items()},
            }
        )
    return {
        "bench": "distribution",
        "env": ENV | {"command": "bench/bench_distribution.py --runs 3"},
        "conditions": {
            "size_bytes": 40 * MB,
            "origin_rate": "100mbit",
            "site_rate": "20mbit",
            "meshd_profile": "lan",
            "runs": 3,
            "clocks": {"torrent": "from launching the seeder", "meshd": "from launching meshctl publish"},
        },
        "configs": configs,
    }


def test_distribution_table_gives_median_spread_failures_and_the_clocks() -> None:
    md = render_distribution(_distribution_doc())
    assert "Clocks:" in md
    assert "from launching the seeder" in md
    assert "7.00 s (7.00 s-8.50 s)" not in md  # the median is the middle run, not the first
    assert "8.00 s (7.00 s-8.50 s), n=3" in md
    assert "6.25 s (6.00 s-6.50 s), n=2, 1 failed" in md
    assert "failed run: timed out" in md
    # The two-site table has the thin-link column, the one-site table does not.
    one, two = md.split("## 1x8")[1].split("## 2x8")
    assert "thin link" not in one.split("\n\n")[1]
    assert "bytes over the thin link" in two


def test_a_figure_a_system_does_not_have_is_a_dash_not_a_failure() -> None:
    # Central HTTP has no CPU figure: none of its runs carry one, and none failed.
    http = [{"time_s": 30.0, "egress_bytes": 8 * 40 * MB, "thin_link_bytes": 0, "ok": True}] * 3
    assert cell(summarize_runs(http, 40 * MB)["cpu_s"]) == "-"
    # A system that has the figure and lost it in a failed run still counts the failure.
    meshd: list[dict[str, Any]] = [{"time_s": 6.0, "cpu_s": 5.0, "ok": True}, {"error": "timed out"}]
    assert cell(summarize_runs(meshd, 40 * MB)["cpu_s"]) == "5.00 s, n=1, 1 failed"


def test_the_table_names_the_commit_it_measured() -> None:
    doc = _distribution_doc()
    assert "at commit ?," in render_distribution(doc)  # older result files have none
    doc["env"] = doc["env"] | {"commit": "d2e686010e82"}
    assert "at commit d2e686010e82," in render_distribution(doc)


def test_discovery_heal_shows_the_shared_reconnect_interval_and_counts_timeouts() -> None:
    heal = {"formed": 1.0, "detect": 17.0}
    doc = {
        "env": ENV | {"command": "bench/bench_discovery.py"},
        "conditions": {
            "profile": "lan",
            "reconnect_interval_s": 10.0,
            "runs": 2,
            "heal_runs": 3,
            "serf": "serf x",
        },
        "formation": {"meshd": [], "serf": []},
        "heal": {
            "meshd": [{**heal, "heal": 1.5}, {**heal, "heal": 2.5}, {**heal, "heal": 2.0}],
            "serf": [{**heal, "heal": 3.0}, {**heal, "heal": None}, {**heal, "heal": 9.0}],
        },
        "mdns_leaks": 0,
    }
    md = render_discovery(doc)
    assert "reconnect interval 10 s for both" in md
    row = next(line for line in md.splitlines() if line.startswith("| **restore"))
    assert "2.00 s (1.50 s-2.50 s), n=3" in row
    assert "6.00 s (3.00 s-9.00 s), n=2, 1 failed" in row


def test_queries_headline_compares_every_answer_in_not_serfs_cli_timeout() -> None:
    def r(all_in: list[float], returned: float) -> dict[str, Any]:
        return {
            "runs": len(all_in),
            "all_in_median": sorted(all_in)[len(all_in) // 2],
            "all_in_min": min(all_in),
            "all_in_max": max(all_in),
            "returned_median": returned,
        }

    text = headline(r([0.009, 0.008, 0.010], 0.009), r([0.281, 0.2, 0.473], 6.41), 20, "lan")
    assert "3.2% of serf's time" in text  # 9 ms / 281 ms, not 9 ms / 6.41 s (0.1%)
    assert "meshd 9 ms (8 ms-10 ms) against serf 281 ms (200 ms-473 ms)" in text


def _sim(nodes: int, loss: float = 0.0) -> dict[str, Any]:
    q = {"50": 0.3, "99": 0.6, "99.9": 0.7}
    return {
        "nodes": nodes,
        "loss": loss,
        "wall_s": 1.0,
        "peak_rss_bytes": nodes * 50_000,
        "spread_s": q,
        "detect_all_s": 6.0,
        "false_dead": 0,
        "model_spread_s": {"with_half": {k: 2 * v for k, v in q.items()}, "without_half": q},
        "bytes_per_member": 300,
        "cpu_s_per_virtual_s": 0.01 * nodes,
        "summary_s": 0.5,
        "messages_to_asker": 10,
    }


def test_report_reads_every_json_and_the_simulator_runs(tmp_path: Path) -> None:
    (tmp_path / "distribution.json").write_text(json.dumps(_distribution_doc()))
    (tmp_path / "distribution.md").write_text("# Release distribution\n\n| a |\n")
    (tmp_path / "membership.md").write_text("# Membership\n\nno raw runs\n")
    (tmp_path / "simulator-100.json").write_text(json.dumps(_sim(100)))
    (tmp_path / "simulator-scale.json").write_text(json.dumps({"runs": [_sim(10_000), _sim(1000, 0.05)]}))
    (tmp_path / "README.md").write_text("old")
    md = report.render(tmp_path, plots=False)
    assert "**Distribution, 1 site, 8 clients** (40 MB, origin uplink 100mbit, meshd `lan`" in md
    assert "**Distribution, 2 sites x 8 clients, 20mbit between sites**" in md
    assert "meshd 6.25 s (6.00 s-6.50 s), n=2, 1 failed" in md
    # Every table, headings nested; the README itself is not included in itself.
    assert "## Release distribution" in md
    assert "## Membership" in md
    assert "(source: `membership.md`, no raw-runs file)" in md
    assert "old" not in md.split("## Every table")[1]
    # The simulator's runs, ordered by loss then N, with the model with and without its factor.
    sims = report.load_sim_runs(tmp_path)
    assert [(s["nodes"], s["loss"]) for s in sims] == [(100, 0.0), (10_000, 0.0), (1000, 0.05)]
    assert "| 10000 | 0.0 | 0/min | 300 ms / 600 ms / 700 ms | 600 ms / 1.20 s / 1.40 s |" in md
    assert "| 500 ms (10 / -) |" in md  # the aggregated query: time (messages to the asker / sites)


def test_the_table_and_the_headline_say_where_the_host_data_lived(tmp_path: Path) -> None:
    doc = _distribution_doc()  # an older result file: no storage recorded, the root file system
    assert "Storage: host data on the machine root file system." in render_distribution(doc)
    doc["conditions"]["storage"] = "host data on a fresh ext4 per run (loop device, direct I/O)"
    assert "Storage: host data on a fresh ext4 per run (loop device, direct I/O)." in render_distribution(doc)
    (tmp_path / "distribution.json").write_text(json.dumps(doc))
    heads = report.render(tmp_path, plots=False).split("## Headlines")[1].split("## ")[0]
    assert "meshd `lan`, host data on a fresh ext4 per run" in heads


def test_a_partial_rerun_beside_the_full_run_has_headlines_of_its_own(tmp_path: Path) -> None:
    full = _distribution_doc()
    full["env"] = {**full["env"], "commit": "aaaaaaa"}
    rerun = _distribution_doc()
    rerun["env"] = {**rerun["env"], "commit": "bbbbbbb"}
    (tmp_path / "distribution.json").write_text(json.dumps(full))
    (tmp_path / "distribution-scale.json").write_text(json.dumps(rerun))
    md = report.render(tmp_path, plots=False)
    heads = md.split("## Headlines")[1].split("## ")[0]
    # Both runs, each naming the commit it measured; neither replaces the other.
    assert heads.count("**Distribution, 1 site, 8 clients**") == 2
    assert "meshd at commit aaaaaaa" in heads
    assert "meshd at commit bbbbbbb" in heads
    assert sorted(report.load_results(tmp_path)) == ["distribution", "distribution-scale"]


def test_plots_are_written(tmp_path: Path) -> None:
    (tmp_path / "distribution.json").write_text(json.dumps(_distribution_doc()))
    (tmp_path / "simulator.json").write_text(json.dumps([_sim(100), _sim(1000)]))
    md = report.render(tmp_path)
    for png in ("distribution.png", "sim-dissemination.png", "sim-cost.png"):
        assert f"]({png})" in md
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
