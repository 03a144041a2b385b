"""Canaries for real, and issue 7 as it is shown: Dovecot with Pigeonhole (ManageSieve, LMTP
delivery with Sieve), RabbitMQ, PostgreSQL and one ``mailroute worker`` process per stage.

``mailroute rules deploy`` writes the forwarding rule of alice, bob and carol; mail delivered
to them over LMTP becomes a record per user through the forward mailbox, and each user's
canary (handed over LMTP by ``worker ingest``) comes back through it, marked seen, no record.
carol deletes her rule: her next canary does not arrive, and after the deadline her alert is
raised (log line, metric, ``mailroute canary status`` and ``status``) and hers only;
``rules check`` reports her rule missing, ``rules deploy`` mends it, and her next canary
clears the alert.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from ingest.canary import Handover
from ingest.sieve_rules import SieveClient
from persist.canaries import CanaryStore
from shared.cli import main
from tests import mailgen
from tests.broker_fixtures import Vhost, drain_queue
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

DEADLINE = 6.0  # a canary through Sieve and the pipeline takes 1-1.5 s here


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    with sieve_dovecot() as server:
        yield server


def states(engine: Engine) -> dict[str, str]:
    found = CanaryStore(engine).states([("user", user) for user in USERS])
    return {key[1]: state.state for key, state in found.items()}


def test_a_deleted_rule_raises_that_users_canary_alert_until_rules_deploy_mends_it(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost,
        database: Engine) -> None:
    config = write_config(tmp_path / "mailroute.yaml", dovecot, rabbit_vhost, database,
                          canaries={"enabled": True, "interval": 3600, "deadline": DEADLINE,
                                    "delivery_url": f"lmtp://127.0.0.1:{dovecot.lmtp_port}",
                                    "sender": f"mailroute-canary@{DOMAIN}"})
    runner = CliRunner()

    def mailroute(*args: str) -> Any:
        return runner.invoke(main, ["-c", str(config), *args], catch_exceptions=False)

    deployed = mailroute("rules", "deploy")
    assert deployed.exit_code == 0 and "3 user(s): 3 created" in deployed.output, \
        deployed.output
    inbox = {user: len(dovecot.uids(user)) for user in USERS}
    workers = Workers(config, tmp_path)

    def missing_gauge(user: str) -> float:
        return workers.counter("ingest", "mailroute_canary_missing", principal=user)

    def alerts() -> list[str]:
        return [line for line in workers.log_path("ingest").read_text().splitlines()
                if "ALERT" in line]

    try:
        workers.start("parse", "route", "persist")
        for stage in ("parse", "route", "persist"):
            wait_for(lambda s=stage: workers.started(s), f"{stage} to start",  # type: ignore[misc]
                     on_timeout=workers.logs)
        workers.start("ingest")  # sends the first round of canaries at once
        for user in USERS:
            dovecot.deliver_lmtp(f"{user}@{DOMAIN}", mailgen.message(
                "customer@example.net", [f"{user}@{DOMAIN}"], "order", f"from {user}",
                message_id=f"<order-{user}@example.net>"))
        expected = [(f"order-{user}@example.net", user, "envelope-x-sieve-redirected-from")
                    for user in USERS]
        wait_for(lambda: deliveries(database) == expected, "a record for each user",
                 on_timeout=lambda: f"{deliveries(database)}\n{workers.logs()}")
        wait_for(lambda: states(database) == {user: "ok" for user in USERS},
                 "every user's first canary seen",
                 on_timeout=lambda: f"{states(database)}\n{workers.logs()}")
        assert workers.counter("persist", "mailroute_canary_seen_total") == 3

        # carol deletes mailroute's rule: her next canary does not come back
        with SieveClient(dovecot.rule_server("own")) as client:
            client.open("carol", password("carol"), "")
            assert client.setactive("") and client.deletescript("mailroute-forward")
        sent = mailroute("canary", "send")
        assert sent.exit_code == 0, sent.output
        assert sorted(line.split()[2] for line in sent.output.splitlines()
                      if "expected in forward mailbox forward" in line) == list(USERS)
        wait_for(lambda: states(database) == {"alice": "ok", "bob": "ok", "carol": "missing"},
                 "carol's canary missing, the others seen",
                 on_timeout=lambda: f"{states(database)}\n{workers.logs()}")
        wait_for(lambda: missing_gauge("carol") == 1, "carol's missing gauge",
                 on_timeout=workers.logs)
        assert missing_gauge("alice") == missing_gauge("bob") == 0
        assert workers.counter("ingest", "mailroute_mailbox_alerts_total", kind="canary") == 1
        [alert] = alerts()
        assert (f"ALERT canary for user carol not seen in the forward mailbox forward within "
                f"{DEADLINE:.0f} s") in alert
        assert "mailroute rules check --user carol" in alert
        shown = mailroute("canary", "status")
        assert shown.exit_code == 1, shown.output
        lines = {line.split()[1]: line for line in shown.output.splitlines()
                 if line.startswith("user ")}
        assert {user: line.split()[2] for user, line in lines.items()} == {
            "alice": "ok", "bob": "ok", "carol": "missing"}
        assert "check the forwarding rule" in lines["carol"]
        overview = mailroute("status")
        assert overview.exit_code == 0, overview.output
        assert "CANARY FOR" in overview.output and lines["carol"] in overview.output

        # rules check reports it, rules deploy mends it, carol's next canary clears the alert
        checked = mailroute("rules", "check")
        assert checked.exit_code == 1
        assert [line.split()[:3] for line in checked.output.splitlines()
                if line.startswith("carol")] == [["carol", "sieve", "missing"]]
        mended = mailroute("rules", "deploy")
        assert mended.exit_code == 0 and "1 created, 2 present" in mended.output, \
            mended.output
        resent = mailroute("canary", "send", "--user", "carol")
        assert resent.exit_code == 0, resent.output
        assert "user carol" in resent.output and f"carol@{DOMAIN}" in resent.output
        wait_for(lambda: states(database)["carol"] == "ok", "carol's new canary seen",
                 on_timeout=workers.logs)
        wait_for(lambda: missing_gauge("carol") == 0, "carol's alert cleared",
                 on_timeout=workers.logs)
        assert mailroute("canary", "status").exit_code == 0
        assert len(alerts()) == 1
        assert deliveries(database) == expected  # seven canaries, not one record among them
        assert {user: len(dovecot.uids(user)) - inbox[user] for user in USERS} == {
            "alice": 1, "bob": 1, "carol": 2}  # the order; canaries only while carol had no rule
        wait_for(lambda: dovecot.uids("forward") == [], "the forward mailbox emptied",
                 on_timeout=workers.logs)
    finally:
        codes = workers.stop_all()
    assert set(codes.values()) == {0}, workers.logs()
    for stage in ("parse", "route", "persist"):
        assert drain_queue(rabbit_vhost.url, f"mail.{stage}.dead") == []


def test_the_handover_reports_each_refused_recipient_and_an_unreachable_server(
        dovecot: DovecotServer) -> None:
    handover = Handover(f"lmtp://127.0.0.1:{dovecot.lmtp_port}")
    before = len(dovecot.uids("bob"))
    refused, delivered = handover.send(f"mailroute-canary@{DOMAIN}", [
        (f"nobody@{DOMAIN}", b"Subject: canary\r\n\r\nx\r\n"),
        (f"bob@{DOMAIN}", b"Subject: canary\r\n\r\nx\r\n")])
    assert refused is not None and f"nobody@{DOMAIN}" in refused and "refused" in refused
    assert delivered is None
    dovecot.wait_for_mail("bob", before + 1)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        [down] = Handover(f"smtp://127.0.0.1:{port}", timeout=5).send(
            "a@b.example", [(f"bob@{DOMAIN}", b"Subject: x\r\n\r\nx\r\n")])
    assert down is not None and down.startswith(f"cannot reach smtp://127.0.0.1:{port}")
