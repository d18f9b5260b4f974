"""The atheris (libFuzzer) driver shared by the entry points tests/fuzz/fuzz_<target>.py.

    python tests/fuzz/fuzz_wire.py [libFuzzer flags] [corpus dirs]

e.g. `python tests/fuzz/fuzz_wire.py -max_total_time=60 /tmp/new tests/fuzz/corpus/wire`.
`make fuzz` runs every target for a bounded time and merges what is new into the corpus. One
script per target because libFuzzer re-runs its own command line for -merge=1.
A crash (an input the target does not survive, see targets.py) is written where
-artifact_prefix says; keep its minimal form in tests/fuzz/crashes/<target>/ and write it down.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]


def run(name: str) -> None:
    if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
        sys.path.insert(0, str(ROOT))
    # Only meshd is instrumented: coverage of aiohttp/msgspec internals would drown its signal.
    with atheris.instrument_imports(include=["meshd"]):
        from tests.fuzz.targets import TARGETS
    # libFuzzer's -merge=1 re-runs argv[0] through `sh -c`: name the interpreter too, or the
    # child would run the script with whatever python its shebang finds (or not at all).
    argv0 = f"{shlex.quote(sys.executable)} {shlex.quote(sys.argv[0])}"
    atheris.Setup([argv0, *sys.argv[1:]], TARGETS[name]())
    atheris.Fuzz()
