"""The database side of route's read-only lookup (``route.history.History``).

Takes an engine; gives stored emails by Message-ID, id (the tracking token), Outlook
conversation root and normalised subject with a shared participant, each with its thread,
the thread's case and whether it was tracked, and the contact or account of an address.
Sees only committed rows (see ``route.history`` for what that means for replies racing
their parent).  Contact and account lookups are cached for ``party_cache_seconds`` (a
contact added from the CLI counts as known to route at most that much later; persist
resolves parties afresh at save time).  :meth:`SqlHistory.prefetched` asks the threading
lookups of a whole batch at once, one query per kind, with the contacts of the senders not
in the cache, all of them in one round trip on PostgreSQL.  Fails with ``TransientError``
when the database is unreachable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from psycopg.rows import namedtuple_row
from sqlalchemy import any_, bindparam, func, select, text
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.engine import Connection, Engine

from persist.database import KeptConnection, pipelined, translate_errors
from persist.directory_store import (
    PartyRef,
    match_parties,
    party_parameters,
    party_statement,
    resolve_parties,
)
from persist.tables import Tables, build_tables
from route.directory import PartyMatch, address_keys
from route.history import History, KnownEmail, Lookups, Prefetched, SubjectQuery


def known_email_query(tables: Tables) -> Any:
    emails, cases = tables.emails, tables.cases
    thread = func.coalesce(emails.c.thread_id, emails.c.id)
    case_id = (select(func.min(cases.c.id)).where(cases.c.thread_id == thread)
               .scalar_subquery())
    return select(emails.c.id, thread.label("thread_id"), emails.c.message_id,
                  case_id.label("case_id"), emails.c.tracked)


def to_known(row: Any) -> KnownEmail:
    return KnownEmail(email_id=int(row.id), thread_id=int(row.thread_id),
                      message_id=row.message_id,
                      case_id=None if row.case_id is None else int(row.case_id),
                      tracked=bool(row.tracked))


def known_by_message_ids(connection: Connection, tables: Tables,
                         message_ids: Sequence[str]) -> list[KnownEmail]:
    if not message_ids:
        return []
    rows = connection.execute(known_email_query(tables).where(
        tables.emails.c.message_id.in_(list(message_ids))).order_by(tables.emails.c.id)).all()
    found = oldest_by_message_id(rows)
    return [found[m] for m in message_ids if m in found]


def oldest_by_message_id(rows: Iterable[Any]) -> dict[str, KnownEmail]:
    """The first of ``rows`` (ordered by id: the oldest) for each Message-ID."""
    found: dict[str, KnownEmail] = {}
    for row in rows:
        found.setdefault(row.message_id, to_known(row))
    return found


PARTY_CACHE_ENTRIES = 10_000

# The newest email for each (subject key, since, participants) asked, numbered from 1 (the
# participants, strict addresses without line breaks, one text per query, one per line).
# PostgreSQL's planner, left to itself, joined all the recent parties or intersected the
# whole first_seen_at window for each lookup (4-8 ms at 1,500 emails, growing with the
# table): OFFSET 0 keeps the participant test a per-row check, so each lookup walks its
# subject's (subject_key, id) index backwards and stops at the first match (0.03 ms).
NEWEST_BY_SUBJECTS = """
SELECT q.n, e.id, e.thread_id, e.message_id, e.case_id, e.tracked
FROM unnest(CAST(:keys AS text[]), CAST(:sinces AS timestamptz[]),
            CAST(:participants AS text[])) WITH ORDINALITY AS q(subject_key, since, wanted, n)
CROSS JOIN LATERAL (
    SELECT emails.id, coalesce(emails.thread_id, emails.id) AS thread_id, emails.message_id,
           (SELECT min(cases.id) FROM cases
            WHERE cases.thread_id = coalesce(emails.thread_id, emails.id)) AS case_id,
           emails.tracked
    FROM emails
    WHERE emails.subject_key = q.subject_key AND emails.first_seen_at >= q.since
      AND EXISTS (SELECT parties.id FROM parties
                  WHERE parties.email_id = emails.id
                    AND lower(parties.address) = ANY(string_to_array(q.wanted, E'\n'))
                  OFFSET 0)
    ORDER BY emails.subject_key DESC, emails.id DESC LIMIT 1) AS e
"""


class SqlHistory:
    def __init__(self, engine: Engine, party_cache_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._tables = build_tables()
        self._party_ttl = party_cache_seconds
        self._clock = clock
        self._parties: dict[str, tuple[float, PartyMatch | None]] = {}
        self._kept = KeptConnection(engine, autocommit=True)
        emails, parties = self._tables.emails, self._tables.parties
        self._by_email_id = self._newest(emails.c.id == bindparam("email_id"))
        self._by_thread_index_root = self._newest(
            emails.c.thread_index_root == bindparam("root"))
        shares = select(parties.c.id).where(
            parties.c.email_id == emails.c.id,
            func.lower(parties.c.address).in_(bindparam("participants", expanding=True)))
        self._by_subject = self._newest((emails.c.subject_key == bindparam("subject_key"))
                                        & (emails.c.first_seen_at >= bindparam("since"))
                                        & shares.exists())
        # A whole batch's lookups, one statement per kind (PostgreSQL): the emails by id and
        # by Message-ID, the newest email per root, and per (subject key, since,
        # participants) the newest as _by_subject finds it.
        known = known_email_query(self._tables)
        self._batch_statements = {
            "ids": known.where(emails.c.id == any_(bindparam("ids"))),
            "message_ids": known.where(emails.c.message_id == any_(bindparam("message_ids")))
            .order_by(emails.c.id),
            "roots": known.add_columns(emails.c.thread_index_root).where(
                emails.c.thread_index_root == any_(bindparam("roots"))).order_by(
                emails.c.thread_index_root, emails.c.id.desc()).ext(
                distinct_on(emails.c.thread_index_root)),
            "subjects": text(NEWEST_BY_SUBJECTS),
            "parties": party_statement(self._tables, "postgresql"),
        }
        self._batch_sql: dict[str, str] = {}

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """On PostgreSQL the kept connection in autocommit: each lookup is one round trip
        (a pooled checkout cost five, which made route the pipeline's bottleneck).  A
        failure reaches the caller as TransientError."""
        with translate_errors(), self._kept.use() as connection:
            yield connection

    def close(self) -> None:
        self._kept.close()

    def _newest(self, condition: Any) -> Any:
        """The statement for the newest email meeting ``condition`` (built once: composing
        it cost route more CPU than running it)."""
        return known_email_query(self._tables).where(condition) \
            .order_by(self._tables.emails.c.id.desc()).limit(1)

    def _one(self, statement: Any, **parameters: Any) -> KnownEmail | None:
        with self._reading() as connection:
            row = connection.execute(statement, parameters).first()
        return None if row is None else to_known(row)

    def by_message_ids(self, message_ids: Sequence[str]) -> list[KnownEmail]:
        with self._reading() as connection:
            return known_by_message_ids(connection, self._tables, message_ids)

    def by_email_id(self, email_id: int) -> KnownEmail | None:
        return self._one(self._by_email_id, email_id=email_id)

    def by_thread_index_root(self, root: str) -> KnownEmail | None:
        return self._one(self._by_thread_index_root, root=root)

    def by_subject(self, subject_key: str, participants: Collection[str],
                   since: datetime) -> KnownEmail | None:
        if self._engine.dialect.name == "postgresql":
            return self._newest_by_subject([(subject_key, frozenset(participants), since)]
                                           ).get((subject_key, frozenset(participants), since))
        return self._one(self._by_subject, subject_key=subject_key, since=since,
                         participants=sorted(participants))

    def _newest_by_subject(self, queries: Collection[SubjectQuery]
                           ) -> dict[SubjectQuery, KnownEmail]:
        ordered = _subject_order(queries)
        with self._reading() as connection:
            rows = connection.execute(self._batch_statements["subjects"],
                                      _subject_parameters(ordered)).all()
        return {ordered[row.n - 1]: to_known(row) for row in rows}

    def prefetched(self, lookups: Lookups) -> History:
        """The answers to a batch's lookups, one query per kind (PostgreSQL; SQLite, local
        and without ``LATERAL``/``DISTINCT ON``, asks each as :class:`SqlHistory` would)."""
        answers = Prefetched(self, lookups)
        if self._engine.dialect.name != "postgresql":
            answers.emails_by_id = {i: k for i in lookups.email_ids
                                    if (k := self.by_email_id(i)) is not None}
            answers.emails_by_message_id = {
                k.message_id: k for k in self.by_message_ids(sorted(lookups.message_ids))
                if k.message_id is not None}
            answers.newest_by_root = {r: k for r in lookups.thread_index_roots
                                      if (k := self.by_thread_index_root(r)) is not None}
            answers.newest_by_subject = {q: k for q in lookups.subjects
                                         if (k := self.by_subject(*q)) is not None}
            return answers
        asked: dict[str, dict[str, Any]] = {}
        if lookups.email_ids:
            asked["ids"] = {"ids": sorted(lookups.email_ids)}
        if lookups.message_ids:
            asked["message_ids"] = {"message_ids": sorted(lookups.message_ids)}
        if lookups.thread_index_roots:
            asked["roots"] = {"roots": sorted(lookups.thread_index_roots)}
        ordered = _subject_order(lookups.subjects)
        if ordered:
            asked["subjects"] = _subject_parameters(ordered)
        senders = {address: address_keys(address) for address in sorted(lookups.parties)
                   if not self._party_is_cached(address)}
        if senders:
            asked["parties"] = party_parameters(senders)
        rows = self._ask_together(asked)
        if senders:
            found = match_parties(senders, rows.get("parties", []))
            for address in senders:
                self._remember_party(address, _party_match(found.get(address)))
        answers.emails_by_id = {int(row.id): to_known(row) for row in rows.get("ids", [])}
        answers.emails_by_message_id = oldest_by_message_id(rows.get("message_ids", []))
        answers.newest_by_root = {row.thread_index_root: to_known(row)
                                  for row in rows.get("roots", [])}
        answers.newest_by_subject = {ordered[row.n - 1]: to_known(row)
                                     for row in rows.get("subjects", [])}
        return answers

    def _ask_together(self, asked: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
        """The rows of each batch statement asked (by name, with its parameters), all sent
        in one round trip (psycopg pipeline mode) instead of one round trip each: at a few
        hundred mails a second route's batches hold one or two mails, so a batch's lookups
        cost what its round trips cost, the network's latency on each with a remote
        database."""
        if not asked:
            return {}
        with self._reading() as connection:
            if not self._batch_sql:
                self._batch_sql = {name: str(statement.compile(dialect=connection.dialect))
                                   for name, statement in self._batch_statements.items()}
            with pipelined(connection) as raw:
                cursors = {name: raw.cursor(row_factory=namedtuple_row).execute(
                    self._batch_sql[name], parameters) for name, parameters in asked.items()}
            return {name: cursor.fetchall() for name, cursor in cursors.items()}

    def party(self, address: str) -> PartyMatch | None:
        if self._party_is_cached(address):
            return self._parties[address][1]
        with self._reading() as connection:
            found = resolve_parties(connection, self._tables, [address]).get(address)
        return self._remember_party(address, _party_match(found))

    def _party_is_cached(self, address: str) -> bool:
        """Is there a fresh cached answer (a match or None) for ``address``?"""
        cached = self._parties.get(address)
        return cached is not None and cached[0] > self._clock()

    def _remember_party(self, address: str, match: PartyMatch | None) -> PartyMatch | None:
        if len(self._parties) >= PARTY_CACHE_ENTRIES:
            self._parties.clear()
        self._parties[address] = (self._clock() + self._party_ttl, match)
        return match


def _party_match(found: PartyRef | None) -> PartyMatch | None:
    return None if found is None else PartyMatch(
        "contact" if found.kind == "contact" else "account", found.name, "database")


def _subject_order(queries: Collection[SubjectQuery]) -> list[SubjectQuery]:
    return sorted(queries, key=lambda q: (q[0], sorted(q[1]), q[2]))


def _subject_parameters(ordered: Sequence[SubjectQuery]) -> dict[str, list[Any]]:
    return {"keys": [q[0] for q in ordered], "sinces": [q[2] for q in ordered],
            "participants": ["\n".join(sorted(q[1])) for q in ordered]}
