"""Fail when ruff does not lint every tracked .py file.

ruff skips folders named like build output (dist, build, ...) without a word; this gate
compares `ruff check --show-files` with `git ls-files '*.py'` so no file escapes the linter.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    ruff = Path(sys.executable).with_name("ruff")
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=root, check=True, capture_output=True, text=True
    ).stdout.split()
    shown = subprocess.run(
        [str(ruff), "check", "--no-cache", "--show-files", "."],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    linted = {str(Path(line).resolve().relative_to(root)) for line in shown if line.endswith(".py")}
    missing = sorted(set(tracked) - linted)
    if missing:
        print(f"ruff does not lint {len(missing)} tracked file(s):", *missing, sep="\n  ")
        return 1
    print(f"ruff lints all {len(tracked)} tracked .py files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
