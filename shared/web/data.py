"""What the operations page shows, read from the database, the broker and the workers' metrics.

Takes the settings, a migrated engine and a :class:`~shared.web.metrics_window.MetricsWindow`;
gives :class:`PageData`, read-only: the overview (stage flow, queue backlog and dead letters,
latency, emails stored), the mailbox fleet (:func:`shared.fleet_ops.fleet_rows`, as
``mailroute mailbox list``), the dead letters per stage (:class:`shared.dead_letters.
DeadLetterQueue`, as ``mailroute dead list``) with the original message's headers, and the
emails with their deliveries (:class:`persist.store.EmailStore`, as ``mailroute emails``).
Nothing here writes.  A broker that cannot be reached does not fail a page: the part that
needs it says so (the ``error`` of :class:`Backlog` and :class:`DeadLetters`); a database
that cannot be reached raises ``TransientError`` (the page shows the error page).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from persist.store import EmailStore
from shared.dead_letters import DeadLetter, DeadLetterQueue
from shared.fleet_ops import CANARY_FAILING, CanaryRow, FleetRow, canary_rows, fleet_rows
from shared.queue_metrics import PassiveDeclareReader
from shared.settings import Settings
from shared.topology import STAGES, Topology
from shared.web.metrics_window import MetricsWindow, Overview

log = logging.getLogger(__name__)

DEAD_LETTERS_SHOWN = 200  # per stage
HEADER_NAMES = ("From", "To", "Subject", "Message-ID")
FAILING = ("failing", "disabled")


@dataclass
class QueueRow:
    stage: str
    name: str
    ready: int | None
    dead: int | None
    consumers: int | None


@dataclass
class Backlog:
    rows: list[QueueRow]
    error: str | None = None


@dataclass
class StageLetters:
    stage: str
    letters: list[DeadLetter] = field(default_factory=list)
    error: str | None = None


def broker_problem(exc: Exception) -> str:
    """A one-line description of a broker failure (no URL, so no password)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"broker not reachable ({type(exc).__name__}{': ' + text[:200] if text else ''})"


class PageData:
    """Read-only queries behind each page; one instance per app, safe across threads."""

    def __init__(self, settings: Settings, engine: Any, metrics: MetricsWindow) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.store = EmailStore(engine)
        self.topology = Topology(settings.broker.prefix)
        self._rabbit = not settings.broker.url.startswith("memory://")
        self._depths = PassiveDeclareReader(settings.broker.url) if self._rabbit else None
        self._depth_lock = threading.Lock()

    # -- overview ---------------------------------------------------------------------------
    def overview(self) -> tuple[Overview, Backlog, dict[str, int]]:
        flow = self.metrics.read()
        now = datetime.now(UTC)
        stored = {"total": self.store.count_emails(),
                  "last_minute": self.store.count_emails(now - timedelta(minutes=1)),
                  "last_hour": self.store.count_emails(now - timedelta(hours=1))}
        return flow, self.backlog(), stored

    def backlog(self) -> Backlog:
        rows = [QueueRow(stage, self.topology.input_queue(stage), None, None, None)
                for stage in STAGES]
        if self._depths is None:
            return Backlog(rows, "the in-process broker (memory://) has no queues to read")
        names = [n for s in STAGES for n in (self.topology.input_queue(s),
                                               self.topology.dead_queue(s))]
        try:
            with self._depth_lock:  # one pika connection: not to be shared by threads at once
                depths = self._depths(names)
        except Exception as exc:
            return Backlog(rows, broker_problem(exc))
        for row in rows:
            ready = depths.get(row.name)
            dead = depths.get(self.topology.dead_queue(row.stage))
            row.ready = ready[0] if ready else None
            row.consumers = ready[1] if ready else None
            row.dead = dead[0] if dead else None
        return Backlog(rows)

    def close(self) -> None:
        if self._depths is not None:
            self._depths.close()

    # -- mailboxes --------------------------------------------------------------------------
    def mailboxes(self, failing_only: bool = False) -> list[FleetRow]:
        rows = fleet_rows(self.settings, self.engine)
        return [r for r in rows if r.status in FAILING] if failing_only else rows

    def canaries(self, failing_only: bool = False) -> list[CanaryRow]:
        """Forwarding users' canaries (none shown while canaries are off and never sent)."""
        rows = canary_rows(self.settings, self.engine)
        if not self.settings.canaries.enabled and all(r.state == "never" for r in rows):
            return []
        return [r for r in rows if r.state in CANARY_FAILING] if failing_only else rows

    # -- dead letters -----------------------------------------------------------------------
    def dead_letter_queue(self, stage: str) -> DeadLetterQueue:
        return DeadLetterQueue(self.settings.broker.url, self.topology, stage)

    def dead_letters(self) -> list[StageLetters]:
        if not self._rabbit:
            return [StageLetters(stage, error="the in-process broker (memory://) keeps no "
                                 "dead letters between runs") for stage in STAGES]
        found = []
        for stage in STAGES:
            try:
                letters = self.dead_letter_queue(stage).browse(DEAD_LETTERS_SHOWN)
            except Exception as exc:
                found.append(StageLetters(stage, error=broker_problem(exc)))
                continue
            found.append(StageLetters(stage, letters))
        return found

    # -- emails -----------------------------------------------------------------------------
    def emails(self, query: str, limit: int = 100) -> list[dict[str, Any]]:
        return self.store.search_emails(query, limit) if query.strip() \
            else self.store.list_emails(limit)

    def email(self, email_id: int) -> dict[str, Any] | None:
        email = self.store.email(email_id)
        if email is None:
            return None
        return {"email": email,
                "deliveries": self.store.deliveries_for(email_id),
                "queue_items": self.store.queue_items_for(email_id),
                "cases": self.store.cases_for(email_id),
                "parties": self.store.resolved_parties_for(email_id),
                "attachments": self.store.attachments_for(email_id)}


def original_headers(letter: DeadLetter) -> dict[str, str]:
    """From, To, Subject and Message-ID of the message a dead letter carries: from the raw
    mail (parse's input) or from the parsed email (route's and persist's)."""
    document = letter.document()
    if not isinstance(document, dict):
        return {}
    email = document.get("email")
    if isinstance(email, dict):
        def addresses(key: str) -> str:
            values = email.get(key) or []
            return ", ".join(str(v.get("address", "")) for v in values if isinstance(v, dict))

        message_id = email.get("message_id")
        return {"From": addresses("from"), "To": addresses("to"),
                "Subject": str(email.get("subject") or ""),
                "Message-ID": f"<{message_id}>" if message_id else ""}
    raw = document.get("raw")
    if isinstance(raw, str):
        return _raw_headers(raw)
    return {}


def _raw_headers(encoded: str) -> dict[str, str]:
    import base64
    import binascii

    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return {}
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0][:64 * 1024]
    message = BytesHeaderParser(policy=compat32).parsebytes(head)
    shown = {}
    for name in HEADER_NAMES:
        value = message.get(name)
        if value is None:
            continue
        try:
            shown[name] = str(make_header(decode_header(str(value))))
        except Exception:  # hostile or broken encoded words: show them as they are
            shown[name] = str(value)
    return shown


def evidence_lines(evidence: Any) -> list[tuple[str, str]]:
    """A delivery's evidence as (key, value) pairs for display."""
    if not isinstance(evidence, dict):
        return [("", json.dumps(evidence, default=str))]
    return [(str(key), value if isinstance(value, str) else json.dumps(value, default=str,
                                                                         sort_keys=True))
            for key, value in sorted(evidence.items())]
