"""The options every meshctl command takes, for `parents=` of each (sub)parser."""

from __future__ import annotations

import argparse
from typing import TypeVar

__all__ = ["DEFAULT_API", "api_options"]

DEFAULT_API = "http://127.0.0.1:7789"

P = TypeVar("P", bound=argparse.ArgumentParser)


def api_options(parser_class: type[P]) -> P:
    """--json, --api and --token-file; defaults are suppressed so a subcommand's value and the
    top-level one do not overwrite each other."""
    common = parser_class(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of a table"
    )
    common.add_argument(
        "--api",
        default=argparse.SUPPRESS,
        metavar="URL",
        help=f"meshd API (env MESHD_API, default {DEFAULT_API})",
    )
    common.add_argument(
        "--token-file",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="file holding the API token (or env MESHD_API_TOKEN)",
    )
    return common
