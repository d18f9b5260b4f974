#!/usr/bin/env python3
"""One report: bench/results/README.md from the raw-runs JSON files and result tables in bench/results.

    python bench/report.py [--results bench/results] [--out bench/results/README.md] [--no-plots]

Reads, never measures. Each benchmark writes <name>.md and its raw runs <name>.json (with a
"bench" key); the simulator's `python -m meshd.sim ... --json` objects go in simulator*.json
(one object, a list of them, or {"runs": [...]}). The README gets: the headlines with the
exact conditions next to each figure, the plots (PNG, matplotlib: the `bench` extra,
`pip install -e '.[bench]'`; without it the README says the plots were skipped), then every
result table as its benchmark wrote it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.benchstats import cell, secs, summary  # noqa: E402

RESULTS = REPO / "bench" / "results"
SYSTEM_ORDER = ("meshd", "torrent", "http")
SYSTEM_LABELS = {"meshd": "meshd", "torrent": "BitTorrent (aria2c)", "http": "central HTTP"}
SYSTEM_COLORS = {"meshd": "tab:blue", "torrent": "tab:orange", "http": "tab:green"}
SIM_QUANTILES = ("50", "99", "99.9")


# --- loading -----------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    """The parsed file, or None (said on stderr) when it cannot be read: one bad file skips itself."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"report: skipping {path.name}: {e}", file=sys.stderr)
        return None


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    """file stem -> raw document, for every *.json with a "bench" key (the sim's are apart). A
    partial rerun of a benchmark (distribution-scale.json) sits beside its full run."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(results.glob("*.json")):
        doc = _read_json(path)
        if isinstance(doc, dict) and isinstance(doc.get("bench"), str):
            docs[path.stem] = doc
    return docs


def load_sim_runs(results: Path) -> list[dict[str, Any]]:
    """Every simulator JSON object in simulator*.json, sorted by (loss, churn, nodes).

    The hook for issue 11's simulator: each object is what `python -m meshd.sim ... --json`
    prints (nodes, wall_s, peak_rss_bytes, spread_s, detect_all_s, false_dead, model_spread_s,
    bytes_per_member, cpu_s_per_virtual_s, summary_s, messages_to_asker; loss/churn when given)."""
    runs: list[dict[str, Any]] = []
    for path in sorted(results.glob("simulator*.json")):
        doc = _read_json(path)
        items = doc.get("runs", []) if isinstance(doc, dict) and "runs" in doc else doc
        for item in items if isinstance(items, list) else [items]:
            if isinstance(item, dict) and "nodes" in item:
                runs.append(item)
    return sorted(runs, key=lambda r: (float(r.get("loss", 0)), churn_of(r), int(r["nodes"])))


def churn_of(run: dict[str, Any]) -> float:
    """Fraction of nodes restarting per minute (the sim writes churn_per_min)."""
    return float(run.get("churn_per_min", run.get("churn", 0)) or 0)


# --- headlines ---------------------------------------------------------------------------------


def distribution_headlines(doc: dict[str, Any]) -> list[str]:
    c = doc["conditions"]
    out = []
    for cfg in doc["configs"]:
        sm = cfg["summary"]
        where = (
            f"1 site, {cfg['clients']} clients"
            if cfg["sites"] == 1
            else f"{cfg['sites']} sites x {cfg['clients_per_site']} clients, {c['site_rate']} between sites"
        )
        figures = "; ".join(
            f"{SYSTEM_LABELS[s]} {cell(sm[s]['time_s'])} (origin egress {cell(sm[s]['egress_x'], _x)})"
            for s in SYSTEM_ORDER
            if s in sm
        )
        out.append(
            f"- **Distribution, {where}** ({c['size_bytes'] / 1e6:.0f} MB, origin uplink {c['origin_rate']}, "
            f"meshd `{c['meshd_profile']}`, {c.get('storage', 'host data on the machine root file system')}, "
            "time until the last client has it, meshd at commit "
            f"{doc['env'].get('commit') or '?'}): {figures}."
        )
    return out


def discovery_headlines(doc: dict[str, Any]) -> list[str]:
    c = doc["conditions"]
    out = []
    form = doc.get("formation", {})
    if form:
        cells = {n: cell(summary([r["complete"] for r in form.get(n, [])])) for n in ("meshd", "serf")}
        out.append(
            f"- **3-host site formation by mDNS** (lab, `{c['profile']}` for both, from the first process "
            f"start): meshd {cells['meshd']}, serf {cells['serf']}."
        )
    heal = doc.get("heal", {})
    if heal:
        cells = {n: cell(summary([r["heal"] for r in heal.get(n, [])])) for n in ("meshd", "serf")}
        out.append(
            f"- **Heal after a site cut** (2 sites x 3, `{c['profile']}`, reconnect interval "
            f"{c['reconnect_interval_s']:g} s for both, from the link's restore until all six list all six "
            f"alive): meshd {cells['meshd']}, serf {cells['serf']}."
        )
    return out


def queries_headlines(doc: dict[str, Any]) -> list[str]:
    c, r = doc["conditions"], doc["results"]
    if "meshd" not in r or "serf" not in r:
        return []

    def figure(x: dict[str, Any]) -> str:
        vals = [s["all_in_s"] for s in x.get("samples", [])]
        return cell(summary(vals)) if vals else secs(x["all_in_median"])

    return [
        f"- **Health query, every answer in** ({c['nodes']} nodes each on 127.0.0.1, `{c['profile']}`, "
        f"from sending the query to the last node's answer at the asker): meshd {figure(r['meshd'])}, "
        f"serf {figure(r['serf'])} (serf's CLI return, which waits its timeout, is not compared)."
    ]


def registry_headlines(doc: dict[str, Any]) -> list[str]:
    """Issue 13's figure: N hosts pull an image direct, through the site cache, from a release."""
    c, sm = doc["conditions"], doc.get("summary", {})
    names = {"direct": "direct", "pull": "pull-through", "release": "release"}

    def ratio(way: str) -> str:
        alone = sm.get("alone", {}).get("time_s", {}).get("median")
        last = sm[way]["time_s"]["median"]
        return f", {last / alone:.2f}x one host alone" if alone and last is not None else ""

    def egress(way: str) -> str:
        e = sm[way]["egress_x"]
        return f"{_x(e['median'])} ({_x(e['min'])}-{_x(e['max'])})" if e["median"] is not None else "-"

    figures = "; ".join(
        f"{label} {cell(sm[w]['time_s'])}, egress {egress(w)}{ratio(w)}"
        for w, label in names.items()
        if w in sm
    )
    alone = f"; one host alone {cell(sm['alone']['time_s'])}" if "alone" in sm else ""
    return [
        f"- **{c['hosts']} hosts behind {c['rate']} pull a {c['image_bytes'] / 1e6:.0f} MB image** "
        f"({c['layers']} layers, containerd `ctr image pull`, until the last host has it; upstream "
        f"egress as a multiple of the image): {figures}{alone}. Goal: egress ~1x, last host <= 1.5x "
        "one host alone."
    ]


HEADLINES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "distribution": distribution_headlines,
    "discovery": discovery_headlines,
    "queries": queries_headlines,
    "registry": registry_headlines,
}


def sim_table(sims: list[dict[str, Any]]) -> list[str]:
    """The simulator's figures against the model (with and without its 0.5 factor), one row per run."""
    if not sims:
        return []
    lines = [
        "| nodes | loss | churn | spread 50/99/99.9% | model with 0.5 factor | model without | "
        "kill seen by all | false deaths | site summary in (msgs to asker / sites) | bytes per member | "
        "B per node per s | CPU s per virtual s | peak RSS | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def q(d: dict[str, Any] | None) -> str:
        d = d or {}
        return " / ".join(secs(float(d[k])) if d.get(k) is not None else "-" for k in SIM_QUANTILES)

    for r in sims:
        model = r.get("model_spread_s") or {}
        lines.append(
            f"| {r['nodes']} | {r.get('loss', 0)} | {churn_of(r):g}/min | {q(r.get('spread_s'))} | "
            f"{q(model.get('with_half'))} | {q(model.get('without_half'))} | "
            f"{_opt(r.get('detect_all_s'), secs)} | {r.get('false_dead', '-')} | {_summary_cell(r)} | "
            f"{_opt(r.get('bytes_per_member'), lambda x: f'{x:.0f}')} | "
            f"{_opt(r.get('bytes_per_node_s'), lambda x: f'{x:.0f}')} | "
            f"{_opt(r.get('cpu_s_per_virtual_s'), lambda x: f'{x:.3f}')} | "
            f"{_opt(r.get('peak_rss_bytes'), lambda x: f'{x / 2**20:.0f} MiB')} | "
            f"{_opt(r.get('wall_s'), secs)} |"
        )
    return lines


def _summary_cell(r: dict[str, Any]) -> str:
    """The aggregated health query after the run: time, messages into the asker, sites in."""
    if r.get("summary_s") is None:
        return "-"
    late = ", timed out" if r.get("summary_timed_out") else ""
    if r.get("summary_missing_but_up"):
        late += f", {r['summary_missing_but_up']} live nodes shown missing"
    msgs, sites = r.get("messages_to_asker", "-"), r.get("summary_sites", "-")
    return f"{secs(float(r['summary_s']))} ({msgs} / {sites}{late})"


def _opt(x: Any, fmt: Callable[[float], str]) -> str:
    return "-" if x is None else fmt(float(x))


def _x(x: float) -> str:
    return f"{x:.2f}x"


# --- plots -------------------------------------------------------------------------------------


def distribution_series(doc: dict[str, Any]) -> dict[tuple[str, int], list[tuple[int, dict[str, Any]]]]:
    """(system, sites) -> [(clients, time summary)], sorted by clients: one line per system and layout."""
    series: dict[tuple[str, int], list[tuple[int, dict[str, Any]]]] = {}
    for cfg in doc["configs"]:
        for s, sm in cfg["summary"].items():
            series.setdefault((s, cfg["sites"]), []).append((cfg["clients"], sm))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in series.items()}


def plot_distribution(doc: dict[str, Any], path: Path) -> None:
    """Time until the last host has it, and origin egress, per host count: median, min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (system, sites), points in sorted(distribution_series(doc).items()):
        label = SYSTEM_LABELS.get(system, system) + ("" if sites == 1 else f", {sites} sites (thin link)")
        style = "-o" if sites == 1 else "--s"
        for ax, key in ((ax_t, "time_s"), (ax_e, "egress_x")):
            pts = [(n, sm[key]) for n, sm in points if sm[key]["median"] is not None]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            med = [s["median"] for _, s in pts]
            lo = [s["median"] - s["min"] for _, s in pts]
            hi = [s["max"] - s["median"] for _, s in pts]
            ax.errorbar(
                xs, med, yerr=[lo, hi], fmt=style, capsize=3, label=label, color=SYSTEM_COLORS.get(system)
            )
    c = doc["conditions"]
    ax_t.set(xlabel="client hosts", ylabel="seconds until the last host has it (median, min-max)")
    ax_e.set(xlabel="client hosts", ylabel="origin egress (x release size)")
    for ax in (ax_t, ax_e):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_t.legend(fontsize=7)
    fig.suptitle(
        f"{c['size_bytes'] / 1e6:.0f} MB release, origin uplink {c['origin_rate']}, "
        f"{c['runs']} runs per point",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sim_dissemination(sims: list[dict[str, Any]], path: Path) -> None:
    """Hook for the simulator: time to reach 50/99/99.9% against N, with the model's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SIM_QUANTILES), figsize=(12, 4), sharey=True)
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for r in sims:
        groups.setdefault((r.get("loss", 0), churn_of(r)), []).append(r)
    for ax, qk in zip(axes, SIM_QUANTILES, strict=True):
        model_done = False
        for (loss, churn), runs in sorted(groups.items()):
            pts = [(r["nodes"], r["spread_s"].get(qk)) for r in runs if r.get("spread_s")]
            pts = [(n, v) for n, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "-o", label=f"meshd sim, loss {loss}, churn {churn}")
            if not model_done:
                for variant, style in (("with_half", ":"), ("without_half", "--")):
                    mp = [
                        (r["nodes"], (r.get("model_spread_s") or {}).get(variant, {}).get(qk)) for r in runs
                    ]
                    mp = [(n, v) for n, v in mp if v is not None]
                    if mp:
                        ax.plot(*zip(*mp, strict=True), style, color="gray", label=f"model, {variant}")
                model_done = True
        ax.set(xscale="log", xlabel="nodes", title=f"{qk}% of nodes have it")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("virtual seconds")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sim_cost(sims: list[dict[str, Any]], path: Path) -> None:
    """Hook for the simulator: cost per node against N (it must stay flat or grow like log N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (key, title, divide by N): the sim reports whole-process CPU, so that one is split.
    metrics = (
        ("bytes_per_member", "memory: bytes per node-member pair", False),
        ("cpu_s_per_virtual_s", "CPU ms per virtual s, per node", True),
        ("bytes_per_node_s", "network: bytes per node per s", False),
    )
    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 4))
    groups: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for r in sims:
        groups.setdefault((float(r.get("loss", 0)), churn_of(r)), []).append(r)
    for ax, (key, label, per_node) in zip(axes, metrics, strict=True):
        for (loss, churn), runs in sorted(groups.items()):
            pts = []
            for r in runs:
                v = r.get(key)
                if v is None:
                    continue
                n = int(r["nodes"])
                pts.append((n, float(v) * 1000 / n if per_node else float(v)))
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), "-o", label=f"loss {loss:g}, churn {churn:g}/min")
        ax.set(xscale="log", xlabel="nodes", title=label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(docs: dict[str, dict[str, Any]], sims: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Write the PNGs; the Markdown lines that show them (or say why not)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [
            "Plots skipped: matplotlib is not installed (`pip install -e '.[bench]'`, or `make bench`).",
            "",
        ]
    lines: list[str] = []
    jobs: list[tuple[str, str, Callable[[Path], None]]] = []
    if "distribution" in docs and docs["distribution"].get("configs"):
        d = docs["distribution"]
        jobs.append(("distribution.png", "Distribution time and origin egress per host count",
                     lambda p: plot_distribution(d, p)))  # fmt: skip
    if sims:
        jobs.append(("sim-dissemination.png", "Simulator: dissemination against the model",
                     lambda p: plot_sim_dissemination(sims, p)))  # fmt: skip
        jobs.append(("sim-cost.png", "Simulator: cost per node against N", lambda p: plot_sim_cost(sims, p)))
    for name, title, fn in jobs:
        fn(out_dir / name)
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return lines


# --- the README --------------------------------------------------------------------------------


def demote(md: str) -> str:
    """A result file's headings one level down, to nest under the README's sections."""
    return "\n".join("#" + line if line.startswith("#") else line for line in md.splitlines())


def render(results: Path, plots: bool = True) -> str:
    docs = load_results(results)
    sims = load_sim_runs(results)
    lines = [
        "# Benchmark results",
        "",
        "Written by `bench/report.py` (`make bench` runs every benchmark, then it) from the files in "
        "this folder: each benchmark's table (<name>.md) and raw runs (<name>.json). Figures are "
        "median (min-max) over the runs, n = runs that finished; a failed run is counted, never "
        "replaced by a timeout value. Every lab host is a network namespace of one machine, so CPU "
        "is shared; each table gives its machine, date and command.",
        "",
        "## Headlines",
        "",
    ]
    heads = [
        h
        for name, fn in HEADLINES.items()
        for _, doc in sorted(docs.items())
        if doc["bench"] == name
        for h in fn(doc)
    ]
    lines += heads or ["(no raw-runs JSON yet: run the benchmarks)"]
    lines.append("")
    if plots:
        lines += ["## Plots", "", *make_plots(docs, sims, results)]
    lines += ["## Simulator against the model", ""]
    if sims:
        lines += [
            "From simulator*.json (`python -m meshd.sim ... --json`). The model is Serf's epidemic "
            "model; 'with 0.5 factor' is the curve the simulator used to print.",
            "",
            *sim_table(sims),
            "",
        ]
    else:
        lines += ["No simulator JSON yet (simulator*.json from `python -m meshd.sim ... --json`).", ""]
    lines += ["## Every table", ""]
    for md in sorted(results.glob("*.md")):
        if md.name == "README.md":
            continue
        raw = md.with_suffix(".json")
        source = f"`{md.name}`" + (f", raw runs `{raw.name}`" if raw.exists() else ", no raw-runs file")
        lines += [f"<!-- {md.name} -->", demote(md.read_text().strip()), "", f"(source: {source})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=None, help="default: <results>/README.md")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    out = args.out or args.results / "README.md"
    out.write_text(render(args.results, plots=not args.no_plots))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
