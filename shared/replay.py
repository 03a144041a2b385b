"""Replay: re-feed one stage's input from the journal, by time range and filters.

Takes a :class:`ReplayRequest` (stage, since, until, optional mailbox / message id / user), a
:class:`~shared.journal.JournalReader`, a publisher, a position store and a
:class:`Simulator`; :meth:`Replayer.run` gives a :class:`ReplayReport`.  Entries of the
journal that went to the stage's queue within the range, and match the filters, are published
again, straight to that stage queue (the default exchange: not appended to the journal a
second time), in confirmed batches; after each batch the journal offset reached is saved, so
running the same request again resumes after it.  A dry run publishes nothing and saves
nothing: it runs the stages from the replayed one up to persist in this process (parse and
route are pure functions of the document and the configuration) and says, per message, what
persist would change: a new email, new deliveries, or nothing.

Replaying creates no duplicate records because persist is idempotent (natural keys, ``ON
CONFLICT DO NOTHING``); the integration test checks it on PostgreSQL.  When retention has
dropped part of the range (the oldest entry kept is newer than ``since`` and the journal has
been truncated), the report carries that :class:`Gap`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from shared.errors import PermanentError
from shared.journal import JournalEntry, JournalReader
from shared.schemas import Codec
from shared.settings import Settings
from shared.topology import STAGE_INPUT, Topology
from shared.transport import Envelope

BATCH = 200
# Publishers' clocks differ a little: read this far past ``until`` before stopping early.
CLOCK_SKEW = timedelta(seconds=60)
REPLAY_HEADER = "x-mailroute-replay"


@dataclass(frozen=True)
class ReplayRequest:
    stage: str
    since: datetime
    until: datetime
    mailbox: str | None = None
    message_id: str | None = None
    user: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "since": self.since.isoformat(),
                "until": self.until.isoformat(), "mailbox": self.mailbox,
                "message_id": self.message_id, "user": self.user}

    def key(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Gap:
    since: datetime
    kept_from: datetime | None
    first_offset: int

    def describe(self) -> str:
        kept = self.kept_from.isoformat(timespec="seconds") if self.kept_from else "unknown"
        return (f"gap: the journal's retention has dropped entries before {kept} "
                f"(oldest offset kept: {self.first_offset}); messages from "
                f"{self.since.isoformat(timespec='seconds')} until then cannot be replayed")


@dataclass
class ReplayReport:
    key: str
    scanned: int = 0
    matched: int = 0
    published: int = 0
    resumed_from: int | None = None
    already_done: bool = False
    gap: Gap | None = None
    outcomes: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)


class Publisher(Protocol):
    def publish_envelopes(self, envelopes: Sequence[Envelope]) -> None: ...


class PositionStore(Protocol):
    def get(self, key: str) -> Any: ...

    def save(self, key: str, stage: str, request: dict[str, Any], last_offset: int | None,
             replayed: int, done: bool = False) -> None: ...


class EmailLookup(Protocol):
    def email_id_for(self, dedup_key: str) -> int | None: ...

    def deliveries_for(self, email_id: int) -> list[dict[str, Any]]: ...


@dataclass
class Simulated:
    routed: list[dict[str, Any]]
    dead_reason: str | None = None


class Simulator:
    """Runs the stages from ``stage`` to persist's input in this process, touching nothing."""

    def __init__(self, settings: Settings, emails: EmailLookup | None) -> None:
        self._settings = settings
        self._emails = emails
        self._stages: dict[str, Any] = {}

    def _stage(self, name: str) -> Any:
        if name not in self._stages:
            if name == "parse":
                from parse.worker import ParseStage

                self._stages[name] = ParseStage(self._settings.limits)
            else:
                from route.directory import Directory
                from route.worker import RouteStage

                self._stages[name] = RouteStage(Directory(self._settings))
        return self._stages[name]

    def downstream(self, stage: str, document: dict[str, Any]) -> Simulated:
        documents = [document]
        chain = ("parse", "route")
        try:
            for name in chain[chain.index(stage) if stage in chain else len(chain):]:
                documents = [out.document for doc in documents
                             for out in self._stage(name).handle(doc)]
        except PermanentError as exc:
            return Simulated([], exc.reason)
        return Simulated(documents)

    def change(self, routed: dict[str, Any]) -> str:
        """What persisting ``routed`` would change."""
        if self._emails is None:
            return "unknown (no database)"
        email_id = self._emails.email_id_for(routed["email"]["dedup_key"])
        wanted = [f"{d['principal_kind']}:{d['principal']}" for d in routed["deliveries"]]
        if email_id is None:
            return "new email for " + ", ".join(wanted)
        have = {f"{d['principal_kind']}:{d['principal']}"
                for d in self._emails.deliveries_for(email_id)}
        new = [w for w in wanted if w not in have]
        return "new deliveries " + ", ".join(new) if new else "no change"


def normalise_message_id(value: str) -> str:
    return value.strip().strip("<>").strip().lower()


class Replayer:
    def __init__(self, settings: Settings, reader: JournalReader, publisher: Publisher | None,
                 positions: PositionStore | None, simulator: Simulator,
                 codec: Codec | None = None) -> None:
        self._settings = settings
        self._reader = reader
        self._publisher = publisher
        self._positions = positions
        self._simulator = simulator
        self._codec = codec or Codec()
        self._topology = Topology(settings.broker.prefix)

    def run(self, request: ReplayRequest, dry_run: bool = False, restart: bool = False,
            progress: Callable[[int, int], None] | None = None) -> ReplayReport:
        """Replay ``request``; ``progress(done, total)`` is called in journal offset units."""
        report = ReplayReport(request.key())
        saved = None
        if self._positions is not None and not dry_run and not restart:
            saved = self._positions.get(report.key)
            if saved is not None and saved.done:
                report.already_done = True
                report.published = saved.replayed
                return report
        marker, marked_at = self._reader.mark_end()
        end = self._reader.end_offset(marker, marked_at)
        report.gap = self._gap(request)
        start: datetime | int = request.since
        if saved is not None and saved.last_offset is not None:
            resumed = saved.last_offset + 1
            start = resumed
            report.resumed_from = resumed
            report.published = saved.replayed
        batch: list[Envelope] = []
        last_offset: int | None = saved.last_offset if saved is not None else None
        first_offset: int | None = None
        for entry in self._reader.read(start, end):
            first_offset = entry.offset if first_offset is None else first_offset
            if progress is not None:
                progress(entry.offset - first_offset, max(1, end - first_offset))
            if entry.published_at is not None and entry.published_at > request.until + CLOCK_SKEW:
                break
            report.scanned += 1
            envelope = self._consider(request, entry, report, dry_run)
            if envelope is not None:
                batch.append(envelope)
            last_offset = entry.offset
            if len(batch) >= BATCH or (report.scanned % (BATCH * 10) == 0 and not dry_run):
                self._flush(request, batch, last_offset, report)
        if not dry_run:
            self._flush(request, batch, last_offset, report, done=True)
        return report

    def _gap(self, request: ReplayRequest) -> Gap | None:
        first = self._reader.first_retained()
        if first is None or first.offset == 0:
            return None  # nothing was ever dropped
        kept_from = first.published_at
        if kept_from is not None and kept_from <= request.since:
            return None
        return Gap(request.since, kept_from, first.offset)

    def _consider(self, request: ReplayRequest, entry: JournalEntry, report: ReplayReport,
                  dry_run: bool) -> Envelope | None:
        if entry.is_marker or self._topology.stage_of_queue(entry.routing_key) != request.stage:
            return None
        if entry.published_at is not None and not (
                request.since <= entry.published_at <= request.until):
            return None
        edge = STAGE_INPUT[request.stage]
        try:
            document = self._codec.decode(edge, entry.body)
        except PermanentError:
            report.outcomes["undecodable (skipped)"] += 1
            return None
        if request.mailbox and document["source"]["mailbox"] != request.mailbox:
            return None
        simulated: Simulated | None = None
        if request.message_id or request.user or dry_run:
            simulated = self._simulator.downstream(request.stage, document)
            if not self._matches(request, simulated):
                return None
        report.matched += 1
        if dry_run:
            assert simulated is not None
            self._describe(entry, document, simulated, report)
            return None
        headers = {"x-mailroute-trace": document.get("trace_id", ""),
                   REPLAY_HEADER: report.key}
        return Envelope(entry.body, "", entry.routing_key, headers)

    def _matches(self, request: ReplayRequest, simulated: Simulated) -> bool:
        routed = simulated.routed
        if request.message_id:
            wanted = normalise_message_id(request.message_id)
            routed = [r for r in routed
                      if normalise_message_id(r["email"].get("message_id") or "") == wanted]
        if request.user:
            user = request.user.lower()
            routed = [r for r in routed if any(
                user in (d["principal"].lower(), d["address"].lower())
                for d in r["deliveries"])]
        if request.message_id or request.user:
            return bool(routed)
        return True

    def _describe(self, entry: JournalEntry, document: dict[str, Any], simulated: Simulated,
                  report: ReplayReport) -> None:
        source = document["source"]
        where = f"offset {entry.offset} {source['mailbox']}/{source['uid']}"
        if simulated.dead_reason is not None:
            outcome = f"would be dead-lettered: {simulated.dead_reason}"
            report.outcomes[outcome] += 1
            report.lines.append(f"{where}: {outcome}")
            return
        for routed in simulated.routed:
            change = self._simulator.change(routed)
            report.outcomes["no change" if change == "no change" else "would change"] += 1
            mid = routed["email"].get("message_id") or routed["email"]["dedup_key"]
            report.lines.append(f"{where} <{mid}>: {change}")

    def _flush(self, request: ReplayRequest, batch: list[Envelope], last_offset: int | None,
               report: ReplayReport, done: bool = False) -> None:
        if batch:
            assert self._publisher is not None
            self._publisher.publish_envelopes(batch)
            report.published += len(batch)
            batch.clear()
        if self._positions is not None:
            self._positions.save(report.key, request.stage, request.as_dict(), last_offset,
                                 report.published, done=done)
