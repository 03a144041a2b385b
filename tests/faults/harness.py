"""The fault tests' pipeline: mail in Dovecot, four worker processes, checks on the database.

Takes a private Dovecot, a broker URL (the shared node's private vhost, a private node, or a
proxy in front of either), and a migrated database engine; gives :class:`Pipeline`, which
writes the workers' configuration, puts numbered messages into the mailboxes (one IMAP
session for many APPENDs), starts and kills workers, and checks the outcome every fault test
must end in: each message sent recorded exactly once (one email row, one delivery), nothing
lost, and dead letters only where expected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kombu import Connection, Queue
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from persist.database import create_engine_for, upgrade
from persist.store import EmailStore
from tests import mailgen
from tests.dovecot import DovecotServer
from tests.processes import Workers, wait_for

STAGES = ("ingest", "parse", "route", "persist")
USERS = ("alice", "dave")
DEAD_QUEUES = tuple(f"mail.{stage}.dead" for stage in ("parse", "route", "persist"))


def message_id(tag: str, n: int) -> str:
    return f"{tag}-{n}@example.org"


def make_message(user: str, tag: str, n: int, body: str = "") -> bytes:
    return mailgen.message("sender@example.org", [f"{user}@corp.example.com"],
                           f"{tag} {n}", body or f"message {n} of run {tag}\n" + "x" * 1500,
                           message_id=f"<{message_id(tag, n)}>")


def deliver_many(dovecot: DovecotServer, user: str, raws: Iterable[bytes]) -> list[int]:
    """APPEND every message in one session (a session per message is ~100/s); gives UIDs."""
    uids = []
    with dovecot.client(user) as imap:
        for raw in raws:
            response = imap.append("INBOX", raw)
            text = response.decode() if isinstance(response, bytes) else str(response)
            uids.append(int(text.split("APPENDUID", 1)[1].split("]", 1)[0].split()[1]))
    return uids


def queue_depth(broker_url: str, name: str) -> int | None:
    """Messages ready in queue ``name`` now (None while it does not exist)."""
    try:
        with Connection(broker_url, connect_timeout=10) as connection:
            declared = connection.channel().queue_declare(name, passive=True)
    except Exception:  # not declared yet (the channel is closed with NOT_FOUND)
        return None
    return int(declared.message_count)


@contextmanager
def postgres_engine(url: str | None = None) -> Iterator[Engine]:
    """A migrated engine: on ``url`` if given, else a fresh database on the shared server."""
    if url is not None:
        engine = create_engine_for(url)
        upgrade(engine)
        try:
            yield engine
        finally:
            engine.dispose()
        return
    # imported here: importing tests.db_fixtures at collection time, before the modules that
    # register it as a plugin, would keep pytest from rewriting its asserts
    from tests.db_fixtures import fresh_postgres_database

    with fresh_postgres_database() as fresh, postgres_engine(fresh) as engine:
        yield engine


@dataclass
class Pipeline:
    root: Path
    dovecot: DovecotServer
    broker_url: str
    engine: Engine
    management_url: str = "http://127.0.0.1:15672"
    broker: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    mailbox: dict[str, Any] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)  # message id -> how many users

    def __post_init__(self) -> None:
        for user in USERS:
            if user not in self.dovecot._passwords:
                self.dovecot.add_user(user, f"{user}-secret")
        self.config = self.root / "mailroute.yaml"
        self.write_config()
        self.workers = Workers(self.config, self.root)

    def write_config(self, imap_port: int | None = None) -> None:
        profile = self.dovecot.server_profile()
        box = {"kind": "imap", "server": "dovecot", "interval": 0.2, "batch_size": 50,
               **self.mailbox}
        config = {
            "broker": {"url": self.broker_url, "prefix": "mail", "prefetch": 50,
                       "confirm_timeout": 5, "management_url": self.management_url,
                       **self.broker},
            "database": {"url": self.engine.url.render_as_string(hide_password=False)},
            "retry": {"attempts": 3, "initial_delay": 0.05, "max_delay": 1.0},
            "metrics": {"base_port": 0},
            # A SIGKILLed poller's mailboxes wait for its lease to run out: 3 s, not 60.
            "fleet": {"lease_seconds": 3},
            "servers": [{"name": "dovecot", "host": profile.host,
                         "port": imap_port or profile.port, "tls": "none", "timeout": 5,
                         **self.server}],
            "mailboxes": [{**box, "name": user, "username": user,
                           "password": f"{user}-secret"} for user in USERS],
            "users": [{"name": user, "address": f"{user}@corp.example.com", "mailbox": user}
                      for user in USERS],
        }
        self.config.write_text(yaml.safe_dump(config))

    # -- mail in -----------------------------------------------------------------------
    def send(self, user: str, tag: str, numbers: Iterable[int], body: str = "") -> list[int]:
        numbers = list(numbers)
        uids = deliver_many(self.dovecot, user,
                            (make_message(user, tag, n, body) for n in numbers))
        for n in numbers:
            self.sent[message_id(tag, n)] = 1
        return uids

    # -- workers -----------------------------------------------------------------------
    def start(self, *stages: str, fault: str | None = None) -> None:
        if fault is None:
            self.workers.start(*(stages or STAGES))
        else:
            self.workers.start(*stages, module="tests.faults.faulty_worker",
                               env={"FAULT_INJECT": fault})

    def stop(self) -> dict[str, int]:
        return self.workers.stop_all()

    # -- what the database holds ----------------------------------------------------------
    def persisted(self) -> int:
        emails = EmailStore(self.engine).tables.emails
        try:
            with self.engine.connect() as connection:
                return int(connection.execute(
                    select(func.count()).select_from(emails)).scalar_one())
        except Exception:  # the database may be down in a fault test
            return -1

    def wait_persisted(self, count: int | None = None, timeout: float = 240) -> None:
        want = len(self.sent) if count is None else count
        wait_for(lambda: self.persisted() >= want, f"{want} emails persisted", timeout=timeout,
                 on_timeout=lambda: f"{self.persisted()} persisted\n{self.workers.logs()}")

    def assert_exactly_once(self) -> None:
        """Every message sent is one email with one delivery per recipient; nothing else."""
        tables = EmailStore(self.engine).tables
        with self.engine.connect() as connection:
            emails = Counter(connection.execute(select(tables.emails.c.message_id)).scalars())
            per_email = Counter(mid for mid, in connection.execute(
                select(tables.emails.c.message_id).join(
                    tables.deliveries, tables.deliveries.c.email_id == tables.emails.c.id)))
        missing = sorted(set(self.sent) - set(emails))
        unexpected = sorted(set(emails) - set(self.sent))
        doubled = sorted(mid for mid, n in emails.items() if n > 1)
        wrong_deliveries = sorted(mid for mid in self.sent if per_email[mid] != self.sent[mid])
        assert not missing, f"{len(missing)} messages lost, e.g. {missing[:5]}"
        assert not unexpected, f"unexpected emails: {unexpected[:5]}"
        assert not doubled, f"{len(doubled)} recorded twice, e.g. {doubled[:5]}"
        assert not wrong_deliveries, f"wrong delivery count: {wrong_deliveries[:5]}"

    def queue_depth(self, name: str) -> int | None:
        return queue_depth(self.broker_url, name)

    def dead_letters(self) -> dict[str, list[tuple[bytes, dict[str, Any]]]]:
        """Take every dead letter from every stage's dead-letter queue."""
        taken: dict[str, list[tuple[bytes, dict[str, Any]]]] = {}
        with Connection(self.broker_url, connect_timeout=10) as connection:
            channel = connection.channel()
            for name in DEAD_QUEUES:
                bound = Queue(name, no_declare=True)(channel)
                while (message := bound.get(no_ack=False, accept=["json"])) is not None:
                    body = message.body if isinstance(message.body, bytes) else \
                        message.body.encode()
                    taken.setdefault(name, []).append((body, dict(message.headers or {})))
                    message.ack()
        return taken

    def assert_no_dead_letters(self) -> None:
        dead = self.dead_letters()
        assert not dead, {q: [h.get("x-mailroute-reason") for _, h in v]
                          for q, v in dead.items()}
