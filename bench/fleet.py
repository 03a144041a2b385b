"""The mailbox fleet benchmark: cover N mailboxes once with 1, 2, 4 pollers; IDLE latency.

Takes :class:`FleetBenchSettings`; starts its own Dovecot (``tests/dovecot.py``, a master user
so the mailboxes need no passwords), one PostgreSQL database per run and a RabbitMQ vhost;
gives :class:`~bench.common.Figure` values:

- **cover N with k pollers** (k = 1, 2, 4 ``mailroute worker ingest`` processes, 8 polls at a
  time each, every mailbox holding one message): mailboxes per second from the first poll to
  the last recorded in ``mailbox_state`` (process start-up excluded).  Ceiling: a bare
  imapclient loop in 8 threads doing only LOGIN, STATUS (UIDNEXT UIDVALIDITY) and LOGOUT per
  mailbox -- the least any poller must ask Dovecot for.
- **IDLE: APPEND -> raw on the broker**: a push mailbox held by one poller; the delay from
  starting the APPEND to the raw document arriving at a consumer of ``mail.parse``.  Ceiling:
  a bare imapclient IDLE session on the same folder seeing the EXISTS for the same APPEND.

Fails with :class:`~bench.common.BenchError` when a server is missing or a run does not
finish (a mailbox never polled within the time limit).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from imapclient import IMAPClient
from kombu import Connection, Queue

from bench.common import (
    REPO,
    BenchError,
    Figure,
    median,
    percentile,
    private_database,
    private_vhost,
    progress,
)
from persist.database import create_engine_for
from persist.mailbox_state import MailboxStateStore
from shared.settings import BrokerSettings
from shared.transport import Broker
from tests.dovecot import DovecotServer

MASTER = "benchmaster"
MASTER_PASSWORD = "bench-master-pw"
THREADS = 8
MESSAGE = (b"From: a@example.org\r\nTo: user@example.com\r\nSubject: fleet bench\r\n"
           b"Message-ID: <%s@bench>\r\n\r\nbody\r\n")


@dataclass(frozen=True)
class FleetBenchSettings:
    mailboxes: int = 2000
    pollers: tuple[int, ...] = (1, 2, 4)
    idle_samples: int = 20
    time_limit: float = 900.0


def run(settings: FleetBenchSettings) -> list[Figure]:
    with DovecotServer(tls=False) as dovecot:
        users = seed_mailboxes(dovecot, settings.mailboxes)
        progress(f"fleet: ceiling: bare LOGIN/STATUS/LOGOUT over {len(users)} mailboxes")
        ceiling = bare_cover_rate(dovecot, users)
        figures = []
        for count in settings.pollers:
            progress(f"fleet: covering {len(users)} mailboxes with {count} poller(s)")
            rate, detail = cover_with_pollers(dovecot, users, count, settings.time_limit)
            figures.append(Figure(f"cover {len(users)} mailboxes, {count} poller(s)", rate,
                                  "mbox/s", ceiling, detail=detail,
                                  reference="bare login+status"))
        progress(f"fleet: IDLE latency, {settings.idle_samples} samples")
        figures.append(idle_latency(dovecot, settings.idle_samples))
    return figures


def seed_mailboxes(dovecot: DovecotServer, count: int) -> list[str]:
    """Users fleet0000.. each with one message, written straight into their Maildirs."""
    dovecot.add_master_user(MASTER, MASTER_PASSWORD)
    uid, gid = os.stat(dovecot.mail_root).st_uid, os.stat(dovecot.mail_root).st_gid
    users = []
    for n in range(count):
        user = f"fleet{n:04d}"
        dovecot.add_user(user, f"unused-{n}")
        maildir = dovecot.maildir(user)
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        (maildir / "new" / f"{1_700_000_000 + n}.M1P1.bench").write_bytes(
            MESSAGE % user.encode())
        for path in (maildir.parent, maildir, *maildir.iterdir(),
                     *(maildir / "new").iterdir()):
            os.chown(path, uid, gid)
        users.append(user)
    return users


def bare_cover_rate(dovecot: DovecotServer, users: list[str]) -> float:
    def check(user: str) -> None:
        client = IMAPClient(dovecot.host, port=dovecot.imap_port, ssl=False, timeout=30)
        client.login(f"{user}*{MASTER}", MASTER_PASSWORD)
        client.folder_status("INBOX", [b"UIDNEXT", b"UIDVALIDITY"])
        client.logout()

    started = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(check, users))
    return len(users) / (time.monotonic() - started)


def _config(dovecot: DovecotServer, users: list[str], vhost_url: str, database_url: str,
            folder: Path, push: bool = False) -> Path:
    config = folder / "fleet.yaml"
    config.write_text(yaml.safe_dump({
        "log_level": "WARNING",
        "broker": {"url": vhost_url},
        "database": {"url": database_url},
        "metrics": {"base_port": -1},
        "fleet": {"lease_seconds": 30, "concurrency": THREADS},
        "servers": [{"name": "dovecot", "host": dovecot.host, "port": dovecot.imap_port,
                     "tls": "none", "timeout": 30, "interval": 3600 if not push else 600,
                     "master_user": MASTER, "master_password": MASTER_PASSWORD}],
        "mailboxes": [{"name": u, "server": "dovecot", "username": u, "after": "keep",
                       "push": push, "forward": push} for u in users],
    }))
    return config


@contextmanager
def pollers(config: Path, count: int, log_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    processes = []
    try:
        for n in range(count):
            with open(log_dir / f"poller{n}.log", "ab") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "shared.cli", "--config", str(config), "worker",
                     "ingest"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL))
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def cover_with_pollers(dovecot: DovecotServer, users: list[str], count: int,
                       time_limit: float) -> tuple[float, dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="mailroute-bench-fleet-") as tmp, \
            private_vhost("fleet") as vhost, private_database("fleet") as database_url:
        config = _config(dovecot, users, vhost.url, database_url, Path(tmp))
        Broker(BrokerSettings(url=vhost.url)).declare()
        engine = create_engine_for(database_url)
        store = MailboxStateStore(engine)
        launched = time.monotonic()
        try:
            with pollers(config, count, Path(tmp)) as processes:
                while True:
                    states = store.all_states()
                    done = [s for s in states if s.status == "success"]
                    if len(done) == len(users):
                        break
                    if any(p.poll() is not None for p in processes):
                        raise BenchError("an ingest poller died:\n" + _tail(Path(tmp)))
                    if time.monotonic() - launched > time_limit:
                        raise BenchError(f"only {len(done)} of {len(users)} mailboxes polled "
                                         f"within {time_limit:.0f} s")
                    time.sleep(0.2)
                wall = time.monotonic() - launched
            failing = sum(1 for s in states if s.status != "success")
            stamps = [s.last_poll_at for s in states if s.last_poll_at is not None]
            span = (max(stamps) - min(stamps)).total_seconds()
            fetched = sum(s.messages_fetched for s in states)
        finally:
            engine.dispose()
    if fetched != len(users):
        raise BenchError(f"{fetched} messages fetched from {len(users)} one-message mailboxes")
    return len(users) / max(span, 1e-6), {
        "pollers": count, "seconds_first_to_last_poll": round(span, 2),
        "seconds_including_start": round(wall, 2), "failing": failing,
        "messages_fetched": fetched, "polls_at_a_time_per_poller": THREADS}


def idle_latency(dovecot: DovecotServer, samples: int) -> Figure:
    user = "fleet0000"
    with tempfile.TemporaryDirectory(prefix="mailroute-bench-idle-") as tmp, \
            private_vhost("idle") as vhost, private_database("idle") as database_url:
        config = _config(dovecot, [user], vhost.url, database_url, Path(tmp), push=True)
        broker = Broker(BrokerSettings(url=vhost.url))
        broker.declare()
        queue = broker.topology.queue_for_edge("raw")
        arrivals = _Arrivals(vhost.url, queue)
        arrivals.start()
        bare = _BareIdle(dovecot, user)
        bare.start()
        delays, bare_delays = [], []
        try:
            with pollers(config, 1, Path(tmp)):
                arrivals.wait_for(1, 120)  # the catch-up poll of the seeded message
                time.sleep(2.0)  # the IDLE session settles
                for n in range(samples):
                    bare.seen.clear()
                    before = arrivals.count
                    started = time.monotonic()
                    dovecot.deliver(user, MESSAGE % f"idle-{n}".encode())
                    arrived = arrivals.wait_for(before + 1, 60)
                    delays.append(arrived - started)
                    if bare.seen.wait(30) and bare.seen_at is not None:
                        bare_delays.append(bare.seen_at - started)
                    time.sleep(0.3)
        finally:
            arrivals.stop()
            bare.stop()
    value = median(delays) * 1000
    ceiling = median(bare_delays) * 1000 if bare_delays else None
    return Figure("IDLE: APPEND -> raw on the broker", value, "ms", ceiling,
                  higher_is_better=False, reference="bare IDLE EXISTS",
                  detail={"samples": len(delays), "p50_ms": round(value, 1),
                          "p95_ms": round(percentile(delays, 0.95) * 1000, 1),
                          "max_ms": round(max(delays) * 1000, 1),
                          "bare_p50_ms": round(ceiling, 1) if ceiling else None,
                          "interval_s": 600})


class _Arrivals(threading.Thread):
    """Consumes the raw queue and timestamps each arrival."""

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(daemon=True)
        self._url = url
        self._queue = queue
        self._halt = threading.Event()
        self._cond = threading.Condition()
        self.count = 0
        self.times: list[float] = []

    def run(self) -> None:
        with Connection(self._url) as connection:
            def on_message(body: object, message: object) -> None:
                with self._cond:
                    self.count += 1
                    self.times.append(time.monotonic())
                    self._cond.notify_all()
                message.ack()  # type: ignore[attr-defined]

            with connection.Consumer(Queue(self._queue, no_declare=True),
                                     callbacks=[on_message], accept=["json"]):
                while not self._halt.is_set():
                    try:
                        connection.drain_events(timeout=0.5)
                    except TimeoutError:
                        continue

    def wait_for(self, count: int, timeout: float) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: self.count >= count, timeout):
                raise BenchError(f"raw message {count} did not arrive within {timeout:.0f} s")
            return self.times[count - 1]

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


class _BareIdle(threading.Thread):
    """An IDLE session of its own on the same folder: when does the server tell?"""

    def __init__(self, dovecot: DovecotServer, user: str) -> None:
        super().__init__(daemon=True)
        self._client = IMAPClient(dovecot.host, port=dovecot.imap_port, ssl=False, timeout=30)
        self._client.login(f"{user}*{MASTER}", MASTER_PASSWORD)
        self._client.select_folder("INBOX", readonly=True)
        self._halt = threading.Event()
        self.seen = threading.Event()
        self.seen_at: float | None = None

    def run(self) -> None:
        self._client.idle()
        while not self._halt.is_set():
            for response in self._client.idle_check(timeout=0.5):
                if len(response) > 1 and response[1] == b"EXISTS":
                    self.seen_at = time.monotonic()
                    self.seen.set()
        self._client.idle_done()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        try:
            self._client.logout()
        except Exception:
            progress("fleet: the bare IDLE session did not log out cleanly")


def _tail(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-2000:] for p in folder.glob("*.log"))
