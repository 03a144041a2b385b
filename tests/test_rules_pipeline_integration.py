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
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from ingest.sieve_rules import SieveClient
from shared.cli import main
from tests import mailgen
from tests.broker_fixtures import Vhost
from tests.dovecot import DovecotServer
from tests.processes import Workers, wait_for
from tests.sieve_fixtures import (
    DOMAIN,
    USERS,
    deliveries,
    password,
    sieve_dovecot,
    write_config,
)

pytest_plugins = ["tests.db_fixtures"]
pytestmark = pytest.mark.integration

STAGES = ("ingest", "parse", "route", "persist")
BOBS_SCRIPT = ('require ["fileinto"];\n'
               'if header :contains "subject" "invoice" { fileinto "Invoices"; }\n')


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    with sieve_dovecot() as server:
        yield server


def mail(user: str, mid: str, subject: str) -> bytes:
    return mailgen.message("customer@example.net", [f"{user}@{DOMAIN}"], subject,
                           f"body of {mid}", message_id=f"<{mid}@example.net>")


def test_rules_deployed_to_users_make_records_through_the_forward_mailbox(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost,
        database: Engine) -> None:
    with SieveClient(dovecot.rule_server("own")) as client:
        client.open("bob", password("bob"), "")
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
            client.open("carol", password("carol"), "")
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
