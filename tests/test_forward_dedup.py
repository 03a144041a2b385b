"""One email, one delivery per user or queue, however the message arrives: on SQLite and
PostgreSQL, through the real parse, route and persist functions (no broker).

Cases: the same message directly and through the forward mailbox, forwarded by several users
and a queue, redelivered; a message without a Message-ID (deduplicated by fingerprint); a
user moving from direct monitoring to the forward mailbox; the evidence kept on the row.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from parse.extract import parse_raw
from persist.store import EmailStore
from route.directory import Directory
from route.forwarding import ForwardPolicy
from route.router import route
from shared.settings import LimitSettings, MailboxSettings, PrincipalSettings, Settings
from tests import mailgen

pytest_plugins = ["tests.db_fixtures"]

FORWARD = "forward@corp.example.com"


def settings(bob_direct: bool = False) -> Settings:
    bob: dict[str, Any] = {"mailbox": "bob"} if bob_direct else {"forward": "fwd"}
    return Settings(
        mailboxes=(MailboxSettings(name="alice", kind="maildir", path="/a"),
                   MailboxSettings(name="bob", kind="maildir", path="/b"),
                   MailboxSettings(name="fwd", kind="maildir", path="/f", forward=True,
                                   address=FORWARD)),
        users=(PrincipalSettings(name="alice", address="alice@corp.example.com",
                                 mailbox="alice"),
               PrincipalSettings(name="bob", address="bob@corp.example.com", **bob),
               PrincipalSettings(name="carol", address="carol@corp.example.com",
                                 forward="fwd")),
        queues=(PrincipalSettings(name="sales", address="sales@corp.example.com",
                                  forward="fwd"),))


def deliver(store: EmailStore, config: Settings, raw: bytes, mailbox: str,
            uid: int) -> None:
    """What parse, route and persist do with one fetched message."""
    kind = "forward" if mailbox == "fwd" else "direct"
    now = datetime.now(UTC)
    source = {"mailbox": mailbox, "mailbox_kind": kind, "folder": "INBOX", "uidvalidity": 1,
              "uid": str(uid), "received_at": now, "fetched_at": now}
    documents = []
    for envelope, email in parse_raw(raw, kind, LimitSettings()).items():
        parsed = {"trace_id": f"t{uid}", "source": source, "envelope": envelope, "email": email}
        deliveries = route(parsed, Directory(config), ForwardPolicy(config))
        documents.append({**parsed, "deliveries": deliveries})
    store.save(documents)


def rows(store: EmailStore) -> list[tuple[str, str, str, str]]:
    """(dedup_key, principal, method, decided_by) of every delivery."""
    tables = store.tables
    query = (select(tables.emails.c.dedup_key, tables.deliveries.c.principal,
                    tables.deliveries.c.method, tables.deliveries.c.evidence)
             .join(tables.deliveries, tables.deliveries.c.email_id == tables.emails.c.id)
             .order_by(tables.deliveries.c.principal))
    with store._engine.connect() as connection:
        return [(key, principal, method, evidence["decided_by"])
                for key, principal, method, evidence in connection.execute(query)]


def counts(store: EmailStore) -> dict[str, int]:
    found = store.count_rows()
    return {name: found[name] for name in ("emails", "deliveries", "queue_items")}


def original(message_id: str | None = "<shared@example.net>") -> bytes:
    raw = mailgen.message("customer@example.net",
                          ["alice@corp.example.com", "bob@corp.example.com"], "offer",
                          "one email for everyone", message_id=message_id or "<x@y>",
                          cc=["carol@corp.example.com", "sales@corp.example.com"])
    if message_id is None:
        raw = b"\r\n".join(line for line in raw.split(b"\r\n")
                           if not line.lower().startswith(b"message-id:"))
    return raw


def forwarded(user: str, raw: bytes) -> bytes:
    return mailgen.forward_envelope(f"{user}@corp.example.com", FORWARD, raw)


def test_direct_and_forwarded_by_several_is_one_email_with_one_delivery_each(
        db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    config = settings()
    raw = original()
    deliver(store, config, raw, "alice", 1)
    deliver(store, config, forwarded("bob", raw), "fwd", 1)
    deliver(store, config, forwarded("carol", raw), "fwd", 2)
    deliver(store, config, forwarded("sales", raw), "fwd", 3)
    deliver(store, config, forwarded("bob", raw), "fwd", 4)   # bob's rule fired twice
    deliver(store, config, raw, "alice", 1)                  # a redelivery
    assert counts(store) == {"emails": 1, "deliveries": 4, "queue_items": 1}
    assert rows(store) == [
        ("mid:shared@example.net", "alice", "direct", "receiving-mailbox"),
        ("mid:shared@example.net", "bob", "forward", "envelope-from"),
        ("mid:shared@example.net", "carol", "forward", "envelope-from"),
        ("mid:shared@example.net", "sales", "forward", "envelope-from"),
    ]


def test_without_message_id_the_fingerprint_joins_direct_and_forwarded(
        db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    config = settings()
    raw = original(message_id=None)
    deliver(store, config, raw, "alice", 1)
    deliver(store, config, forwarded("bob", raw), "fwd", 1)
    assert counts(store) == {"emails": 1, "deliveries": 2, "queue_items": 0}
    assert {key.split(":")[0] for key, *_ in rows(store)} == {"fp"}


def test_a_user_moving_from_direct_to_the_forward_mailbox_gets_no_duplicate(
        db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    raw = original()
    deliver(store, settings(bob_direct=True), raw, "bob", 1)
    deliver(store, settings(), forwarded("bob", raw), "fwd", 1)
    assert counts(store) == {"emails": 1, "deliveries": 1, "queue_items": 0}
    assert rows(store) == [("mid:shared@example.net", "bob", "direct", "receiving-mailbox")]


def test_the_evidence_is_kept_on_the_delivery_row(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    config = settings()
    deliver(store, config, forwarded("carol", original()), "fwd", 1)
    [email] = store.list_emails()
    [delivery] = store.deliveries_for(email["id"])
    evidence: dict[str, Any] = delivery["evidence"]
    assert evidence["decided_by"] == "envelope-from"
    assert evidence["forwarder"] == "carol@corp.example.com"
    assert evidence["agreed"] == ["inner-cc"]
    assert evidence["disagreed"] == ["inner-to"]
    assert evidence["envelope_kind"] == "wrapped"
