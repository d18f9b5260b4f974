"""scripts/lab.py loaded as a module (it is a script, not a package), once per process."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def load_lab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("meshd_lab", REPO / "scripts" / "lab.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["meshd_lab"] = module
    spec.loader.exec_module(module)
    return module
