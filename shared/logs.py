"""Logging set-up for a worker process: JSON or text lines, one record per line.

Takes the level and format from the settings; gives nothing back (configures the root logger).
Messages are escaped so that a CR or LF coming from a mail header cannot forge a log line.
A record logged with ``extra=traced(trace_id, ...)`` carries the email's trace id, which ingest
creates and every stage passes on (and persist stores in ``emails``/``deliveries``): the JSON
line has it as ``trace_id``, the text line ends with ``trace=<id>``, so grepping one id shows
one email's life through all four stages.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# Fields of a record, given with ``extra=``, that the formatters print.
CONTEXT_FIELDS = ("trace_id", "stage", "mailbox", "uid", "edge", "outcome", "reason")


def traced(trace_id: str | None, **fields: object) -> dict[str, object]:
    """``extra=`` for a log call about one email: its trace id and a few named fields."""
    return {"trace_id": trace_id or "", **fields}


def one_line(text: str) -> str:
    """``text`` with CR and LF escaped, so that it cannot start a forged log line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value not in (None, ""):
                entry[name] = value if isinstance(value, int | float) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        trace = getattr(record, "trace_id", None)
        if trace:
            text = f"{text} trace={trace}"
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
    for noisy in ("imapclient", "imaplib", "amqp", "kombu", "alembic", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # pika logs every failed connection attempt with a traceback; its callers report it.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
