"""The whole pipeline on the real servers: Dovecot, RabbitMQ, PostgreSQL, one process per stage.

Two users monitored directly (alice, dave), two through a forward mailbox (bob, carol), one
queue (support).  About fifty messages, one of them sent to alice directly, forwarded by bob
and sent to the support queue.  The database must then hold exactly the expected emails,
deliveries and queue items; a spoofed forward is dead-lettered with its reason; restarting
the workers and re-polling (after losing a cursor, as a crash before the cursor save would)
creates nothing new.  SIGKILL of each stage while mail flows is tests/faults/test_kill_workers.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import delete, select
from sqlalchemy.engine import Engine

from persist.store import EmailStore
from tests import mailgen
from tests.broker_fixtures import Vhost, drain_queue
from tests.dovecot import DovecotServer
from tests.processes import Workers, wait_for

pytest_plugins = ["tests.db_fixtures"]
pytestmark = pytest.mark.integration

STAGES = ("ingest", "parse", "route", "persist")
FORWARD_ADDRESS = "forward@corp.example.com"


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer(tls=False)
    for user in ("alice", "dave", "support", "forward"):
        server.add_user(user, f"{user}-secret")
    server.start()
    yield server
    server.stop()


def write_config(path: Path, dovecot: DovecotServer, vhost: Vhost, engine: Engine,
                 batch_size: int = 200) -> Path:
    profile = dovecot.server_profile()
    mailbox = {"kind": "imap", "server": "dovecot", "interval": 0.3, "batch_size": batch_size}
    config: dict[str, Any] = {
        "broker": {"url": vhost.url, "prefix": "mail", "prefetch": 50, "confirm_timeout": 10},
        "database": {"url": engine.url.render_as_string(hide_password=False)},
        "retry": {"attempts": 3, "initial_delay": 0.05, "max_delay": 1.0},
        "metrics": {"base_port": 0},
        "servers": [{"name": "dovecot", "host": profile.host, "port": profile.port,
                     "tls": "none"}],
        "mailboxes": [
            {**mailbox, "name": "alice", "username": "alice", "password": "alice-secret"},
            {**mailbox, "name": "dave", "username": "dave", "password": "dave-secret"},
            {**mailbox, "name": "support", "username": "support",
             "password": "support-secret"},
            {**mailbox, "name": "forward", "username": "forward", "password": "forward-secret",
             "forward": True, "after": "delete"},
        ],
        "users": [
            {"name": "alice", "address": "alice@corp.example.com", "mailbox": "alice"},
            {"name": "dave", "address": "dave@corp.example.com", "mailbox": "dave"},
            {"name": "bob", "address": "bob@corp.example.com", "forward": "forward"},
            {"name": "carol", "address": "carol@corp.example.com", "forward": "forward"},
        ],
        "queues": [
            {"name": "support", "address": "support@corp.example.com", "mailbox": "support"},
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def counts(engine: Engine) -> dict[str, int]:
    return {k: v for k, v in EmailStore(engine).count_rows().items()
            if k in ("emails", "deliveries", "queue_items")}


def deliveries_by_message(engine: Engine) -> dict[str, list[tuple[str, str, str]]]:
    store = EmailStore(engine)
    tables = store.tables
    with engine.connect() as connection:
        rows = connection.execute(
            select(tables.emails.c.message_id, tables.deliveries.c.principal,
                   tables.deliveries.c.method, tables.deliveries.c.mailbox)
            .join(tables.deliveries, tables.deliveries.c.email_id == tables.emails.c.id)
        ).all()
    result: dict[str, list[tuple[str, str, str]]] = {}
    for message_id, principal, method, mailbox in rows:
        result.setdefault(message_id, []).append((principal, method, mailbox))
    return {k: sorted(v) for k, v in result.items()}


def deliver_scenario(dovecot: DovecotServer) -> dict[str, Any]:
    """Put the scenario's mail in the mailboxes; gives the expected outcome."""
    sent: dict[str, list[str]] = {}

    def direct(user: str, n: int) -> None:
        for i in range(n):
            mid = f"{user}-{i}@example.org"
            dovecot.deliver(user, mailgen.message(
                "sender@example.org", [f"{user}@corp.example.com"], f"{user} {i}", "hello",
                message_id=f"<{mid}>"))
            sent.setdefault(mid, []).append(user)

    def forwarded(user: str, n: int) -> None:
        for i in range(n):
            mid = f"fwd-{user}-{i}@example.org"
            original = mailgen.message("customer@example.net", [f"{user}@corp.example.com"],
                                       f"for {user} {i}", "please help", message_id=f"<{mid}>")
            dovecot.deliver("forward", mailgen.forward_envelope(
                f"{user}@corp.example.com", FORWARD_ADDRESS, original))
            sent.setdefault(mid, []).append(user)

    direct("alice", 12)
    direct("dave", 10)
    direct("support", 10)
    forwarded("bob", 9)
    forwarded("carol", 8)
    shared = mailgen.message("customer@example.net",
                             ["alice@corp.example.com", "bob@corp.example.com"],
                             "to everyone", "one email, three deliveries",
                             cc=["support@corp.example.com"], message_id="<shared@example.net>")
    dovecot.deliver("alice", shared)
    dovecot.deliver("support", shared)
    dovecot.deliver("forward", mailgen.forward_envelope("bob@corp.example.com", FORWARD_ADDRESS,
                                                        shared))
    sent["shared@example.net"] = ["alice", "bob", "support"]
    spoofed = mailgen.message("attacker@example.net", ["mallory@corp.example.com"],
                              "spoof", "make a record for me", message_id="<spoof@example.net>")
    dovecot.deliver("forward", mailgen.forward_envelope("mallory@evil.example", FORWARD_ADDRESS,
                                                        spoofed))
    return sent


def test_pipeline_end_to_end_with_restart_and_repoll(tmp_path: Path, dovecot: DovecotServer,
                                                     rabbit_vhost: Vhost,
                                                     database: Engine) -> None:
    sent = deliver_scenario(dovecot)
    config = write_config(tmp_path / "mailroute.yaml", dovecot, rabbit_vhost, database)
    workers = Workers(config, tmp_path)
    expected = {"emails": 50, "deliveries": 52, "queue_items": 11}
    try:
        workers.start(*STAGES)
        wait_for(lambda: counts(database) == expected, f"records {expected}",
                 on_timeout=lambda: f"{counts(database)}\n{workers.logs()}")
        wait_for(lambda: workers.counter("route", "mailroute_stage_messages_dead_lettered_total",
                                         reason="untrusted-forwarder") == 1,
                 "the spoofed forward to be dead-lettered", on_timeout=workers.logs)
        by_message = deliveries_by_message(database)
        assert by_message["shared@example.net"] == [
            ("alice", "direct", "alice"), ("bob", "forward", "forward"),
            ("support", "direct", "support")]
        assert {mid: sorted(p for p, _, _ in d) for mid, d in by_message.items()} == {
            mid: sorted(users) for mid, users in sent.items()}
        assert "spoof@example.net" not in by_message
        # the forward mailbox deletes after processing; direct mailboxes keep (seen)
        wait_for(lambda: dovecot.uids("forward") == [], "the forward mailbox to be emptied")
        assert all(b"\\Seen" in flags for flags in dovecot.flags("alice").values())

        workers.stop_all()
        status = subprocess.run([sys.executable, "-m", "shared.cli", "--config", str(config),
                                 "status"], capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        table = {line.split()[0]: line.split()[1:] for line in status.stdout.splitlines()
                 if line.strip()}
        assert [table[box][1] for box in ("alice", "dave", "support", "forward")] == [
            "success"] * 4
        assert table["mail.route.dead"] == ["1", "0"]  # messages, consumers
        assert table["mail.persist"] == ["0", "0"]
        dead = drain_queue(rabbit_vhost.url, "mail.route.dead")
        assert [h["x-mailroute-reason"] for _, h in dead] == ["untrusted-forwarder"]
        assert json.loads(dead[0][0])["envelope"]["forwarder"]["address"] == (
            "mallory@evil.example")

        # Lose alice's cursor (a crash between confirm and cursor save), restart, re-poll.
        tables = EmailStore(database).tables
        with database.begin() as connection:
            connection.execute(delete(tables.mailbox_state).where(
                tables.mailbox_state.c.mailbox == "alice"))
        workers.start(*STAGES)
        wait_for(lambda: workers.counter("persist", "mailroute_stage_messages_in_total") >= 13,
                 "alice's 13 messages to be fetched and persisted again",
                 on_timeout=workers.logs)
        assert counts(database) == expected
        assert deliveries_by_message(database)["shared@example.net"] == by_message[
            "shared@example.net"]
    finally:
        codes = workers.stop_all()
    assert set(codes.values()) == {0}, workers.logs()
