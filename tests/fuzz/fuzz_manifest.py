"""atheris entry point for the manifest target (tests/fuzz/targets.py); usage: tests/fuzz/harness.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fuzz.harness import run

if __name__ == "__main__":
    run("manifest")
