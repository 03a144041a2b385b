"""A forward mailbox on one Dovecot, direct mailboxes on another: the whole pipeline on real
RabbitMQ, PostgreSQL and two Dovecot instances, one process per stage.

alice and the support queue are monitored directly on the first server; bob and carol
through the forward mailbox on the second (its ``after`` left unset: the default, delete).
The mail: one message to alice directly, one forwarded by bob (the mixed case); one message
sent to alice and support directly and forwarded by bob and carol, bob's rule firing twice
(the duplicate cases); one redirected by carol (Resent-From); a spoofed forward, a looping
one and a message with no original.  The records and dead letters must be exactly these.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.engine import Engine

from persist.store import EmailStore
from tests import mailgen
from tests.broker_fixtures import Vhost, drain_queue
from tests.dovecot import DovecotServer
from tests.processes import Workers, wait_for

pytest_plugins = ["tests.db_fixtures"]
pytestmark = pytest.mark.integration

STAGES = ("ingest", "parse", "route", "persist")
FORWARD = "forward@corp.example.com"


@pytest.fixture
def direct_server() -> Iterator[DovecotServer]:
    server = DovecotServer(tls=False)
    for user in ("alice", "support"):
        server.add_user(user, f"{user}-secret")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def forward_server() -> Iterator[DovecotServer]:
    server = DovecotServer(tls=False)
    server.add_user("forward", "forward-secret")
    server.start()
    yield server
    server.stop()


def write_config(path: Path, direct: DovecotServer, forward: DovecotServer, vhost: Vhost,
                 engine: Engine) -> Path:
    mailbox = {"kind": "imap", "interval": 0.3}
    servers = []
    for name, server in (("direct", direct), ("forwards", forward)):
        profile = server.server_profile()
        servers.append({"name": name, "host": profile.host, "port": profile.port,
                        "tls": "none"})
    config: dict[str, Any] = {
        "broker": {"url": vhost.url, "prefix": "mail", "confirm_timeout": 10},
        "database": {"url": engine.url.render_as_string(hide_password=False)},
        "retry": {"attempts": 3, "initial_delay": 0.05, "max_delay": 1.0},
        "metrics": {"base_port": 0},
        "servers": servers,
        "mailboxes": [
            {**mailbox, "name": "alice", "server": "direct", "username": "alice",
             "password": "alice-secret"},
            {**mailbox, "name": "support", "server": "direct", "username": "support",
             "password": "support-secret"},
            {**mailbox, "name": "forward", "server": "forwards", "username": "forward",
             "password": "forward-secret", "forward": True, "address": FORWARD},
        ],
        "users": [
            {"name": "alice", "address": "alice@corp.example.com", "mailbox": "alice"},
            {"name": "bob", "address": "bob@corp.example.com", "forward": "forward"},
            {"name": "carol", "address": "carol@corp.example.com", "forward": "forward"},
        ],
        "queues": [
            {"name": "support", "address": "support@corp.example.com", "mailbox": "support"},
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def deliveries(engine: Engine) -> list[tuple[str, str, str, str]]:
    """(message_id, principal, method, decided_by) of every delivery, sorted."""
    tables = EmailStore(engine).tables
    with engine.connect() as connection:
        found = connection.execute(
            select(tables.emails.c.message_id, tables.deliveries.c.principal,
                   tables.deliveries.c.method, tables.deliveries.c.evidence)
            .join(tables.deliveries, tables.deliveries.c.email_id == tables.emails.c.id)
        ).all()
    return sorted((mid, principal, method, evidence["decided_by"])
                  for mid, principal, method, evidence in found)


def counts(engine: Engine) -> dict[str, int]:
    found = EmailStore(engine).count_rows()
    return {name: found[name] for name in ("emails", "deliveries", "queue_items")}


def message(mid: str, to: list[str], cc: list[str] | None = None,
            headers: dict[str, str] | None = None) -> bytes:
    raw = mailgen.message("customer@example.net", to, mid, f"body of {mid}",
                          message_id=f"<{mid}@example.net>", cc=cc)
    return "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode() + raw


def test_forward_and_direct_mailboxes_on_two_servers(
        tmp_path: Path, direct_server: DovecotServer, forward_server: DovecotServer,
        rabbit_vhost: Vhost, database: Engine) -> None:
    direct_server.deliver("alice", message("direct-only", ["alice@corp.example.com"]))
    forward_server.deliver("forward", mailgen.forward_envelope(
        "bob@corp.example.com", FORWARD, message("bob-only", ["bob@corp.example.com"])))
    shared = message("shared", ["alice@corp.example.com", "bob@corp.example.com"],
                     cc=["carol@corp.example.com", "support@corp.example.com"])
    direct_server.deliver("alice", shared)
    direct_server.deliver("support", shared)
    for forwarder in ("bob", "carol", "bob"):
        forward_server.deliver("forward", mailgen.forward_envelope(
            f"{forwarder}@corp.example.com", FORWARD, shared))
    forward_server.deliver("forward", message(
        "redirected", ["carol@corp.example.com"],
        headers={"Resent-From": "carol@corp.example.com"}))
    forward_server.deliver("forward", mailgen.forward_envelope(
        "mallory@evil.example", FORWARD, message("spoofed", ["mallory@corp.example.com"])))
    forward_server.deliver("forward", mailgen.forward_envelope(
        "bob@corp.example.com", FORWARD,
        message("auto-reply", ["bob@corp.example.com"],
                headers={"Auto-Submitted": "auto-replied"})))
    forward_server.deliver("forward", mailgen.message(
        "bob@corp.example.com", [FORWARD], "no original", "I forgot the attachment",
        message_id="<no-original@corp.example.com>"))

    config = write_config(tmp_path / "mailroute.yaml", direct_server, forward_server,
                          rabbit_vhost, database)
    workers = Workers(config, tmp_path)
    expected = {"emails": 4, "deliveries": 7, "queue_items": 1}

    def dead(stage: str, reason: str) -> float:
        return workers.counter(stage, "mailroute_stage_messages_dead_lettered_total",
                               reason=reason)

    try:
        workers.start(*STAGES)
        wait_for(lambda: counts(database) == expected and dead("route", "mail-loop") == 1
                 and dead("route", "untrusted-forwarder") == 1
                 and dead("parse", "invalid-forward-mail-item") == 1,
                 f"records {expected} and three dead letters",
                 on_timeout=lambda: f"{counts(database)}\n{workers.logs()}")
        assert deliveries(database) == [
            ("bob-only@example.net", "bob", "forward", "envelope-from"),
            ("direct-only@example.net", "alice", "direct", "receiving-mailbox"),
            ("redirected@example.net", "carol", "forward", "envelope-resent-from"),
            ("shared@example.net", "alice", "direct", "receiving-mailbox"),
            ("shared@example.net", "bob", "forward", "envelope-from"),
            ("shared@example.net", "carol", "forward", "envelope-from"),
            ("shared@example.net", "support", "direct", "receiving-mailbox"),
        ]
        # The forward mailbox's default after-processing action: delete every envelope.
        wait_for(lambda: forward_server.uids("forward") == [],
                 "the forward mailbox to be emptied", on_timeout=workers.logs)
        assert len(direct_server.uids("alice")) == 2
    finally:
        codes = workers.stop_all()
    assert set(codes.values()) == {0}, workers.logs()

    route_dead = drain_queue(rabbit_vhost.url, "mail.route.dead")
    by_reason = {h["x-mailroute-reason"]: json.loads(body) for body, h in route_dead}
    assert set(by_reason) == {"untrusted-forwarder", "mail-loop"}
    assert by_reason["untrusted-forwarder"]["envelope"]["forwarder"]["address"] == (
        "mallory@evil.example")
    assert by_reason["mail-loop"]["email"]["message_id"] == "auto-reply@example.net"
    [(body, headers)] = drain_queue(rabbit_vhost.url, "mail.parse.dead")
    assert headers["x-mailroute-reason"] == "invalid-forward-mail-item"
    raw_document = json.loads(body)
    assert raw_document["source"]["mailbox"] == "forward"
    assert b"I forgot the attachment" in base64.b64decode(raw_document["raw"])
    assert drain_queue(rabbit_vhost.url, "mail.persist.dead") == []
