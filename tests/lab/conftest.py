"""Fixtures for the network-namespace lab (scripts/lab.py). Needs root and `ip netns`.

Without them every lab test is skipped with the reason. The lab uses its own prefix (`mdt-`) so
a developer's `lab.py up` (prefix `mdl-`) is left alone, and it is torn down at the end.
"""

from __future__ import annotations

import fcntl
import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB_PREFIX = "mdt-"
LOCK_WAIT = 600.0


def _load_lab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("meshd_lab", REPO / "scripts" / "lab.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["meshd_lab"] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


labmod = _load_lab()
_AVAILABLE, _WHY_NOT = labmod.available()


def pytest_report_header(config: pytest.Config) -> str:
    return "lab: " + ("available (root, ip netns)" if _AVAILABLE else f"SKIPPED: {_WHY_NOT}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session")
def lab_module() -> ModuleType:
    """scripts/lab.py as a module: Lab, DiscoveryAgent, wait_until, sniff_in."""
    return labmod


@pytest.fixture(scope="session")
def lab() -> Iterator[Any]:
    """Two sites of three hosts, built once per session and always torn down."""
    if not _AVAILABLE:
        print(f"\nlab tests skipped: {_WHY_NOT}", file=sys.stderr)
        pytest.skip(f"lab unavailable: {_WHY_NOT}")
    # Two sessions at once would tear down each other's lab (same prefix): take turns.
    with open(f"/tmp/meshd-lab-{LAB_PREFIX.strip('-')}.lock", "w") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"the lab is held by another test session for over {LOCK_WAIT:.0f}s")
                time.sleep(1.0)
        the_lab = labmod.Lab(LAB_PREFIX)
        the_lab.up(sites=2, hosts=3)
        try:
            yield the_lab
        finally:
            the_lab.down()


@pytest.fixture
def clean_lab(lab: Any) -> Iterator[Any]:
    """The lab with no process running and every site connected, before and after the test."""
    lab.kill_all()
    for site in list(lab.cut_sites):
        lab.restore(site)
    yield lab
    lab.kill_all()
    for site in list(lab.cut_sites):
        lab.restore(site)
