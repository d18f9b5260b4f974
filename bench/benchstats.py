"""Shared by the benchmarks: median and spread over repeated runs, and the raw-runs JSON file.

Every benchmark repeats each figure `--runs N` times (default 5) and reports the median with the
spread (min-max) next to it; the runs themselves go to a JSON file beside the .md result, which
bench/report.py reads to build bench/results/README.md. Pure: no I/O except write_json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_RUNS = 5


def summary(xs: Sequence[float | None]) -> dict[str, Any]:
    """{"n", "failed", "median", "min", "max", "values"} over runs; None marks a failed run.

    median/min/max are None when no run has a value."""
    vals = [float(x) for x in xs if x is not None]
    return {
        "n": len(vals),
        "failed": len(xs) - len(vals),
        "median": statistics.median(vals) if vals else None,
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
        "values": [None if x is None else float(x) for x in xs],
    }


def secs(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.1f} s" if x >= 10 else f"{x:.2f} s"


def cell(s: dict[str, Any], fmt: Callable[[float], str] = secs) -> str:
    """'median (min-max), n=K' for a summary(); failed runs are counted, never hidden."""
    if s["median"] is None:
        return f"- (all {s['failed']} runs failed)" if s["failed"] else "-"
    text = fmt(s["median"])
    if s["n"] > 1:
        text += f" ({fmt(s['min'])}-{fmt(s['max'])}), n={s['n']}"
    else:
        text += ", n=1"
    if s["failed"]:
        text += f", {s['failed']} failed"
    return text


_NOT_RESULTS = ("--", ".", ":!bench/results")  # the files a run writes are not the code it measured


def source_commit() -> str:
    """The commit of the tree measured ("+dirty" with changes not committed; "" outside git)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", *_NOT_RESULTS],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """Where and when: goes into every raw JSON file and every result header."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = -1.0
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_1m_at_start": round(load, 2),
        "commit": source_commit(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if sys.argv else "",
    }


def json_path(md: Path) -> Path:
    """The raw-runs file beside a result file: distribution.md -> distribution.json."""
    return md.with_suffix(".json")


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
