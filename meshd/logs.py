"""Log setup for `meshd run`: concise text lines or JSON objects on stderr; journald gets a <N>
priority prefix and no timestamp of ours.

`--log-format json` writes one object per line: time (UTC, RFC 3339, milliseconds), level,
logger, message, and the fields a log call passes with `extra=` (member, release, peer, ...), so
a log shipper can index them without parsing the message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any

import orjson

__all__ = ["LOG_FORMATS", "JsonFormatter", "fields", "make_formatter", "setup_logging"]

LOG_FORMATS = ("text", "json")

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """What the log call passed with `extra=` (member=, release=, peer=, ...)."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is the "exc" string field)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields(record).items():
            doc.setdefault(key, value)  # the four above are never overwritten by a field
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        # default=str: a field of any type still logs (an address tuple, a Path, an exception).
        return orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _rfc3339(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class _JournalFormatter(logging.Formatter):
    """A <N> prefix journald turns into the entry's priority (the text after it is kept as is)."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelno, 6)}>{self.inner.format(record)}"


def make_formatter(log_format: str, journal: bool) -> logging.Formatter:
    """The formatter for a format name ("text" or "json"), with the journald prefix or not."""
    if log_format == "json":
        inner: logging.Formatter = JsonFormatter()
    elif journal:
        inner = logging.Formatter("%(name)s: %(message)s")  # journald stamps the time itself
    else:
        inner = logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")
    return _JournalFormatter(inner) if journal else inner


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    with contextlib.suppress(OSError, ValueError):
        st = os.fstat(sys.stderr.fileno())
        dev, ino = stream.split(":")
        return int(dev) == st.st_dev and int(ino) == st.st_ino
    return False


def setup_logging(level: str, log_format: str = "text") -> None:
    """One handler on stderr in `log_format`; called again (SIGHUP), it replaces the first."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format, _stderr_is_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
