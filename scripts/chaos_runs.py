#!/usr/bin/env python3
"""Run the lab chaos test (tests/lab/test_lab_chaos.py) N times in a row, a new seed each time.

    chaos_runs.py [--runs 20] [--seed S]

Stops at the first failure and prints its seed (replay it with MESHD_CHAOS_SEED=S); prints
each run's seed and duration, and the total. Needs root (the lab), like the test itself.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = "tests/lab/test_lab_chaos.py"
SUMMARY_LINES = ("converged:", "link:", "peak RSS:")  # the test's summary lines shown per run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chaos_runs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="seed of the first run (default: random)")
    args = parser.parse_args(argv)
    seeds = random.Random(args.seed)
    first = args.seed
    t_all = time.monotonic()
    for i in range(1, args.runs + 1):
        seed = first if (i == 1 and first is not None) else seeds.randrange(1, 1_000_000)
        env = {**os.environ, "MESHD_CHAOS_SEED": str(seed), "PYTHONPATH": str(REPO)}
        t = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", TEST, "-q", "-x", "-s", "-p", "no:cacheprovider"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        took = time.monotonic() - t
        # pytest exits 0 when the lab test is skipped too: a skip is not a pass.
        skipped = "skipped" in proc.stdout.splitlines()[-1] if proc.stdout.strip() else False
        ok = proc.returncode == 0 and not skipped
        figures = [ln.strip() for ln in proc.stdout.splitlines() if ln.startswith(SUMMARY_LINES)]
        verdict = "ok" if ok else "FAILED"
        line = f"run {i}/{args.runs}: seed {seed}: {verdict} in {took:.0f}s"
        print("; ".join([line, *figures]), flush=True)
        if not ok:
            sys.stdout.write(proc.stdout[-6000:])
            sys.stderr.write(proc.stderr[-2000:])
            print(f"stopped at run {i} (seed {seed}; replay: MESHD_CHAOS_SEED={seed})")
            return 1
    print(f"{args.runs} runs passed in {time.monotonic() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
