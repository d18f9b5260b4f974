"""Log setup for `meshd run`: concise lines on stderr, or journald priorities under systemd."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

__all__ = ["setup_logging"]


def setup_logging(level: str) -> None:
    """Concise lines on stderr; journald gets a <N> priority prefix and no timestamp."""
    journal = False
    stream = os.environ.get("JOURNAL_STREAM", "")
    if stream:
        with contextlib.suppress(OSError, ValueError):
            st = os.fstat(sys.stderr.fileno())
            dev, ino = stream.split(":")
            journal = int(dev) == st.st_dev and int(ino) == st.st_ino
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


class _JournalFormatter(logging.Formatter):
    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelno, 6)}>{super().format(record)}"
