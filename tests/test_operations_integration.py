"""Operations end to end on RabbitMQ and PostgreSQL, one process per stage, Maildir mailboxes.

Mail flows through all four stages; two forwards from a user nobody configured are
dead-lettered by route (broken on purpose).  Replaying persist and route from the journal
creates no new records (the route replay dead-letters the two again); the dry run says so
beforehand.  After the cause is fixed (the user is configured, route restarted),
``mailroute dead retry`` puts the dead letters back and their records appear exactly once.
Along the way one email's trace id is followed through the JSON logs of all four stages and
into its records.
"""

from __future__ import annotations

import json
import mailbox
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.engine import Engine

from persist.store import EmailStore
from tests import mailgen
from tests.broker_fixtures import Vhost
from tests.processes import REPO, Workers, wait_for

pytest_plugins = ["tests.db_fixtures"]
pytestmark = pytest.mark.integration

STAGES = ("ingest", "parse", "route", "persist")
FORWARD = "forward@corp.example.com"


def write_config(path: Path, maildirs: Path, vhost: Vhost, engine: Engine,
                 with_carol: bool) -> None:
    users = [{"name": "alice", "address": "alice@corp.example.com", "mailbox": "alice"},
             {"name": "bob", "address": "bob@corp.example.com", "forward": "forward"}]
    if with_carol:
        users.append({"name": "carol", "address": "carol@corp.example.com",
                      "forward": "forward"})
    box = {"kind": "maildir", "interval": 0.3}
    path.write_text(yaml.safe_dump({
        "broker": {"url": vhost.url, "prefix": "mail", "confirm_timeout": 10},
        "database": {"url": engine.url.render_as_string(hide_password=False)},
        "retry": {"attempts": 2, "initial_delay": 0.05, "max_delay": 0.5},
        "metrics": {"base_port": 0},
        "log_format": "json",
        "mailboxes": [{**box, "name": "alice", "path": str(maildirs / "alice"), "after": "seen"},
                      {**box, "name": "forward", "path": str(maildirs / "forward"),
                       "forward": True, "after": "delete"}],
        "users": users,
    }))


def deliver(maildirs: Path) -> None:
    maildirs.mkdir()
    alice = mailbox.Maildir(maildirs / "alice", create=True)
    forward = mailbox.Maildir(maildirs / "forward", create=True)
    for i in range(5):
        alice.add(mailgen.message("sender@example.org", ["alice@corp.example.com"],
                                  f"alice {i}", "hello", message_id=f"<alice-{i}@example.org>"))
    for user, n in (("bob", 3), ("carol", 2)):
        for i in range(n):
            original = mailgen.message("customer@example.net", [f"{user}@corp.example.com"],
                                       f"for {user} {i}", "please",
                                       message_id=f"<{user}-{i}@example.net>")
            forward.add(mailgen.forward_envelope(f"{user}@corp.example.com", FORWARD, original))


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", "--config", str(config), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def records(engine: Engine) -> dict[str, Any]:
    tables = EmailStore(engine).tables
    with engine.connect() as connection:
        rows = connection.execute(
            select(tables.emails.c.message_id, tables.deliveries.c.principal,
                   tables.deliveries.c.trace_id, tables.emails.c.trace_id)
            .join(tables.deliveries, tables.deliveries.c.email_id == tables.emails.c.id)
        ).all()
    return {"pairs": sorted((m, p) for m, p, _, _ in rows),
            "traces": {m: (d, e) for m, _, d, e in rows}}


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_replay_and_dead_letter_retry_create_each_record_once(
        tmp_path: Path, rabbit_vhost: Vhost, database: Engine) -> None:
    maildirs = tmp_path / "maildir"
    deliver(maildirs)
    config = tmp_path / "mailroute.yaml"
    write_config(config, maildirs, rabbit_vhost, database, with_carol=False)
    workers = Workers(config, tmp_path)
    first = sorted([(f"alice-{i}@example.org", "alice") for i in range(5)]
                   + [(f"bob-{i}@example.net", "bob") for i in range(3)])
    try:
        workers.start(*STAGES)
        wait_for(lambda: records(database)["pairs"] == first, "the first 8 records",
                 on_timeout=lambda: f"{records(database)}\n{workers.logs()}")
        wait_for(lambda: workers.counter("route", "mailroute_stage_messages_dead_lettered_total",
                                         reason="untrusted-forwarder") == 2,
                 "carol's two forwards to be dead-lettered", on_timeout=workers.logs)

        # One email's trace id, from its records back through every stage's JSON log.
        delivery_trace, email_trace = records(database)["traces"]["bob-1@example.net"]
        assert delivery_trace == email_trace
        for stage in STAGES:
            traced = [line for line in json_lines(workers.log_path(stage))
                      if line.get("trace_id") == email_trace]
            assert traced, f"trace {email_trace} not in the {stage} log"
        (published,) = [line for line in json_lines(workers.log_path("ingest"))
                        if line.get("trace_id") == email_trace]
        assert published["mailbox"] == "forward" and published["edge"] == "raw"

        # Replay persist's input: the same 8 documents again, no new records.
        replayed = cli(config, "replay", "--stage", "persist", "--since", "1h")
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 8 message(s) to the persist queue" in replayed.stdout
        wait_for(lambda: workers.counter("persist", "mailroute_stage_messages_in_total") >= 16,
                 "persist to take the replayed documents", on_timeout=workers.logs)
        assert records(database)["pairs"] == first

        # The dry run of route says what would happen: nothing new, two dead letters.
        dry = cli(config, "replay", "--stage", "route", "--since", "1h", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert ("dry run: 10 of" in dry.stdout and "8 no change" in dry.stdout
                and "2 would be dead-lettered: untrusted-forwarder" in dry.stdout), dry.stdout
        only_bob = cli(config, "replay", "--stage", "route", "--since", "1h", "--dry-run",
                       "--user", "bob", "--message-id", "<bob-2@example.net>")
        assert "dry run: 1 of" in only_bob.stdout, only_bob.stdout + only_bob.stderr
        assert "bob-2@example.net>: no change" in only_bob.stdout

        # Replay route for real: no new records, carol's two dead-lettered once more.
        since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        until = datetime.now(UTC).isoformat()
        route_range = ("replay", "--stage", "route", "--since", since, "--until", until)
        replayed = cli(config, *route_range)
        assert "replayed 10 message(s)" in replayed.stdout, replayed.stdout + replayed.stderr
        assert "pika" not in replayed.stderr  # no log noise from the broker client
        again = cli(config, *route_range)
        assert "already completed" in again.stdout  # same request: its position is saved
        wait_for(lambda: workers.counter("route", "mailroute_stage_messages_dead_lettered_total",
                                         reason="untrusted-forwarder") == 4,
                 "the replayed dead letters", on_timeout=workers.logs)
        wait_for(lambda: workers.counter("persist", "mailroute_stage_messages_in_total") >= 24,
                 "persist to take route's replayed output", on_timeout=workers.logs)
        assert records(database)["pairs"] == first

        listed = cli(config, "dead", "list", "--stage", "route")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("untrusted-forwarder") == 4
        assert "4 dead letter(s)" in listed.stdout
        letter_id = listed.stdout.splitlines()[1].split()[0]
        shown = cli(config, "dead", "show", letter_id)
        assert "reason:    untrusted-forwarder" in shown.stdout, shown.stdout + shown.stderr
        assert "carol@corp.example.com" in shown.stdout

        # Fix the cause: configure carol, restart route; then retry the dead letters.
        write_config(config, maildirs, rabbit_vhost, database, with_carol=True)
        assert workers.kill("route", signal.SIGTERM) == 0
        workers.start("route")
        retried = cli(config, "dead", "retry", "--stage", "route", "--all")
        assert retried.returncode == 0, retried.stderr
        assert "4 dead letter(s) retried" in retried.stdout
        expected = sorted([*first, *[(f"carol-{i}@example.net", "carol") for i in range(2)]])
        wait_for(lambda: records(database)["pairs"] == expected, "carol's records, once each",
                 on_timeout=lambda: f"{records(database)}\n{workers.logs()}")
        wait_for(lambda: workers.counter("persist", "mailroute_stage_messages_in_total") >= 4,
                 "persist to take all four retried documents", on_timeout=workers.logs)
        assert records(database)["pairs"] == expected
        assert "0 dead letter(s)" in cli(config, "dead", "list").stdout
    finally:
        codes = workers.stop_all()
    assert set(codes.values()) == {0}, workers.logs()
