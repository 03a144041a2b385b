"""The mailbox fleet as operators see it and act on it: ``mailroute mailbox`` and the web page.

Takes the settings and a migrated database engine; gives :func:`fleet_rows` (one
:class:`FleetRow` per configured mailbox: status, failure streak, last success and error, who
polls it, when it is due, messages fetched), :func:`canary_rows` (one :class:`CanaryRow` per
user or queue whose mail comes through a forward mailbox: its canaries' state),
:func:`check_mailbox` (connect, log in and look at
the folder, fetching and changing nothing; gives a one-line report) and
:func:`enable_mailbox` (poll a disabled mailbox again at once).  Fails with
:class:`MailboxTestFailed` (its message names the mailbox and the server's answer, never a
password) when a test cannot connect or log in, ``ConfigError`` for a mailbox that is not
configured, and ``TransientError`` when the database is unreachable.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.settings import MailboxSettings, Settings


class MailboxTestFailed(Exception):
    """A mailbox test could not connect, log in or open the folder."""


@dataclass(frozen=True)
class FleetRow:
    name: str
    kind: str
    status: str  # not-run | success | failing | disabled
    failures: int
    last_success_at: datetime | None
    last_poll_at: datetime | None
    owner: str  # the ingest process holding its lease, "-" when none
    due_in: float | None  # seconds until the next poll (<= 0: due now); None: no schedule yet
    error: str  # why it is disabled, or its last error while failing; "" otherwise
    fetched: int


@dataclass(frozen=True)
class CanaryRow:
    principal_kind: str  # user | queue
    principal: str
    forward_mailbox: str
    state: str  # ok | missing | failed | waiting | never (no canary sent yet)
    last_sent_at: datetime | None
    last_seen_at: datetime | None
    roundtrip: float | None  # seconds from sending to persist seeing the last one seen
    detail: str  # why missing or failed, "" otherwise


CANARY_FAILING = ("missing", "failed")


def canary_rows(settings: Settings, engine: Any) -> list[CanaryRow]:
    """Each forwarding user's and queue's canaries (``mailroute canary status``, the page)."""
    from ingest.canary import canary_targets
    from persist.canaries import CanaryStore

    targets = canary_targets(settings)
    states = CanaryStore(engine).states([t.key for t in targets])
    rows = []
    for target in targets:
        found = states[target.key]
        seen = found.last_seen
        state = "never" if found.latest is None else found.state
        rows.append(CanaryRow(
            principal_kind=target.principal_kind, principal=target.principal,
            forward_mailbox=target.forward_mailbox, state=state,
            last_sent_at=found.latest.sent_at if found.latest else None,
            last_seen_at=seen.seen_at if seen else None,
            roundtrip=seen.roundtrip if seen else None,
            detail=_canary_detail(state, found.verdict.detail if found.verdict else None,
                                  settings.canaries.deadline)))
    return rows


def _canary_detail(state: str, detail: str | None, deadline: float) -> str:
    if state == "missing":
        return f"not seen within {deadline:.0f} s: check the forwarding rule"
    if state == "failed":
        return f"not sent: {detail or 'unknown error'}"[:160]
    if state == "waiting":
        return "first canary on its way"
    if state == "never":
        return "no canary sent yet"
    return ""


def fleet_rows(settings: Settings, engine: Any) -> list[FleetRow]:
    """Every configured mailbox with its state and lease, in configuration order."""
    from persist.mailbox_leases import LeaseStore
    from persist.mailbox_state import MailboxStateStore

    states = {(s.mailbox, s.folder): s for s in MailboxStateStore(engine).all_states()}
    leases = {lease.mailbox: lease for lease in LeaseStore(engine).all()}
    now = datetime.now(UTC)
    rows = []
    for box in settings.mailboxes:
        state = states.get((box.name, box.folder))
        lease = leases.get(box.name)
        status = state.status if state else "not-run"
        if lease is not None and lease.disabled_reason:
            status = "disabled"
        owner = "-"
        due_in = None
        if lease is not None:
            if lease.owner and lease.lease_until and lease.lease_until >= now:
                owner = lease.owner + (" (idle)" if box.push else "")
            due_in = (lease.due_at - now).total_seconds()
        error = (lease.disabled_reason if lease is not None and lease.disabled_reason
                 else (state.last_error if state and status == "failing" else "")) or ""
        rows.append(FleetRow(
            name=box.name, kind=box.kind, status=status,
            failures=state.consecutive_failures if state else 0,
            last_success_at=state.last_success_at if state else None,
            last_poll_at=state.last_poll_at if state else None,
            owner=owner, due_in=due_in, error=error,
            fetched=state.messages_fetched if state else 0))
    return rows


def check_mailbox(settings: Settings, box: MailboxSettings) -> str:
    """Connect to ``box``, log in and look at its folder; the one-line report of success."""
    from ingest.errors import MailboxError
    from ingest.imap_source import ImapSource
    from ingest.maildir_source import MaildirSource
    from ingest.pop3_source import Pop3Source

    try:
        if box.kind == "maildir":
            with MaildirSource(box) as maildir:
                count = sum(len(b.messages) for b in maildir.batches())
            return f"ok: {box.name}: Maildir {box.path}: {count} new message(s)"
        profile = settings.server(box.server or "")
        where = f"{profile.host}:{profile.port} ({profile.tls}" + \
            (", certificate NOT verified)" if not profile.verify_tls else ")")
        source = ImapSource(box, profile) if box.kind == "imap" else \
            Pop3Source(box, profile, set())
        with source:
            summary = source.summary()
    except MailboxError as exc:
        raise MailboxTestFailed(f"{box.name}: {exc}") from None
    auth = profile.auth if not profile.master_user else f"master user ({profile.master_mode})"
    return (f"ok: {box.name}: connected to {where}, logged in as {box.username!r} "
            f"with {auth}, {summary}")


def enable_mailbox(settings: Settings, engine: Any, name: str) -> str:
    """Poll mailbox ``name`` again at once (after a disable); the one-line report."""
    from persist.mailbox_leases import LeaseStore
    from persist.mailbox_state import MailboxStateStore

    box = settings.mailbox(name)
    leases = LeaseStore(engine)
    leases.ensure([box.name])
    lease = leases.get(box.name)
    was = lease.disabled_reason if lease else None
    leases.enable(box.name)
    MailboxStateStore(engine).mark_enabled(box.name)
    if was:
        return f"{box.name}: enabled (was disabled: {was}); due now"
    return f"{box.name}: was not disabled; due now"
