"""Logging set-up for a worker process: JSON or text lines, one record per line.

Takes the level and format from the settings; gives nothing back (configures the root logger).
Messages are escaped so that a CR or LF coming from a mail header cannot forge a log line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


def one_line(text: str) -> str:
    """``text`` with CR and LF escaped, so that it cannot start a forged log line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return one_line(text) if not record.exc_info else text


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Quiet chatty libraries; imaplib/imapclient debug output can even show a LOGIN line.
    for noisy in ("imapclient", "imaplib", "amqp", "kombu", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
