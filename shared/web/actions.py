"""What an admin can do from the operations page, each as its CLI command does it.

Takes the settings, the engine and the page's dead-letter queues; gives :class:`Outcome`
(ok or not, and a one-line message for the page) for: testing a mailbox (``mailroute mailbox
test``), enabling it (``mailroute mailbox enable``), retrying and purging dead letters
(``mailroute dead retry|purge``).  Never raises for the failures an operator expects (a login
refused, the broker down, an id no longer there): they come back as an Outcome that is not
ok; the messages never hold a password (the mailbox errors and broker errors name the server
and its answer only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.fleet_ops import MailboxTestFailed, check_mailbox, enable_mailbox
from shared.settings import MailboxSettings, Settings
from shared.web.data import PageData, broker_problem


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str


def mailbox_test(settings: Settings, box: MailboxSettings) -> Outcome:
    try:
        return Outcome(True, check_mailbox(settings, box))
    except MailboxTestFailed as exc:
        return Outcome(False, f"test failed: {exc}")


def mailbox_enable(settings: Settings, engine: Any, box: MailboxSettings) -> Outcome:
    return Outcome(True, enable_mailbox(settings, engine, box.name))


def retry_dead_letters(data: PageData, stage: str, ids: Sequence[str]) -> Outcome:
    if not ids:
        return Outcome(False, "retry: no dead letter chosen")
    queue = data.dead_letter_queue(stage)
    try:
        moved = queue.retry(ids)
    except Exception as exc:
        return Outcome(False, f"retry: {broker_problem(exc)}")
    return _report(moved, ids, "retried", f"to {queue.target}")


def purge_dead_letters(data: PageData, stage: str, ids: Sequence[str] | None) -> Outcome:
    """Drop the chosen dead letters of ``stage`` (every one of them with None)."""
    try:
        dropped = data.dead_letter_queue(stage).purge(ids)
    except Exception as exc:
        return Outcome(False, f"purge: {broker_problem(exc)}")
    return _report(dropped, ids or (), "purged", f"from {stage}")


def _report(done: Sequence[Any], ids: Sequence[str], verb: str, where: str) -> Outcome:
    missing = sorted(set(ids) - {d.id for d in done})
    message = f"{len(done)} dead letter(s) {verb} {where}".rstrip()
    if missing:
        return Outcome(False, f"{message}; not found (already handled?): {', '.join(missing)}")
    return Outcome(bool(done), message)
