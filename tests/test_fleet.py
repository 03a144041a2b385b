"""The mailbox fleet in one process, on a real Dovecot: logins, POP3, push, health, resets.

One Dovecot per module (with a master user and the XOAUTH2 mechanism), a SQLite state and
lease database and a private memory-transport prefix per test.  Every test logs at DEBUG and
its teardown scans the captured log and every database table for the passwords and tokens
it used (RELIABILITY.md fault 33).
"""

from __future__ import annotations

import dataclasses
import imaplib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient
from sqlalchemy import select
from sqlalchemy.engine import Engine

from ingest.credentials import Credentials
from ingest.errors import MailboxUnavailable
from ingest.fleet import FleetPoller
from ingest.imap_source import ImapSource
from ingest.pop3_source import Pop3Source
from ingest.worker import IngestWorker
from persist.database import create_engine_for, upgrade
from persist.mailbox_leases import LeaseStore
from persist.mailbox_state import Cursor, MailboxStateStore
from persist.tables import build_tables
from shared.metrics import Metrics
from shared.schemas import Codec
from shared.secrets import Secret
from shared.settings import (
    BrokerSettings,
    FleetSettings,
    MailboxSettings,
    ServerProfile,
    Settings,
)
from shared.transport import Broker
from tests.broker_fixtures import drain_queue
from tests.dovecot import DovecotServer, dovecot_fixture
from tests.processes import wait_for
from tests.tcp_proxy import StallableProxy

dovecot = dovecot_fixture(scope="module")

MASTER = "fleetadmin"
MASTER_PASSWORD = "master-pw-Zq81"


def message(marker: str) -> bytes:
    return (f"From: someone@example.org\r\nTo: alice@example.com\r\n"
            f"Message-ID: <{marker}@example.org>\r\nSubject: {marker}\r\n\r\n"
            f"body of {marker}\r\n").encode()


def marker_of(raw: bytes) -> str:
    return raw.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()


@dataclass
class Fleet:
    dovecot: DovecotServer
    broker: Broker
    engine: Engine
    secrets: list[str] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    codec: Codec = field(default_factory=Codec)

    @property
    def state(self) -> MailboxStateStore:
        return MailboxStateStore(self.engine)

    @property
    def leases(self) -> LeaseStore:
        return LeaseStore(self.engine)

    def user(self, password: str | None = None) -> str:
        name = f"u{uuid.uuid4().hex[:10]}"
        password = password or f"pw-{uuid.uuid4().hex}"
        self.secrets.append(password)
        self.dovecot.add_user(name, password)
        return name

    def profile(self, **kw: Any) -> ServerProfile:
        return dataclasses.replace(self.dovecot.server_profile("dovecot"), **kw)

    def box(self, user: str, **kw: Any) -> MailboxSettings:
        fields: dict[str, Any] = {"name": f"box-{user}", "server": "dovecot", "username": user,
                                  "batch_size": 50}
        if "password" not in kw and kw.get("kind") != "maildir":
            fields["password"] = Secret(self.dovecot.password(user))
        fields.update(kw)
        return MailboxSettings(**fields)

    def settings(self, *boxes: MailboxSettings, profile: ServerProfile | None = None,
                 **fleet: Any) -> Settings:
        fleet_settings = FleetSettings(**{"lease_seconds": 6.0, "concurrency": 4, **fleet})
        return Settings(broker=self.broker.settings, mailboxes=boxes, fleet=fleet_settings,
                        servers=(profile or self.profile(),))

    def worker(self, settings: Settings, credentials: Credentials | None = None) -> IngestWorker:
        return IngestWorker(settings, self.broker.publisher(), self.state, self.metrics,
                            credentials=credentials, resets=self.leases)

    @contextmanager
    def running(self, settings: Settings) -> Iterator[FleetPoller]:
        poller = FleetPoller(settings, self.broker.publisher, self.state, self.leases,
                             self.metrics)
        stop = threading.Event()
        thread = threading.Thread(target=poller.run, args=(stop,), name="fleet")
        thread.start()
        try:
            yield poller
        finally:
            stop.set()
            thread.join(timeout=60)
            assert not thread.is_alive()

    def published(self) -> list[dict[str, Any]]:
        queue = self.broker.topology.queue_for_edge("raw")
        return [self.codec.decode("raw", body)
                for body, _ in drain_queue(self.broker.settings.url, queue)]

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def fleet(dovecot: DovecotServer, tmp_path: Path,
          caplog: pytest.LogCaptureFixture) -> Iterator[Fleet]:
    yield from make_fleet(dovecot, tmp_path, caplog)


# Fault 20: a server that allows two connections per user and address, as Dovecot's
# mail_max_userip_connections does (10 by default).
limited_dovecot = dovecot_fixture(scope="module",
                                  extra_config="mail_max_userip_connections = 2\n")


@pytest.fixture
def limited_fleet(limited_dovecot: DovecotServer, tmp_path: Path,
                  caplog: pytest.LogCaptureFixture) -> Iterator[Fleet]:
    yield from make_fleet(limited_dovecot, tmp_path, caplog)


def make_fleet(dovecot: DovecotServer, tmp_path: Path,
               caplog: pytest.LogCaptureFixture) -> Iterator[Fleet]:
    caplog.set_level(logging.DEBUG)
    engine = create_engine_for(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(engine)
    broker = Broker(BrokerSettings(url="memory://", prefix=f"f{uuid.uuid4().hex[:12]}"))
    broker.declare()
    dovecot.add_master_user(MASTER, MASTER_PASSWORD)
    f = Fleet(dovecot, broker, engine, secrets=[MASTER_PASSWORD])
    yield f
    assert_no_secret_in(caplog.text, engine, f.secrets)
    engine.dispose()


def assert_no_secret_in(log_text: str, engine: Engine, secrets: list[str]) -> None:
    """Fault 33: no password or token in the log or anywhere in the database."""
    dumped = []
    with engine.connect() as connection:
        for table in build_tables().metadata.sorted_tables:
            for row in connection.execute(select(table)):
                dumped.append(repr(tuple(row)))
    database = "\n".join(dumped)
    for secret in secrets:
        assert secret not in log_text, "a secret reached the log"
        assert secret not in database, "a secret reached the database"


# ---- logins: master user, SASL authzid, XOAUTH2 -------------------------------------------


@pytest.mark.parametrize("mode", ["separator", "authzid"])
def test_a_master_user_profile_polls_mailboxes_without_their_passwords(
        fleet: Fleet, mode: str) -> None:
    users = [fleet.user() for _ in range(3)]
    for user in users:
        fleet.dovecot.deliver(user, message(f"m-{user}"))
    profile = fleet.profile(master_user=MASTER, master_password=Secret(MASTER_PASSWORD),
                            master_mode=mode)
    boxes = [fleet.box(u, password=None) for u in users]
    with fleet.running(fleet.settings(*boxes, profile=profile)):
        wait_for(lambda: all(s.status == "success" for s in fleet.state.all_states())
                 and len(fleet.state.all_states()) == 3, "three mailboxes polled", 60)
    got = sorted(marker_of(d["raw"]) for d in fleet.published())
    assert got == sorted(f"m-{u}" for u in users)


def test_a_wrong_master_password_disables_every_mailbox_of_the_profile(fleet: Fleet) -> None:
    user = fleet.user()
    profile = fleet.profile(master_user=MASTER, master_password=Secret("not-the-master-pw"))
    fleet.secrets.append("not-the-master-pw")
    box = fleet.box(user, password=None)
    with fleet.running(fleet.settings(box, profile=profile)):
        wait_for(lambda: (fleet.leases.get(box.name) or _no_lease()).disabled_reason is not None,
                 "the mailbox disabled", 60)


def _no_lease() -> Any:
    return dataclasses.make_dataclass("L", [("disabled_reason", Any)])(None)


def test_xoauth2_uses_the_token_refreshes_it_once_when_refused_then_fails(
        fleet: Fleet, tmp_path: Path) -> None:
    token_file = tmp_path / "token.json"
    token_file.write_text('{"access_token": "tok-one-7Hq", "expires_in": 3600}')
    user = fleet.user(password="tok-one-7Hq")
    fleet.secrets += ["tok-two-9Kxx", "tok-three-2Lm"]
    fleet.dovecot.deliver(user, message("oauth-1"))
    profile = fleet.profile(auth="xoauth2", oauth2_token_file=str(token_file))
    box = fleet.box(user, password=None)
    settings = fleet.settings(box, profile=profile)
    credentials = Credentials()
    worker = fleet.worker(settings, credentials)
    assert worker.poll_once(box) == 1
    # The server now wants a newer token; the cached one is refused, so it is fetched again.
    change_password(fleet.dovecot, user, "tok-two-9Kxx")
    token_file.write_text("tok-two-9Kxx\n")
    fleet.dovecot.deliver(user, message("oauth-2"))
    assert worker.poll_once(box) == 1
    source = credentials.login_for(box, profile).tokens
    assert source is not None and source.fetches == 2
    # A refresh that does not help: failing (transient), not an auth error that disables.
    change_password(fleet.dovecot, user, "tok-three-2Lm")
    with pytest.raises(MailboxUnavailable, match="fresh token"):
        worker.poll_once(box)
    state = fleet.state.state_of(box.name, box.folder)
    assert state is not None and state.status == "failing"
    assert sorted(marker_of(d["raw"]) for d in fleet.published()) == ["oauth-1", "oauth-2"]


def change_password(dovecot: DovecotServer, user: str, password: str) -> None:
    """Dovecot re-reads a passwd-file whose mtime or size changed: make sure both did."""
    dovecot.add_user(user, password)
    path = dovecot.passwd_dir / user.lower()
    later = time.time() + 2
    os.utime(path, (later, later))

    def accepted() -> bool:
        try:
            dovecot.client(user).logout()
        except Exception:
            return False
        return True

    wait_for(accepted, "the new password", 30)


def test_xoauth2_over_pop3_with_a_token_command(fleet: Fleet) -> None:
    user = fleet.user(password="pop-token-5Rt")
    fleet.dovecot.deliver(user, message("pop-oauth"))
    profile = fleet.profile(port=fleet.dovecot.pop3_port, auth="xoauth2",
                            oauth2_token_command="echo pop-token-5Rt")
    box = fleet.box(user, kind="pop3", password=None, after="keep")
    assert fleet.worker(fleet.settings(box, profile=profile)).poll_once(box) == 1


# ---- POP3 --------------------------------------------------------------------------------


def pop3(fleet: Fleet, **kw: Any) -> tuple[MailboxSettings, Settings]:
    user = fleet.user()
    box = fleet.box(user, kind="pop3", **kw)
    profile = fleet.profile(port=fleet.dovecot.pop3_port, tls="starttls",
                            ca_file=str(fleet.dovecot.cert_path))
    return box, fleet.settings(box, profile=profile)


def test_pop3_tracks_uidls_and_keeps_messages_when_told(fleet: Fleet) -> None:
    box, settings = pop3(fleet, after="keep")
    user = box.username or ""
    for n in range(3):
        fleet.dovecot.deliver(user, message(f"p{n}"))
    worker = fleet.worker(settings)
    assert worker.poll_once(box) == 3
    assert worker.poll_once(box) == 0
    fleet.dovecot.deliver(user, message("p3"))
    assert worker.poll_once(box) == 1
    assert len(fleet.dovecot.uids(user)) == 4
    assert sorted(marker_of(d["raw"]) for d in fleet.published()) == ["p0", "p1", "p2", "p3"]


def test_pop3_deletes_after_processing(fleet: Fleet) -> None:
    box, settings = pop3(fleet, after="delete")
    user = box.username or ""
    for n in range(2):
        fleet.dovecot.deliver(user, message(f"d{n}"))
    worker = fleet.worker(settings)
    assert worker.poll_once(box) == 2
    assert fleet.dovecot.uids(user) == []
    assert len(fleet.state.seen_uidls(box.name)) == 2
    assert worker.poll_once(box) == 0
    assert fleet.state.seen_uidls(box.name) == set()  # gone from the server: forgotten


def test_pop3_refuses_a_certificate_it_cannot_verify(fleet: Fleet) -> None:
    box, settings = pop3(fleet, after="keep")
    unverifiable = dataclasses.replace(settings.server("dovecot"), ca_file=None)
    worker = fleet.worker(dataclasses.replace(settings, servers=(unverifiable,)))
    with pytest.raises(MailboxUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        worker.poll_once(box)


class DroppedBeforeQuit(Pop3Source):
    """The session dies after the DELEs, before QUIT: the server keeps the messages."""

    def __exit__(self, *exc: Any) -> None:
        self._drop()


def test_pop3_dropped_after_dele_before_quit_hands_nothing_on_twice(fleet: Fleet) -> None:
    box, settings = pop3(fleet, after="delete")
    user = box.username or ""
    for n in range(2):
        fleet.dovecot.deliver(user, message(f"q{n}"))
    profile = settings.server("dovecot")
    dropping = IngestWorker(settings, fleet.broker.publisher(), fleet.state, fleet.metrics,
                            source_factory=lambda b: DroppedBeforeQuit(
                                b, profile, fleet.state.seen_uidls(b.name)))
    assert dropping.poll_once(box) == 2
    assert len(fleet.dovecot.uids(user)) == 2  # DELE never took effect
    assert fleet.worker(settings).poll_once(box) == 0
    assert fleet.dovecot.uids(user) == []
    assert sorted(marker_of(d["raw"]) for d in fleet.published()) == ["q0", "q1"]


# ---- health ----------------------------------------------------------------------------


def test_a_wrong_password_disables_the_mailbox_with_an_alert(
        fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    bad_user, good_user = fleet.user(), fleet.user()
    fleet.dovecot.deliver(good_user, message("good"))
    fleet.secrets.append("wrong-password-Pq3")
    bad = fleet.box(bad_user, password=Secret("wrong-password-Pq3"), interval=0.2)
    good = fleet.box(good_user, interval=0.2)
    with fleet.running(fleet.settings(bad, good)):
        wait_for(lambda: fleet.sample("mailroute_mailbox_alerts_total", mailbox=bad.name,
                                      kind="auth") == 1, "the auth alert", 60)
        polls = fleet.sample("mailroute_mailbox_polls_total", mailbox=good.name,
                             outcome="success")
        wait_for(lambda: fleet.sample("mailroute_mailbox_polls_total", mailbox=good.name,
                                      outcome="success") >= polls + 2,
                 "the good mailbox still polled", 60)
        # Disabled means not polled: one failed poll, no matter how often the others run.
        assert fleet.sample("mailroute_mailbox_polls_total", mailbox=bad.name,
                            outcome="failure") == 1
    lease = fleet.leases.get(bad.name)
    assert lease is not None and "refused" in (lease.disabled_reason or "")
    state = fleet.state.state_of(bad.name, bad.folder)
    assert state is not None and state.status == "disabled"
    assert fleet.sample("mailroute_mailbox_status", mailbox=bad.name, status="disabled") == 1
    assert f"ALERT mailbox {bad.name} disabled" in caplog.text
    assert fleet.leases.enable(bad.name)
    assert fleet.leases.claim("me", [bad.name], 5, 1) == [bad.name]


def test_an_unreachable_server_backs_off_and_never_disables(fleet: Fleet) -> None:
    user = fleet.user()
    profile = fleet.profile(port=1, timeout=2.0)  # nothing listens on port 1
    box = fleet.box(user, interval=0.05)
    with fleet.running(fleet.settings(box, profile=profile, max_backoff=0.4)):
        wait_for(lambda: (fleet.state.state_of(box.name, box.folder) or _no_state())
                 .consecutive_failures >= 3, "three failed polls", 60)
    lease = fleet.leases.get(box.name)
    assert lease is not None and lease.disabled_reason is None
    state = fleet.state.state_of(box.name, box.folder)
    assert state is not None and state.status == "failing" and "ConnectionRefused" in (
        state.last_error or "")


@pytest.mark.parametrize("kind, command", [("imap", b"LOGIN"), ("pop3", b"PASS")])
def test_a_connection_lost_during_login_is_a_failed_poll_not_refused_credentials(
        fleet: Fleet, kind: str, command: bytes) -> None:
    # What a Dovecot restart looks like from the client: greeting, then EOF at LOGIN.
    user = fleet.user()
    fleet.dovecot.deliver(user, message("after-restart"))
    port = fleet.dovecot.imap_port if kind == "imap" else fleet.dovecot.pop3_port
    with StallableProxy(fleet.dovecot.host, port) as proxy:
        proxy.drop_on(command)
        box = fleet.box(user, kind=kind, after="keep", interval=0.05)
        profile = fleet.profile(port=proxy.port, tls="none")
        with fleet.running(fleet.settings(box, profile=profile, max_backoff=0.2)):
            wait_for(lambda: (fleet.state.state_of(box.name, box.folder) or _no_state())
                     .consecutive_failures >= 2, "two failed polls", 60)
        lease = fleet.leases.get(box.name)
        assert lease is not None and lease.disabled_reason is None
        assert fleet.sample("mailroute_mailbox_alerts_total", mailbox=box.name, kind="auth") == 0
        state = fleet.state.state_of(box.name, box.folder)
        assert state is not None and state.status == "failing"
        assert "not a credentials failure" in (state.last_error or "") or \
            "EOF" in (state.last_error or "")
        proxy.drop_on(b"\0never")  # the server is back: the next poll goes through
        assert fleet.worker(fleet.settings(box, profile=profile)).poll_once(box) == 1


def test_only_a_servers_refusal_counts_as_refused_credentials() -> None:
    from imapclient.exceptions import LoginError

    from ingest import imap_source, pop3_source
    assert imap_source.refused_by_server(LoginError("b'[AUTHENTICATIONFAILED] failed.'"))
    assert not imap_source.refused_by_server(
        LoginError("b'[UNAVAILABLE] Temporary authentication failure.'"))
    try:
        try:
            raise imaplib.IMAP4.abort("socket error: EOF")
        except imaplib.IMAP4.abort as exc:
            raise LoginError(str(exc)) from None
    except LoginError as wrapped:
        assert not imap_source.refused_by_server(wrapped)
    assert pop3_source.refused_by_server("-ERR [AUTH] Authentication failed.")
    assert pop3_source.refused_by_server("-ERR Authentication failed.")
    assert not pop3_source.refused_by_server("-ERR EOF")
    assert not pop3_source.refused_by_server("-ERR [SYS/TEMP] Try again later")
    assert not pop3_source.refused_by_server("-ERR [IN-USE] Mailbox locked")


# ---- connection limits (fault 20) --------------------------------------------------------


def test_folders_of_one_account_share_its_connection_cap_and_all_mail_arrives(
        limited_fleet: Fleet) -> None:
    fleet = limited_fleet
    user = fleet.user()
    folders = ["INBOX", "Projects", "Archive"]
    for folder in folders:
        fleet.dovecot.deliver(user, message(f"cap-{folder}"), folder=folder)
    boxes = [fleet.box(user, name=f"{user}-{folder}", folder=folder, after="keep",
                       interval=0.05) for folder in folders]
    # Three mailboxes due at once, four poll slots, one connection of ours at a time: two
    # wait.  (One below the server's two: Dovecot counts a connection for a moment after
    # its LOGOUT, so a cap equal to the server's meets NO [LIMIT] now and then.)
    settings = fleet.settings(*boxes, profile=fleet.profile(max_connections=1), concurrency=4)
    with fleet.running(settings):
        wait_for(lambda: all(fleet.sample("mailroute_mailbox_polls_total", mailbox=b.name,
                                          outcome="success") >= 1 for b in boxes),
                 "every folder polled", 60)
    assert sum(fleet.sample("mailroute_mailbox_deferred_total", mailbox=b.name)
               for b in boxes) >= 1
    assert sum(fleet.sample("mailroute_mailbox_polls_total", mailbox=b.name,
                            outcome="failure") for b in boxes) == 0
    assert sorted(marker_of(d["raw"]) for d in fleet.published()) == \
        sorted(f"cap-{folder}" for folder in folders)


def test_the_servers_connection_limit_backs_off_and_never_disables(
        limited_fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    fleet = limited_fleet
    user = fleet.user()
    fleet.dovecot.deliver(user, message("limit"))
    box = fleet.box(user, after="keep", interval=0.05)
    # Another program holds both connections the server allows this user.
    others = [IMAPClient(fleet.dovecot.host, port=fleet.dovecot.imap_port, ssl=False)
              for _ in range(2)]
    for other in others:
        other.login(user, fleet.dovecot.password(user))
    try:
        with fleet.running(fleet.settings(box, max_backoff=0.2)):
            wait_for(lambda: (fleet.state.state_of(box.name, box.folder) or _no_state())
                     .consecutive_failures >= 2, "two polls turned away", 60)
            state = fleet.state.state_of(box.name, box.folder)
            assert state is not None and "[LIMIT]" in (state.last_error or "")
            for other in others:
                other.logout()
            others = []
            wait_for(lambda: fleet.sample("mailroute_mailbox_polls_total", mailbox=box.name,
                                          outcome="success") >= 1,
                     "a poll once the connections are free", 60)
    finally:
        for other in others:
            other.logout()
    lease = fleet.leases.get(box.name)
    assert lease is not None and lease.disabled_reason is None
    assert fleet.sample("mailroute_mailbox_alerts_total", mailbox=box.name, kind="auth") == 0
    assert "ALERT" not in caplog.text
    assert [marker_of(d["raw"]) for d in fleet.published()] == ["limit"]


def _no_state() -> Any:
    return dataclasses.make_dataclass("S", [("consecutive_failures", int)])(0)


def test_backoff_doubles_with_jitter_up_to_the_cap(fleet: Fleet) -> None:
    poller = FleetPoller(fleet.settings(max_backoff=100.0), fleet.broker.publisher,
                         fleet.state, fleet.leases, fleet.metrics)
    for failures, base in ((1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0), (9, 100.0)):
        delays = {poller.backoff(10.0, failures) for _ in range(50)}
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
        assert len(delays) > 1  # jittered


# ---- IMAP: the cheap check, the start date, UIDVALIDITY -------------------------------------


def test_status_says_nothing_new_without_selecting_the_folder(fleet: Fleet) -> None:
    user = fleet.user()
    fleet.dovecot.deliver(user, message("s1"))
    box = fleet.box(user)
    settings = fleet.settings(box)
    fleet.worker(settings).poll_once(box)
    cursor = fleet.state.cursor(box.name, box.folder)
    assert cursor is not None
    with ImapSource(box, settings.server("dovecot")) as source:
        assert not source.has_news(cursor.uidvalidity, cursor.last_uid)
        assert not source._selected
    fleet.dovecot.deliver(user, message("s2"))
    with ImapSource(box, settings.server("dovecot")) as source:
        assert source.has_news(cursor.uidvalidity, cursor.last_uid)


def test_the_start_date_skips_older_mail_on_the_first_poll(fleet: Fleet) -> None:
    user = fleet.user()
    fleet.dovecot.deliver(user, message("old"), when=datetime(2020, 1, 5, tzinfo=UTC))
    fleet.dovecot.deliver(user, message("new"), when=datetime(2026, 3, 1, tzinfo=UTC))
    box = fleet.box(user, since=date(2025, 1, 1).isoformat())
    worker = fleet.worker(fleet.settings(box))
    assert worker.poll_once(box) == 1
    fleet.dovecot.deliver(user, message("later"), when=datetime(2019, 1, 1, tzinfo=UTC))
    assert worker.poll_once(box) == 1  # after the first poll the cursor rules, not the date
    assert [marker_of(d["raw"]) for d in fleet.published()] == ["new", "later"]


def test_uidvalidity_resets_raise_an_alert_and_too_many_disable(
        fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    user = fleet.user()
    fleet.dovecot.deliver(user, message("v1"))
    box = fleet.box(user, interval=0.2)
    settings = fleet.settings(box, max_uidvalidity_resets=1)
    with fleet.running(settings):
        wait_for(lambda: len(fleet.published()) == 1, "the first poll", 60)
        validity = fleet.dovecot.uidvalidity(user) + 7
        fleet.dovecot.set_uidvalidity(user, validity)
        wait_for(lambda: fleet.sample("mailroute_mailbox_alerts_total", mailbox=box.name,
                                      kind="uidvalidity") == 1, "the reset alert", 60)
        wait_for(lambda: (fleet.state.cursor(box.name, box.folder) or _no_cursor()) ==
                 Cursor(validity, 1), "the folder read again", 60)
        fleet.dovecot.set_uidvalidity(user, fleet.dovecot.uidvalidity(user) + 7)
        wait_for(lambda: (fleet.leases.get(box.name) or _no_lease()).disabled_reason
                 is not None, "the mailbox disabled after the second reset", 60)
    assert "ALERT mailbox" in caplog.text and "UIDVALIDITY changed" in caplog.text
    # The reset re-read the one message under the new UIDVALIDITY (same Message-ID, so
    # persist keeps one record); the refused second reset read nothing.
    again = fleet.published()
    assert [marker_of(d["raw"]) for d in again] == ["v1"]
    assert fleet.sample("mailroute_mailbox_alerts_total", mailbox=box.name,
                        kind="disabled") == 1


def _no_cursor() -> Cursor:
    return Cursor(None, 0)


def test_a_poller_that_lost_its_lease_publishes_nothing(fleet: Fleet) -> None:
    user = fleet.user()
    fleet.dovecot.deliver(user, message("fenced"))
    box = fleet.box(user)
    with pytest.raises(MailboxUnavailable, match="lease taken over"):
        fleet.worker(fleet.settings(box)).poll_once(box, still_mine=lambda: False)
    assert fleet.published() == []


# ---- push ----------------------------------------------------------------------------------


def test_idle_delivers_new_mail_without_waiting_for_the_interval(fleet: Fleet) -> None:
    user = fleet.user()
    fleet.dovecot.deliver(user, message("before"))
    box = fleet.box(user, push=True, forward=True, interval=600.0)
    seen: list[str] = []
    with fleet.running(fleet.settings(box)):
        wait_for(lambda: _collect(fleet, seen) == ["before"], "the catch-up poll", 60)
        wait_for(lambda: fleet.sample("mailroute_ingest_push_sessions") == 1, "IDLE", 30)
        fleet.dovecot.deliver(user, message("pushed"))
        # The interval is ten minutes: only IDLE can bring it within the wait.
        wait_for(lambda: _collect(fleet, seen) == ["before", "pushed"], "the pushed message",
                 60)
        # The server drops the session: the poller notices, reconnects and carries on.
        fleet.dovecot.doveadm("kick", user)
        fleet.dovecot.deliver(user, message("after-drop"))
        wait_for(lambda: _collect(fleet, seen) == ["before", "pushed", "after-drop"],
                 "mail after the dropped IDLE", 120)


def test_a_silently_dropped_idle_session_is_noticed_and_no_mail_is_missed(
        fleet: Fleet) -> None:
    # Fault 19: the link goes quiet (no FIN, no RST); only the re-issued IDLE can notice.
    user = fleet.user()
    with StallableProxy(fleet.dovecot.host, fleet.dovecot.imap_port) as proxy:
        box = fleet.box(user, push=True, forward=True, interval=1.0)
        profile = fleet.profile(port=proxy.port, tls="none", timeout=2.0)
        seen: list[str] = []
        with fleet.running(fleet.settings(box, profile=profile, max_backoff=1.0)):
            wait_for(lambda: fleet.sample("mailroute_ingest_push_sessions") == 1, "IDLE", 30)
            proxy.stall()
            fleet.dovecot.deliver(user, message("during-the-silence"))
            wait_for(lambda: fleet.sample("mailroute_mailbox_polls_total", mailbox=box.name,
                                          outcome="failure") >= 1,
                     "the dead session noticed (IDLE re-issued, no answer in time)", 60)
            proxy.cut()  # the old connections are gone for good; new ones get through
            wait_for(lambda: _collect(fleet, seen) == ["during-the-silence"],
                     "the mail that arrived while the link was silent", 60)
        lease = fleet.leases.get(box.name)
        assert lease is not None and lease.disabled_reason is None


def test_idle_is_reissued_on_one_session_and_reports_new_mail(fleet: Fleet) -> None:
    user = fleet.user()
    box = fleet.box(user)
    with ImapSource(box, fleet.settings(box).server("dovecot")) as source:
        # Each wait ends with DONE; the next one issues IDLE again on the same session.
        assert source.idle_wait(0.3) is False
        assert source.idle_wait(0.3) is False
        fleet.dovecot.deliver(user, message("idle-news"))
        assert source.idle_wait(30) is True
        assert source.new_uids(0) == [1]


def _collect(fleet: Fleet, seen: list[str]) -> list[str]:
    seen += [marker_of(d["raw"]) for d in fleet.published()]
    return seen
