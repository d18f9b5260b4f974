"""What meshctl prints: JSON documents and aligned text tables (shared by its command modules)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["print_json", "table"]


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=False))


def table(rows: list[list[str]], headers: list[str]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
