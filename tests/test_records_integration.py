"""A CRM conversation through the whole pipeline on Dovecot, RabbitMQ and PostgreSQL.

Two users (ann, ben) and a support queue, each with its own IMAP mailbox, one process per
stage.  The conversation arrives step by step, as mail does: a customer's question to the
queue (Cc ann), her reply, an unknown sender's first mail to ben and his reply carrying the
tracking token, an out-of-office auto-reply, and a reply with a blocked attachment.  The
database must end with exactly the expected emails, deliveries, queue items, contacts,
cases and links.
"""

from __future__ import annotations

from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.engine import Engine

from persist.directory_store import DirectoryStore
from persist.store import EmailStore
from tests.broker_fixtures import Vhost, drain_queue
from tests.dovecot import DovecotServer
from tests.processes import Workers, wait_for

pytest_plugins = ["tests.db_fixtures"]
pytestmark = pytest.mark.integration

STAGES = ("ingest", "parse", "route", "persist")
CAROL = "carol@customer.example"
NEWBIE = "newbie@prospect.example"


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer(tls=False)
    for user in ("ann", "ben", "support"):
        server.add_user(user, f"{user}-secret")
    server.start()
    yield server
    server.stop()


def write_config(path: Path, dovecot: DovecotServer, vhost: Vhost, engine: Engine) -> Path:
    profile = dovecot.server_profile()
    box = {"kind": "imap", "server": "dovecot", "interval": 0.3}
    path.write_text(yaml.safe_dump({
        "broker": {"url": vhost.url, "confirm_timeout": 10},
        "database": {"url": engine.url.render_as_string(hide_password=False)},
        "retry": {"attempts": 3, "initial_delay": 0.05, "max_delay": 1.0},
        "metrics": {"base_port": 0},
        "servers": [{"name": "dovecot", "host": profile.host, "port": profile.port,
                     "tls": "none"}],
        "mailboxes": [{**box, "name": n, "username": n, "password": f"{n}-secret"}
                      for n in ("ann", "ben", "support")],
        "users": [{"name": "ann", "address": "ann@corp.example", "mailbox": "ann"},
                  {"name": "ben", "address": "ben@corp.example", "mailbox": "ben"}],
        "queues": [{"name": "support", "address": "support@corp.example",
                    "mailbox": "support"}],
        "contacts": [{"name": "Carol", "addresses": [CAROL]}],
        "directory": {"create_unknown_contacts": True},
        "attachments": {"path": str(path.parent / "attachments")},
        "rules": [
            {"name": "no auto-replies", "when": {"auto_reply": True},
             "then": {"suppress": True}},
            {"name": "support case", "when": {"queue": "support"},
             "then": {"create_case": True, "link_case": True, "priority": "normal"}},
            {"name": "new lead", "when": {"user": "ben", "sender": "unknown", "thread": "new"},
             "then": {"create_case": True, "priority": "low", "owner": "ben"}},
            {"name": "follow case", "when": {"thread": "with-case"},
             "then": {"link_case": True}},
        ],
    }))
    return path


def message(mid: str, sender: str, to: str, subject: str, *, cc: str | None = None,
            in_reply_to: str | None = None, references: str | None = None,
            headers: dict[str, str] | None = None,
            attachment: tuple[str, bytes] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = "Fri, 27 Nov 2026 08:00:00 +0000"
    msg["Message-ID"] = f"<{mid}>"
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to}>"
    if references:
        msg["References"] = " ".join(f"<{r}>" for r in references.split())
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(f"body of {mid}")
    if attachment:
        msg.add_attachment(attachment[1], maintype="application", subtype="octet-stream",
                           filename=attachment[0])
    return msg.as_bytes(policy=SMTP)


def snapshot(engine: Engine) -> dict[str, Any]:
    """Every record, keyed by Message-ID, in a form a test can compare exactly."""
    store = EmailStore(engine)
    t = store.tables
    with engine.connect() as c:
        mids = dict(c.execute(select(t.emails.c.id, t.emails.c.message_id)).all())
        deliveries = sorted(
            (mids[e], p, tracked, reason, rule) for e, p, tracked, reason, rule in c.execute(
                select(t.deliveries.c.email_id, t.deliveries.c.principal,
                       t.deliveries.c.tracked, t.deliveries.c.untracked_reason,
                       t.deliveries.c.rule)))
        queue_items = sorted((mids[e], q, p, r) for e, q, p, r in c.execute(
            select(t.queue_items.c.email_id, t.queue_items.c.queue,
                   t.queue_items.c.priority, t.queue_items.c.rule)))
        cases = {i: (mids[e], title, rule, priority, owner) for i, e, title, rule, priority, owner
                 in c.execute(select(t.cases.c.id, t.cases.c.created_from_email_id,
                                     t.cases.c.title, t.cases.c.rule, t.cases.c.priority,
                                     t.cases.c.owner))}
        contacts = {i: name for i, name in c.execute(select(t.contacts.c.id, t.contacts.c.name))}
        links = set()
        for e, kind, target, method in c.execute(
                select(t.links.c.email_id, t.links.c.target_kind, t.links.c.target_id,
                       t.links.c.method)):
            name = {"email": lambda x: mids[x], "case": lambda x: cases[x][0],
                    "contact": lambda x: contacts[x]}[kind](target)
            links.add((mids[e], kind, name, method))
        methods = dict(c.execute(
            select(t.emails.c.message_id, t.emails.c.correlation_method)).all())
    return {"emails": sorted(mids.values()), "deliveries": deliveries,
            "queue_items": queue_items, "cases": sorted(cases.values()),
            "contacts": sorted(contacts.values()), "links": links, "methods": methods}


def test_conversation_ends_with_exactly_the_expected_records(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, database: Engine) -> None:
    config = write_config(tmp_path / "mailroute.yaml", dovecot, rabbit_vhost, database)
    workers = Workers(config, tmp_path)
    store = EmailStore(database)

    def emails() -> int:
        return store.count_rows()["emails"]

    def step(count: int, what: str) -> None:
        wait_for(lambda: emails() == count, what,
                 on_timeout=lambda: f"{store.count_rows()}\n{workers.logs()}")

    try:
        workers.start(*STAGES)
        question = message("m1@customer.example", f"Carol <{CAROL}>", "support@corp.example",
                           "Printer on fire", cc="ann@corp.example")
        dovecot.deliver("support", question)
        dovecot.deliver("ann", question)
        wait_for(lambda: store.count_rows()["deliveries"] == 2, "the question, twice",
                 on_timeout=workers.logs)
        dovecot.deliver("support", message(
            "m2@customer.example", CAROL, "support@corp.example", "RE: Printer on fire",
            in_reply_to="m1@customer.example", references="m1@customer.example"))
        step(2, "carol's reply")
        dovecot.deliver("ben", message("m3@prospect.example", f"New Bie <{NEWBIE}>",
                                       "ben@corp.example", "Quote request"))
        step(3, "the unknown sender's first mail")
        [lead] = [e["id"] for e in store.list_emails() if e["message_id"] == "m3@prospect.example"]
        dovecot.deliver("ben", message("m4@prospect.example", NEWBIE, "ben@corp.example",
                                       f"Re: Quote request [CRM:{lead:07d}]"))
        step(4, "the reply with the tracking token")
        dovecot.deliver("support", message(
            "m5@customer.example", CAROL, "support@corp.example",
            "Automatic reply: RE: Printer on fire", in_reply_to="m2@customer.example",
            headers={"Auto-Submitted": "auto-replied"}))
        step(5, "the auto-reply")
        dovecot.deliver("support", message(
            "m6@customer.example", CAROL, "support@corp.example", "RE: Printer on fire",
            in_reply_to="m2@customer.example",
            references="m1@customer.example m2@customer.example",
            attachment=("fire-extinguisher.exe", b"MZ\x90\x00")))
        step(6, "the reply with a blocked attachment")
        wait_for(lambda: workers.counter("route", "mailroute_messages_untracked_total",
                                         stage="route", reason="suppressed-by-rule") == 1,
                 "the auto-reply to be counted as untracked", on_timeout=workers.logs)
    finally:
        codes = workers.stop_all()
    assert set(codes.values()) == {0}, workers.logs()

    got = snapshot(database)
    m1, m2, m3, m4, m5, m6 = (f"m{i}@{'prospect' if i in (3, 4) else 'customer'}.example"
                              for i in range(1, 7))
    assert got["emails"] == sorted([m1, m2, m3, m4, m5, m6])
    assert got["deliveries"] == sorted([
        (m1, "ann", True, None, None), (m1, "support", True, None, "support case"),
        (m2, "support", True, None, "support case"),
        (m3, "ben", True, None, "new lead"), (m4, "ben", True, None, "follow case"),
        (m5, "support", False, "suppressed-by-rule", "no auto-replies"),
        (m6, "support", True, None, "support case")])
    assert got["queue_items"] == sorted([
        (m1, "support", "normal", "support case"), (m2, "support", "normal", "support case"),
        (m6, "support", "normal", "support case")])
    assert got["cases"] == sorted([(m1, "Printer on fire", "support case", "normal", None),
                                   (m3, "Quote request", "new lead", "low", "ben")])
    assert got["contacts"] == ["Carol", "New Bie"]
    assert got["methods"] == {m1: "none", m2: "in-reply-to", m3: "none", m4: "token",
                              m5: "in-reply-to", m6: "in-reply-to"}
    assert got["links"] == {
        (m1, "case", m1, "created"), (m1, "contact", "Carol", "from"),
        (m2, "email", m1, "in-reply-to"), (m2, "case", m1, "thread"),
        (m2, "contact", "Carol", "from"),
        (m3, "case", m3, "created"), (m3, "contact", "New Bie", "created-from-sender"),
        (m4, "email", m3, "token"), (m4, "case", m3, "thread"),
        (m4, "contact", "New Bie", "from"),
        (m5, "email", m2, "in-reply-to"),
        (m6, "email", m2, "in-reply-to"), (m6, "case", m1, "thread"),
        (m6, "contact", "Carol", "from"),
    }
    [m6_id] = [e["id"] for e in store.list_emails() if e["message_id"] == m6]
    assert store.attachments_for(m6_id)[0]["status"] == "blocked-extension"
    row = store.email(m6_id)
    assert row is not None and row["notes"] == ["attachment-blocked:fire-extinguisher.exe"]
    assert not (tmp_path / "attachments").exists()  # nothing of the blocked file was kept
    assert [c["source"] for c in DirectoryStore(database).contacts()] == ["config", "auto"]
    for stage in ("parse", "route", "persist"):
        assert drain_queue(rabbit_vhost.url, f"mail.{stage}.dead") == []
