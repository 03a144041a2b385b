"""What the forwarding-rule integration tests share: Dovecot with Sieve, their config, records.

Takes nothing at import; gives :func:`sieve_dovecot` (a DovecotServer with Pigeonhole:
ManageSieve, LMTP delivery with Sieve; the users :data:`USERS` and ``forward`` with
:func:`password`, and the master user :data:`ADMIN`), :func:`write_config` (a ``mailroute``
configuration for the forward mailbox and each user's rule on that server, plus any extra
sections a test adds) and :func:`deliveries` (the records made, for comparing).  Each test
module wraps :func:`sieve_dovecot` in a fixture of the scope it needs.  Fails as
DovecotServer does when Dovecot or Pigeonhole is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.engine import Engine

from persist.store import EmailStore
from tests.broker_fixtures import Vhost
from tests.dovecot import DovecotServer

DOMAIN = "corp.example.com"
FORWARD = f"forward@{DOMAIN}"
USERS = ("alice", "bob", "carol")
ADMIN, ADMIN_PASSWORD = "mailroute-admin", "admin-pass-sieve-7"


def password(user: str) -> str:
    return f"{user}-password"


@contextmanager
def sieve_dovecot() -> Iterator[DovecotServer]:
    """A started Dovecot with Sieve for :data:`USERS`, ``forward`` and :data:`ADMIN`."""
    server = DovecotServer(tls=False, sieve=True)
    for user in (*USERS, "forward"):
        server.add_user(user, password(user))
    server.add_master_user(ADMIN, ADMIN_PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def write_config(path: Path, dovecot: DovecotServer, vhost: Vhost, engine: Engine,
                 **extra: Any) -> Path:
    """Write the configuration: the forward mailbox ``forward`` polled over IMAP, every user
    forwarding there through a rule on the ``sieve`` rule server; ``extra`` adds sections
    (``canaries``, ...)."""
    config: dict[str, Any] = {
        "broker": {"url": vhost.url, "prefix": "mail", "confirm_timeout": 10},
        "database": {"url": engine.url.render_as_string(hide_password=False)},
        "retry": {"attempts": 3, "initial_delay": 0.05, "max_delay": 1.0},
        "metrics": {"base_port": 0},
        "servers": [{"name": "mail", "host": dovecot.host, "port": dovecot.imap_port,
                     "tls": "none"}],
        "mailboxes": [{"name": "forward", "kind": "imap", "server": "mail", "interval": 0.3,
                       "username": "forward", "password": password("forward"),
                       "forward": True, "address": FORWARD}],
        "rule_servers": [{"name": "sieve", "host": dovecot.host, "port": dovecot.sieve_port,
                          "tls": "none", "admin_user": ADMIN,
                          "admin_password": ADMIN_PASSWORD}],
        "users": [{"name": user, "address": f"{user}@{DOMAIN}", "forward": "forward",
                   "rule": {"server": "sieve"}} for user in USERS],
        **extra,
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
