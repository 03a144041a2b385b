"""What route may know about earlier mail: a small read-only lookup, and an in-memory one.

Routing stays a function of its inputs: the parsed email, the directory and a
:class:`History`.  persist implements :class:`History` over the database
(``persist.history.SqlHistory``); :class:`MemoryHistory` serves unit tests.  A lookup gives
what was *committed* when it ran: a reply routed before its parent's commit does not see the
parent, which is why route also hands persist the ids it looked for (``correlation.
candidates``) and persist repeats the Message-ID lookup inside its transaction (see
``persist.store``).  A :class:`BatchHistory` also answers the :class:`Lookups` of a whole
batch of emails in a few queries (:class:`Prefetched`): a round trip per kind of lookup
instead of one or two per email.  Lookups fail with ``TransientError`` when the database is
unreachable.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from route.directory import PartyMatch, address_keys, domain_of


@dataclass(frozen=True)
class KnownEmail:
    """An email already stored, as threading needs it."""

    email_id: int
    thread_id: int
    message_id: str | None = None
    case_id: int | None = None
    tracked: bool = True


class History(Protocol):
    def by_message_ids(self, message_ids: Sequence[str]) -> list[KnownEmail]:
        """Stored emails with any of these Message-IDs, in the order of the ids given."""
        ...

    def by_email_id(self, email_id: int) -> KnownEmail | None: ...

    def by_thread_index_root(self, root: str) -> KnownEmail | None:
        """The newest stored email of the Outlook conversation with this Thread-Index root."""
        ...

    def by_subject(self, subject_key: str, participants: Collection[str],
                   since: datetime) -> KnownEmail | None:
        """The newest email since ``since`` with this normalised subject sharing a participant."""
        ...

    def party(self, address: str) -> PartyMatch | None:
        """The contact or account (from the database) an address belongs to."""
        ...


@dataclass
class MemoryHistory:
    """A :class:`History` over lists, for tests: add emails with :meth:`add`."""

    emails: list[tuple[KnownEmail, dict[str, object]]] = field(default_factory=list)
    parties: dict[str, PartyMatch] = field(default_factory=dict)
    domains: dict[str, PartyMatch] = field(default_factory=dict)

    def add(self, known: KnownEmail, *, thread_index_root: str | None = None,
            subject_key: str = "", participants: Collection[str] = (),
            seen_at: datetime | None = None) -> KnownEmail:
        self.emails.append((known, {"root": thread_index_root, "subject": subject_key,
                                    "participants": frozenset(participants),
                                    "seen_at": seen_at}))
        return known

    def by_message_ids(self, message_ids: Sequence[str]) -> list[KnownEmail]:
        found = {k.message_id: k for k, _ in self.emails if k.message_id}
        return [found[m] for m in message_ids if m in found]

    def by_email_id(self, email_id: int) -> KnownEmail | None:
        return next((k for k, _ in self.emails if k.email_id == email_id), None)

    def by_thread_index_root(self, root: str) -> KnownEmail | None:
        matches = [k for k, extra in self.emails if extra["root"] == root]
        return matches[-1] if matches else None

    def by_subject(self, subject_key: str, participants: Collection[str],
                   since: datetime) -> KnownEmail | None:
        wanted = frozenset(participants)
        matches = [k for k, extra in self.emails
                   if extra["subject"] == subject_key
                   and wanted & extra["participants"]  # type: ignore[operator]
                   and (extra["seen_at"] is None or extra["seen_at"] >= since)]  # type: ignore[operator]
        return matches[-1] if matches else None

    def party(self, address: str) -> PartyMatch | None:
        for key in address_keys(address):
            if key in self.parties:
                return self.parties[key]
        return self.domains.get(domain_of(address))


class NoHistory(MemoryHistory):
    """Knows no earlier mail and no database contacts (a route stage without a database)."""


SubjectQuery = tuple[str, frozenset[str], datetime]  # subject key, participants, since


@dataclass(frozen=True)
class Lookups:
    """Every lookup routing a batch of emails may make, gathered to be asked at once: the
    threading lookups, and the senders whose contact or account only the database knows."""

    email_ids: frozenset[int] = frozenset()
    message_ids: frozenset[str] = frozenset()
    thread_index_roots: frozenset[str] = frozenset()
    subjects: frozenset[SubjectQuery] = frozenset()
    parties: frozenset[str] = frozenset()

    def statements(self) -> int:
        """How many kinds of lookup there are to ask (a batch asks one statement each)."""
        return sum(1 for kind in (self.email_ids, self.message_ids, self.thread_index_roots,
                                  self.subjects, self.parties) if kind)


@dataclass
class Prefetched:
    """A :class:`History` answering the gathered :class:`Lookups` from one batch of queries
    (what was committed when they ran, as each lookup alone would give) and passing any
    other question on to ``base``."""

    base: History
    lookups: Lookups
    emails_by_id: dict[int, KnownEmail] = field(default_factory=dict)
    emails_by_message_id: dict[str, KnownEmail] = field(default_factory=dict)
    newest_by_root: dict[str, KnownEmail] = field(default_factory=dict)
    newest_by_subject: dict[SubjectQuery, KnownEmail] = field(default_factory=dict)

    def by_message_ids(self, message_ids: Sequence[str]) -> list[KnownEmail]:
        if not self.lookups.message_ids.issuperset(message_ids):
            return self.base.by_message_ids(message_ids)
        return [self.emails_by_message_id[m] for m in message_ids
                if m in self.emails_by_message_id]

    def by_email_id(self, email_id: int) -> KnownEmail | None:
        if email_id not in self.lookups.email_ids:
            return self.base.by_email_id(email_id)
        return self.emails_by_id.get(email_id)

    def by_thread_index_root(self, root: str) -> KnownEmail | None:
        if root not in self.lookups.thread_index_roots:
            return self.base.by_thread_index_root(root)
        return self.newest_by_root.get(root)

    def by_subject(self, subject_key: str, participants: Collection[str],
                   since: datetime) -> KnownEmail | None:
        query = (subject_key, frozenset(participants), since)
        if query not in self.lookups.subjects:
            return self.base.by_subject(subject_key, participants, since)
        return self.newest_by_subject.get(query)

    def party(self, address: str) -> PartyMatch | None:
        return self.base.party(address)


@runtime_checkable
class BatchHistory(History, Protocol):
    """A :class:`History` that can answer a batch's :class:`Lookups` in a few queries."""

    def prefetched(self, lookups: Lookups) -> History: ...
