"""Canaries for real: Dovecot with Pigeonhole (LMTP delivery with Sieve), RabbitMQ, PostgreSQL
and one ``mailroute worker`` process per stage.

bob's forwarding rule is in place (written over ManageSieve by ``ingest.sieve_rules``, as
``mailroute rules deploy`` does); carol has none.  ``worker ingest`` hands each a canary over
LMTP: bob's Sieve script redirects his to the forward mailbox, the pipeline marks it seen and
stores nothing; carol's never arrives, and after the deadline her alert is raised (log line,
metric, ``mailroute canary status``) and hers only.  Ordinary mail still becomes records
through bob's rule.  Then carol's rule is put in place, ``mailroute canary send --user carol``
sends a new canary, and her alert clears when it arrives.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import Engine

from ingest.canary import Handover
from ingest.forwarding_rules import RuleTarget
from ingest.sieve_rules import ManageSieveBackend
from persist.canaries import CanaryStore
from persist.store import EmailStore
from shared.secrets import Secret
from tests import mailgen
from tests.broker_fixtures import Vhost, drain_queue
from tests.dovecot import DovecotServer
from tests.processes import REPO, Workers, wait_for

pytest_plugins = ["tests.db_fixtures"]
pytestmark = pytest.mark.integration

DOMAIN = "corp.example.com"
FORWARD = f"forward@{DOMAIN}"
DEADLINE = 6.0  # a canary through Sieve and the pipeline takes 1-1.5 s here
USERS = ("bob", "carol")


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer(tls=False, sieve=True)
    for user in (*USERS, "forward"):
        server.add_user(user, f"{user}-secret")
    server.start()
    yield server
    server.stop()


def write_config(path: Path, dovecot: DovecotServer, vhost: Vhost, engine: Engine) -> Path:
    profile = dovecot.server_profile()
    config: dict[str, Any] = {
        "broker": {"url": vhost.url, "prefix": "mail", "confirm_timeout": 10},
        "database": {"url": engine.url.render_as_string(hide_password=False)},
        "retry": {"attempts": 3, "initial_delay": 0.05, "max_delay": 1.0},
        "metrics": {"base_port": 0},
        "servers": [{"name": "dovecot", "host": profile.host, "port": profile.port,
                     "tls": "none"}],
        "mailboxes": [{"name": "forward", "kind": "imap", "server": "dovecot",
                       "interval": 0.3, "username": "forward", "password": "forward-secret",
                       "forward": True, "address": FORWARD}],
        "rule_servers": [{"name": "sieve", "host": profile.host, "port": dovecot.sieve_port,
                          "tls": "none"}],
        "users": [{"name": user, "address": f"{user}@{DOMAIN}", "forward": "forward",
                   "rule": {"server": "sieve", "password": f"{user}-secret"}}
                  for user in USERS],
        "canaries": {"enabled": True, "interval": 3600, "deadline": DEADLINE,
                     "delivery_url": f"lmtp://127.0.0.1:{dovecot.lmtp_port}",
                     "sender": f"mailroute-canary@{DOMAIN}"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def deploy_rule(dovecot: DovecotServer, user: str) -> None:
    """What `mailroute rules deploy` does for one user: mailroute's Sieve script, active."""
    server = dovecot.rule_server("sieve")
    with ManageSieveBackend(server) as backend:
        backend.install(RuleTarget(principal=user, address=f"{user}@{DOMAIN}",
                                   login=f"{user}@{DOMAIN}",
                                   password=Secret(f"{user}-secret"),
                                   forward_address=FORWARD, server=server))


def states(engine: Engine) -> dict[str, str]:
    found = CanaryStore(engine).states([("user", user) for user in USERS])
    return {key[1]: state.state for key, state in found.items()}


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", "--config", str(config), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_user_whose_rule_is_missing_gets_the_canary_alert_and_only_that_user(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost,
        database: Engine) -> None:
    deploy_rule(dovecot, "bob")
    inbox = {user: len(dovecot.uids(user)) for user in USERS}
    config = write_config(tmp_path / "mailroute.yaml", dovecot, rabbit_vhost, database)
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
        wait_for(lambda: states(database) == {"bob": "ok", "carol": "missing"},
                 "bob's canary seen and carol's missing",
                 on_timeout=lambda: f"{states(database)}\n{workers.logs()}")
        wait_for(lambda: missing_gauge("carol") == 1, "carol's missing gauge",
                 on_timeout=workers.logs)
        assert missing_gauge("bob") == 0
        assert workers.counter("persist", "mailroute_canary_seen_total", principal="bob") == 1
        assert workers.counter("ingest", "mailroute_mailbox_alerts_total",
                               mailbox="carol", kind="canary") == 1
        [alert] = alerts()
        assert (f"ALERT canary for user carol not seen in the forward mailbox forward within "
                f"{DEADLINE:.0f} s") in alert
        assert "mailroute rules check --user carol" in alert
        # bob's canary went through his rule (a copy stays in his inbox), carol's did not
        assert {user: len(dovecot.uids(user)) - inbox[user] for user in USERS} == {
            "bob": 1, "carol": 1}
        assert EmailStore(database).count_rows()["emails"] == 0  # canaries are no records

        shown = cli(config, "canary", "status")
        assert shown.returncode == 1, shown.stdout + shown.stderr
        lines = {line.split()[1]: line for line in shown.stdout.splitlines()
                 if line.startswith("user ")}
        assert lines["bob"].split()[2] == "ok" and lines["carol"].split()[2] == "missing"
        assert "check the forwarding rule" in lines["carol"]
        overview = cli(config, "status")
        assert overview.returncode == 0, overview.stdout + overview.stderr
        assert "CANARY FOR" in overview.stdout and lines["carol"] in overview.stdout

        # ordinary mail still becomes a record through bob's rule, and none through carol's
        for user in USERS:
            dovecot.deliver_lmtp(f"{user}@{DOMAIN}", mailgen.message(
                "customer@example.net", [f"{user}@{DOMAIN}"], "order", "please",
                message_id=f"<order-{user}@example.net>"))
        wait_for(lambda: EmailStore(database).count_rows()["deliveries"] == 1,
                 "bob's mail recorded", on_timeout=workers.logs)
        [stored] = EmailStore(database).list_emails()
        assert stored["message_id"] == "order-bob@example.net"

        # carol's rule mended: the next canary arrives and her alert clears
        deploy_rule(dovecot, "carol")
        sent = cli(config, "canary", "send", "--user", "carol")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "user carol" in sent.stdout and f"carol@{DOMAIN}" in sent.stdout
        wait_for(lambda: states(database)["carol"] == "ok", "carol's new canary seen",
                 on_timeout=workers.logs)
        wait_for(lambda: missing_gauge("carol") == 0, "carol's alert cleared",
                 on_timeout=workers.logs)
        assert cli(config, "canary", "status").returncode == 0
        assert len(alerts()) == 1
        assert EmailStore(database).count_rows()["emails"] == 1
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
