"""Issue 7, shown end to end: ``mailroute rules deploy`` writes Sieve rules over ManageSieve,
mail delivered over LMTP is redirected by them to the forward mailbox, and the pipeline (one
process per stage, real RabbitMQ, PostgreSQL and Dovecot with Pigeonhole) makes a record for
each user; a user's deleted rule is found by ``rules check`` and mended by ``rules deploy``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.engine import Engine

from ingest.sieve_rules import SieveClient
from persist.store import EmailStore
from shared.cli import main
from tests import mailgen
from tests.broker_fixtures import Vhost
from tests.dovecot import DovecotServer
from tests.processes import Workers, wait_for

pytest_plugins = ["tests.db_fixtures"]
pytestmark = pytest.mark.integration

STAGES = ("ingest", "parse", "route", "persist")
DOMAIN = "corp.example.com"
USERS = ("alice", "bob", "carol")
ADMIN, ADMIN_PASSWORD = "mailroute-admin", "admin-pass-e2e-7"
BOBS_SCRIPT = ('require ["fileinto"];\n'
               'if header :contains "subject" "invoice" { fileinto "Invoices"; }\n')


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer(sieve=True, tls=False)
    for user in (*USERS, "forward"):
        server.add_user(user, f"{user}-password")
    server.add_master_user(ADMIN, ADMIN_PASSWORD)
    server.start()
    yield server
    server.stop()


def write_config(path: Path, dovecot: DovecotServer, vhost: Vhost, engine: Engine) -> Path:
    config: dict[str, Any] = {
        "broker": {"url": vhost.url, "prefix": "mail", "confirm_timeout": 10},
        "database": {"url": engine.url.render_as_string(hide_password=False)},
        "retry": {"attempts": 3, "initial_delay": 0.05, "max_delay": 1.0},
        "metrics": {"base_port": 0},
        "servers": [{"name": "mail", "host": dovecot.host, "port": dovecot.imap_port,
                     "tls": "none"}],
        "mailboxes": [{"name": "forward", "kind": "imap", "server": "mail", "interval": 0.3,
                       "username": "forward", "password": "forward-password",
                       "forward": True, "address": f"forward@{DOMAIN}"}],
        "rule_servers": [{"name": "sieve", "host": dovecot.host, "port": dovecot.sieve_port,
                          "tls": "none", "admin_user": ADMIN,
                          "admin_password": ADMIN_PASSWORD}],
        "users": [{"name": user, "address": f"{user}@{DOMAIN}", "forward": "forward",
                   "rule": {"server": "sieve"}} for user in USERS],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def deliveries(engine: Engine) -> list[tuple[str, str, str]]:
    """(message_id, principal, decided_by) of every delivery, sorted."""
    tables = EmailStore(engine).tables
    with engine.connect() as connection:
        found = connection.execute(
            select(tables.emails.c.message_id, tables.deliveries.c.principal,
                   tables.deliveries.c.evidence)
            .join(tables.deliveries, tables.deliveries.c.email_id == tables.emails.c.id)
        ).all()
    return sorted((mid, principal, evidence["decided_by"]) for mid, principal, evidence in found)


def mail(user: str, mid: str, subject: str) -> bytes:
    return mailgen.message("customer@example.net", [f"{user}@{DOMAIN}"], subject,
                           f"body of {mid}", message_id=f"<{mid}@example.net>")


def test_rules_deployed_to_users_make_records_through_the_forward_mailbox(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost,
        database: Engine) -> None:
    with SieveClient(dovecot.rule_server("own")) as client:
        client.open("bob", "bob-password", "")
        assert client.putscript("bob-filters", BOBS_SCRIPT) and client.setactive("bob-filters")
    config = write_config(tmp_path / "mailroute.yaml", dovecot, rabbit_vhost, database)
    runner = CliRunner()

    def rules(*args: str) -> Any:
        return runner.invoke(main, ["-c", str(config), "rules", *args], catch_exceptions=False)

    deployed = rules("deploy")
    assert deployed.exit_code == 0, deployed.output
    assert "3 user(s): 3 created" in deployed.output

    for user in USERS:
        dovecot.deliver_lmtp(f"{user}@{DOMAIN}", mail(user, f"{user}-1", f"invoice for {user}"))
    dovecot.wait_for_mail("forward", 3)
    assert len(dovecot.uids("bob", "Invoices")) == 1  # bob's own filter still runs

    workers = Workers(config, tmp_path)
    expected = [(f"{user}-1@example.net", user, "envelope-x-sieve-redirected-from")
                for user in USERS]
    try:
        workers.start(*STAGES)
        wait_for(lambda: deliveries(database) == expected, "a record for each user",
                 on_timeout=lambda: f"{deliveries(database)}\n{workers.logs()}")

        # carol deletes mailroute's rule: her mail stops reaching the forward mailbox,
        # check says so, deploy mends it, and her next message is recorded again.
        with SieveClient(dovecot.rule_server("own")) as client:
            client.open("carol", "carol-password", "")
            assert client.setactive("") and client.deletescript("mailroute-forward")
        checked = rules("check")
        assert checked.exit_code == 1
        assert [line.split()[:3] for line in checked.output.splitlines()
                if line.startswith("carol")] == [["carol", "sieve", "missing"]]
        dovecot.deliver_lmtp(f"carol@{DOMAIN}", mail("carol", "carol-lost", "hello"))
        mended = rules("deploy")
        assert mended.exit_code == 0 and "1 created, 2 present" in mended.output
        assert rules("check").exit_code == 0
        dovecot.deliver_lmtp(f"carol@{DOMAIN}", mail("carol", "carol-2", "hello again"))
        expected.append(("carol-2@example.net", "carol", "envelope-x-sieve-redirected-from"))
        wait_for(lambda: deliveries(database) == sorted(expected), "carol's mail recorded again",
                 on_timeout=lambda: f"{deliveries(database)}\n{workers.logs()}")
    finally:
        codes = workers.stop_all()
    assert set(codes.values()) == {0}, workers.logs()
    assert len(dovecot.uids("carol")) == 3  # all three reached her own INBOX
