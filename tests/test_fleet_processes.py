"""Several `mailroute worker ingest` processes sharing a few hundred mailboxes for real.

Dovecot (started here, a master user so no mailbox has a password of its own), PostgreSQL (a
database of its own), RabbitMQ (a vhost of its own); the master password is in the
configuration only encrypted (``enc:``), its Fernet key in the environment.  Shown: every
mailbox polled within its interval by three pollers that share the load; SIGKILL one and its
mailboxes are taken over within the lease time, no message lost; the operator commands see
the fleet; and afterwards no log line and no database row holds the password or the key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from persist.database import create_engine_for, upgrade
from persist.tables import build_tables
from shared.schemas import Codec
from shared.secrets import Keyring
from shared.settings import BrokerSettings
from shared.transport import Broker
from tests.broker_fixtures import Vhost, drain_queue
from tests.dovecot import DovecotServer, dovecot_fixture
from tests.processes import REPO, wait_for

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.db_fixtures"]

dovecot = dovecot_fixture(scope="module")

MAILBOXES = 200
POLLERS = 3
INTERVAL = 8.0
LEASE = 6.0
PUSH = 12  # the first mailboxes keep IDLE sessions, so their leases are held all the time
MASTER_PASSWORD = "fleet-master-7Yh2Qp"


class Pollers:
    def __init__(self, config: Path, env: dict[str, str], log_dir: Path) -> None:
        self.config = config
        self.env = env
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> int:
        index = len(self.processes)
        with open(self.log_dir / f"poller{index}.log", "ab") as log:
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "--config", str(self.config), "worker",
                 "ingest"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env))
        return index

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.log_dir.glob("poller*.log")))

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def owners(engine: Engine) -> dict[str, str]:
    t = build_tables().mailbox_leases
    with engine.connect() as connection:
        return {row.mailbox: row.owner for row in connection.execute(
            select(t.c.mailbox, t.c.owner).where(t.c.owner.is_not(None)))}


def last_polls(engine: Engine) -> dict[str, datetime]:
    t = build_tables().mailbox_state
    with engine.connect() as connection:
        return {row.mailbox: row.last_poll_at for row in connection.execute(
            select(t.c.mailbox, t.c.last_poll_at)) if row.last_poll_at is not None}


def test_pollers_share_the_fleet_and_take_over_from_a_killed_one(
        dovecot: DovecotServer, rabbit_vhost: Vhost, empty_postgres_database_url: str,
        tmp_path: Path) -> None:
    postgres_url = empty_postgres_database_url
    dovecot.add_master_user("fleetmaster", MASTER_PASSWORD)
    users = [f"fleet{i:03d}" for i in range(MAILBOXES)]
    for user in users:
        dovecot.add_user(user, f"unused-{user}-pw")
        dovecot.deliver(user, message(user, 1))
    key = Keyring.new_key()
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump({
        "log_level": "DEBUG",
        "broker": {"url": rabbit_vhost.url, "confirm_timeout": 20},
        "database": {"url": postgres_url},
        "metrics": {"base_port": -1},
        "fleet": {"lease_seconds": LEASE, "concurrency": 6},
        "servers": [{"name": "dovecot", "host": dovecot.host, "port": dovecot.imap_port,
                     "tls": "none", "timeout": 20, "interval": INTERVAL,
                     "master_user": "fleetmaster",
                     "master_password": Keyring([key]).encrypt(MASTER_PASSWORD)}],
        "mailboxes": [{"name": user, "server": "dovecot", "username": user, "after": "keep",
                       "push": i < PUSH} for i, user in enumerate(users)],
    }))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MAILROUTE_SECRETS__KEYS": key}
    engine = create_engine_for(postgres_url)
    upgrade(engine)
    broker = Broker(BrokerSettings(url=rabbit_vhost.url))
    broker.declare()
    queue = broker.topology.queue_for_edge("raw")
    codec = Codec()
    published: Counter[tuple[str, int, str]] = Counter()

    def collect() -> set[tuple[str, str]]:
        for body, _ in drain_queue(rabbit_vhost.url, queue):
            doc = codec.decode("raw", body)
            source = doc["source"]
            published[(source["mailbox"], source["uidvalidity"], source["uid"])] += 1
        # Each mailbox gets message 1 then 2 under one UIDVALIDITY: UID n is message n.
        return {(box, uid) for box, _, uid in published}

    pollers = Pollers(config, env, tmp_path)
    try:
        for _ in range(POLLERS):
            pollers.start()
        wanted = {(u, "1") for u in users}
        wait_for(lambda: wanted <= collect(), "every mailbox's first message", 240,
                 pollers.logs)
        # The load is spread: each poller holds leases at some point.
        seen_owners: set[str] = set()

        def all_pollers_hold_leases() -> bool:
            seen_owners.update(owners(engine).values())
            return len(seen_owners) >= POLLERS

        wait_for(all_pollers_hold_leases, "all three pollers holding leases", 60)
        # Every mailbox is polled again within its interval (plus a lease and slack for a
        # busy shared machine).
        window_start = datetime.now(UTC)
        wait_for(lambda: all(t >= window_start for t in last_polls(engine).values())
                 and len(last_polls(engine)) == MAILBOXES,
                 "every mailbox polled again", INTERVAL + LEASE + 30, pollers.logs)

        # SIGKILL a poller that holds IDLE sessions, then give every mailbox a second message.
        by_pid = {str(p.pid): p for p in pollers.processes}
        wait_for(lambda: sum(1 for o in owners(engine).values()) >= PUSH,
                 "the push mailboxes leased", 60, pollers.logs)
        held = owners(engine)
        victim_pid = Counter(o.split(":")[1] for b, o in held.items()
                             if b in users[:PUSH]).most_common(1)[0][0]
        victim = by_pid[victim_pid]
        held_by_victim = {b for b, o in held.items() if o.split(":")[1] == victim_pid}
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        killed_at = time.monotonic()

        def taken_over() -> bool:
            now_held = owners(engine)
            return all(b in now_held and now_held[b].split(":")[1] != victim_pid
                       for b in held_by_victim if b in users[:PUSH])

        wait_for(taken_over, "the killed poller's IDLE mailboxes taken over", LEASE + 60,
                 pollers.logs)
        takeover = time.monotonic() - killed_at
        # Bounded by the lease (plus a claim tick and a login); generous for a busy machine.
        assert takeover <= LEASE + 20, takeover
        for user in users:
            dovecot.deliver(user, message(user, 2))
        wanted |= {(u, "2") for u in users}
        wait_for(lambda: wanted <= collect(), "every second message after the kill",
                 LEASE + INTERVAL + 120, pollers.logs)
        taken_over_in = time.monotonic() - killed_at
        assert not any(o.split(":")[1] == str(victim.pid) for o in owners(engine).values())
        print(f"fleet: {MAILBOXES} mailboxes, {POLLERS} pollers; SIGKILL of one holding "
              f"{len(held_by_victim)} lease(s): taken over in {takeover:.1f} s, all mail "
              f"read within {taken_over_in:.1f} s (lease {LEASE} s, interval {INTERVAL} s)")
    finally:
        pollers.stop_all()
    collect()
    assert len(published) == 2 * MAILBOXES  # nothing lost
    duplicated = {key for key, count in published.items() if count > 1}
    # At-least-once: only a poll killed between the broker's confirm and the cursor save can
    # hand a message on twice (persist's natural keys then keep one record).
    assert {box for box, _, _ in duplicated} <= held_by_victim, duplicated

    run_operator_commands(config, env, users)
    assert_no_secret_anywhere(pollers.logs(), engine, [MASTER_PASSWORD, key])
    engine.dispose()


def message(user: str, n: int) -> bytes:
    return (f"From: a@example.org\r\nTo: {user}@example.com\r\nMessage-ID: <{user}-{n}@x>\r\n"
            f"Subject: {user} {n}\r\n\r\nbody\r\n").encode()


def run_operator_commands(config: Path, env: dict[str, str], users: list[str]) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shared.cli", "--config", str(config),
                               *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120, check=False)

    listing = cli("mailbox", "list")
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    assert len(rows) == MAILBOXES and all(row[2] == "success" for row in rows)
    status = cli("status")
    assert status.returncode == 0, status.stderr
    assert f"fleet: {MAILBOXES} mailbox(es); {MAILBOXES} success" in status.stdout
    tested = cli("mailbox", "test", users[0])
    assert tested.returncode == 0, tested.stderr
    assert "ok:" in tested.stdout and "master user" in tested.stdout
    assert cli("mailbox", "test", "no-such-box").returncode == 2
    enabled = cli("mailbox", "enable", users[1])
    assert enabled.returncode == 0 and "was not disabled" in enabled.stdout


def assert_no_secret_anywhere(logs: str, engine: Engine, secrets: list[str]) -> None:
    """Fault 33 after a run of real processes at DEBUG: not in a log line, not in a row."""
    assert "ingest poller" in logs and "DEBUG" in logs
    with engine.connect() as connection:
        tables = [row[0] for row in connection.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))]
        dump = []
        for table in tables:
            for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                dump.append(json.dumps([str(v) for v in row]))
    database = "\n".join(dump)
    for secret in secrets:
        assert secret not in logs, "a secret reached a poller's log"
        assert secret not in database, "a secret reached the database"
