"""The ingest benchmark: messages per second from one Dovecot mailbox into the broker.

Takes :class:`IngestSettings`; gives figures.  A private Dovecot (tests/dovecot.py) holds
``messages`` mails of about 20 KB in one mailbox.  Measured, alternating in each round:

- ours: one :class:`~ingest.worker.IngestWorker` poll of the mailbox (``after: keep``, the
  cursor starting from nothing), publishing every message to a private RabbitMQ vhost with
  confirms and saving its cursor in PostgreSQL after each batch of ``batch_size``;
- the ceiling: imapclient alone, the same ``UID SEARCH`` and ``UID FETCH BODY.PEEK[]`` in
  the same batch size, doing nothing with the bodies; and, for information only, the same
  with imaplib's debug trace (which imapclient switches on) turned off as the poller does,
  and the broker alone: the same documents, encoded beforehand, published in the same
  batches with pipelined confirms (what the poller's publishing can reach at best);
- the peer: ``mbsync`` (Debian's isync) pulling the mailbox into a fresh Maildir, and
  ``fetchmail`` handing each message to ``cat >/dev/null``, when installed
  (``apt-get install isync fetchmail``); a missing one is reported, not an error.

Fails with :class:`~bench.common.BenchError` when Dovecot cannot start or a count is short.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imapclient import IMAPClient

from bench.common import BenchError, Figure, median, private_database, private_vhost, progress
from bench.mail import html_mail
from ingest.imap_source import quiet_imaplib
from ingest.worker import IngestWorker
from persist.database import create_engine_for
from persist.mailbox_state import MailboxStateStore
from shared.metrics import Metrics
from shared.schemas import Codec
from shared.secrets import Secret
from shared.settings import BrokerSettings, MailboxSettings, Settings
from shared.transport import Broker, Envelope
from tests.dovecot import DovecotServer

TARGET = 5000.0
USER = "bench"
PASSWORD = "bench-secret"


@dataclass(frozen=True)
class IngestSettings:
    messages: int = 5000
    message_size: int = 20_000
    batch_size: int = 200
    rounds: int = 3
    seed: int = 8


def mails(settings: IngestSettings) -> Iterator[bytes]:
    rng = random.Random(settings.seed)
    pool = [html_mail(rng, f"<pool-{i}@example.net>", settings.message_size)
            for i in range(32)]
    for index in range(settings.messages):
        yield pool[index % len(pool)].replace(
            f"<pool-{index % len(pool)}@example.net>".encode(),
            f"<ingest-{index:07d}@example.net>".encode())


def fill(server: DovecotServer, settings: IngestSettings) -> None:
    with server.client(USER) as imap:
        for raw in mails(settings):
            imap.append("INBOX", raw)


def broker_rate(settings: IngestSettings, broker_url: str) -> float:
    """The broker alone: the same raw documents, encoded beforehand (not timed), published
    in the same batches with pipelined confirms into the same topology."""
    broker = Broker(BrokerSettings(url=broker_url))
    broker.declare()
    codec = Codec()
    now = datetime.now(UTC)
    topology = broker.topology
    envelopes = [
        Envelope(codec.encode("raw", {"trace_id": uuid.uuid4().hex, "raw": raw, "source": {
            "mailbox": "bench", "mailbox_kind": "direct", "folder": "INBOX", "uidvalidity": 1,
            "uid": str(index + 1), "received_at": now, "fetched_at": now}}),
            topology.exchange_name, topology.queue_for_edge("raw"))
        for index, raw in enumerate(mails(settings))]
    publisher = broker.publisher()
    try:
        started = time.perf_counter()
        for start in range(0, len(envelopes), settings.batch_size):
            publisher.publish_envelopes(envelopes[start:start + settings.batch_size])
        return len(envelopes) / (time.perf_counter() - started)
    finally:
        publisher.close()


def imapclient_rate(server: DovecotServer, settings: IngestSettings,
                    quiet: bool = False) -> float:
    started = time.perf_counter()
    fetched = 0
    imap = IMAPClient(server.host, port=server.imap_port, ssl=False, timeout=60)
    if quiet:
        quiet_imaplib(imap)
    try:
        imap.login(USER, PASSWORD)
        imap.select_folder("INBOX", readonly=True)
        uids = sorted(imap.search(["UID", "1:*"]))
        for start in range(0, len(uids), settings.batch_size):
            response = imap.fetch(uids[start:start + settings.batch_size],
                                  (b"BODY.PEEK[]", b"INTERNALDATE"))
            fetched += sum(1 for data in response.values() if b"BODY[]" in data)
    finally:
        imap.logout()
    if fetched != settings.messages:
        raise BenchError(f"ingest: imapclient fetched {fetched} of {settings.messages}")
    return fetched / (time.perf_counter() - started)


def ours_rate(server: DovecotServer, settings: IngestSettings, broker_url: str,
              database_url: str) -> float:
    config = Settings(broker=BrokerSettings(url=broker_url),
                      servers=(server.server_profile(),),
                      mailboxes=(MailboxSettings(name="bench", server="dovecot",
                                                 username=USER, password=Secret(PASSWORD),
                                                 after="keep",
                                                 batch_size=settings.batch_size),))
    config = replace(config, servers=(replace(config.servers[0], timeout=60.0),))
    broker = Broker(config.broker)
    broker.declare()
    engine = create_engine_for(database_url)
    publisher = broker.publisher()
    try:
        worker = IngestWorker(config, publisher, MailboxStateStore(engine), Metrics())
        started = time.perf_counter()
        count = worker.poll_once(config.mailboxes[0])
        elapsed = time.perf_counter() - started
    finally:
        publisher.close()
        engine.dispose()
    if count != settings.messages:
        raise BenchError(f"ingest: the poller published {count} of {settings.messages}")
    return count / elapsed


def mbsync_rate(server: DovecotServer, settings: IngestSettings) -> float | None:
    if shutil.which("mbsync") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="mailroute-mbsync-") as work:
        root = Path(work)
        (root / "maildir").mkdir()
        (root / "mbsyncrc").write_text(
            "FSync no\n\n"
            f"IMAPAccount bench\nHost {server.host}\nPort {server.imap_port}\nUser {USER}\n"
            f"Pass {PASSWORD}\nSSLType None\nAuthMechs LOGIN\n\n"
            f"IMAPStore far\nAccount bench\n\n"
            f"MaildirStore near\nPath {root}/maildir/\nInbox {root}/maildir/INBOX\n\n"
            "Channel bench\nFar :far:\nNear :near:\nPatterns INBOX\nCreate Near\n"
            "Sync Pull\nSyncState *\n")
        started = time.perf_counter()
        result = subprocess.run(["mbsync", "-c", str(root / "mbsyncrc"), "-q", "bench"],
                                capture_output=True, timeout=1800, check=False)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise BenchError(f"ingest: mbsync failed: {result.stderr.decode()[-500:]}")
        count = sum(1 for _ in (root / "maildir" / "INBOX").glob("*/*"))
    if count != settings.messages:
        raise BenchError(f"ingest: mbsync pulled {count} of {settings.messages}")
    return count / elapsed


def fetchmail_rate(server: DovecotServer, settings: IngestSettings) -> float | None:
    if shutil.which("fetchmail") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="mailroute-fetchmail-") as work:
        rc = Path(work) / "fetchmailrc"
        rc.write_text(f'poll {server.host} port {server.imap_port} protocol IMAP\n'
                      f'  user "{USER}" password "{PASSWORD}"\n'
                      f'  keep fetchall sslproto "" mda "cat >/dev/null"\n')
        rc.chmod(0o600)
        started = time.perf_counter()
        result = subprocess.run(
            ["fetchmail", "-f", str(rc), "--nodetach", "--silent", "--pidfile",
             str(Path(work) / "pid"), "--idfile", str(Path(work) / "ids")],
            capture_output=True, timeout=1800, check=False,
            env={"HOME": work, "PATH": "/usr/bin:/bin"})
        elapsed = time.perf_counter() - started
        if result.returncode not in (0, 1):
            raise BenchError(f"ingest: fetchmail failed ({result.returncode}): "
                             f"{result.stderr.decode()[-500:]}")
    return settings.messages / elapsed


def run(settings: IngestSettings) -> tuple[list[Figure], dict[str, Any]]:
    server = DovecotServer(tls=False)
    server.add_user(USER, PASSWORD)
    ours: list[float] = []
    bare: list[float] = []
    quiet: list[float] = []
    broker_only: list[float] = []
    peers: dict[str, list[float]] = {"mbsync": [], "fetchmail": []}
    missing: list[str] = []
    try:
        server.start()
        progress(f"ingest: filling one mailbox with {settings.messages} messages of "
                 f"~{settings.message_size // 1000} KB")
        fill(server, settings)
        for round_number in range(settings.rounds):
            with private_vhost("ingest") as vhost, private_database("ingest") as database:
                progress(f"ingest round {round_number + 1}: imapclient alone")
                bare.append(imapclient_rate(server, settings))
                progress(f"ingest round {round_number + 1}: imapclient, imaplib trace off")
                quiet.append(imapclient_rate(server, settings, quiet=True))
                progress(f"ingest round {round_number + 1}: one poller into the broker")
                ours.append(ours_rate(server, settings, vhost.url, database))
            with private_vhost("ingest-broker") as vhost:
                progress(f"ingest round {round_number + 1}: the broker alone")
                broker_only.append(broker_rate(settings, vhost.url))
            for name, measure in (("mbsync", mbsync_rate), ("fetchmail", fetchmail_rate)):
                progress(f"ingest round {round_number + 1}: {name}")
                rate = measure(server, settings)
                if rate is None:
                    missing.append(name)
                else:
                    peers[name].append(rate)
    finally:
        server.stop()
    value = median(ours)
    figures = [Figure("ingest msg/s (one poller -> broker)", value, "msg/s", median(bare),
                      target=f">= {TARGET:,.0f} and >= 0.9 of imapclient",
                      meets_target=value >= TARGET and value >= 0.9 * median(bare),
                      reference="imapclient", detail={"rounds": ours, "ceiling_rounds": bare}),
               Figure("ingest vs imapclient, trace off", value, "msg/s", median(quiet),
                      reference="imapclient-quiet", detail={"ceiling_rounds": quiet}),
               Figure("ingest vs the broker alone", value, "msg/s", median(broker_only),
                      reference="broker", detail={"ceiling_rounds": broker_only})]
    for name, rates in peers.items():
        if rates:
            figures.append(Figure(f"ingest vs {name}", value, "msg/s", median(rates),
                                  target=">= 3x" if name == "fetchmail" else "",
                                  meets_target=(value >= 3 * median(rates)
                                                if name == "fetchmail" else None),
                                  reference=name, detail={"peer_rounds": rates}))
    return figures, {"peers_missing": sorted(set(missing))}
