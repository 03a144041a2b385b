"""IMAP faults against a private Dovecot (RELIABILITY.md faults 14-18 and 23).

UIDVALIDITY bumped under a running pipeline; a poll with nothing new (``UID SEARCH n:*``
answers the last message anyway); a message appended and one expunged by another session
while a poll is between its SEARCH and its FETCHes; the same message again under a new UID;
Dovecot restarted under load and its link stalled silently; certificates that must be
refused.  Each pipeline test ends with every message recorded exactly once.
"""

from __future__ import annotations

import email
import socket
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from ingest.errors import MailboxUnavailable
from ingest.worker import IngestWorker
from persist.mailbox_state import MailboxStateStore
from shared.metrics import Metrics
from shared.settings import MailboxSettings, load_settings
from shared.stage import Output
from shared.transport import Broker, Publisher, Sent
from tests.broker_fixtures import Vhost
from tests.dovecot import DovecotServer
from tests.faults.harness import Pipeline, deliver_many, make_message, postgres_engine
from tests.processes import wait_for
from tests.tcp_proxy import StallableProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def engine() -> Iterator[Engine]:
    with postgres_engine() as engine:
        yield engine


def fetched(pipeline: Pipeline) -> float:
    return pipeline.workers.counter("ingest", "mailroute_mailbox_messages_fetched_total")


# -- under a running pipeline -----------------------------------------------------------------
def test_uidvalidity_change_resets_the_cursor_without_duplicates(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine) -> None:
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine)
    pipeline.send("alice", "uidv", range(30))
    try:
        pipeline.start()
        pipeline.wait_persisted()
        dovecot.set_uidvalidity("alice", dovecot.uidvalidity("alice") + 1000)
        pipeline.send("alice", "uidv", range(30, 35))
        wait_for(lambda: fetched(pipeline) >= 65, "alice's folder to be read again from the "
                 "start", on_timeout=pipeline.workers.logs)
        pipeline.wait_persisted()
        pipeline.assert_exactly_once()
        assert "UIDVALIDITY changed" in pipeline.workers.log_path("ingest").read_text()
    finally:
        codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    pipeline.assert_no_dead_letters()


def test_same_message_under_a_new_uid_is_recorded_once(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine) -> None:
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine)
    pipeline.send("alice", "again", range(20))
    try:
        pipeline.start()
        pipeline.wait_persisted()
        deliver_many(dovecot, "alice", [make_message("alice", "again", 5)])  # a new UID
        pipeline.send("alice", "again", [20])
        wait_for(lambda: fetched(pipeline) >= 22, "both new UIDs to be fetched")
        pipeline.wait_persisted()
        wait_for(lambda: pipeline.workers.counter(
            "persist", "mailroute_stage_messages_in_total") >= 22, "persist to see both")
        pipeline.assert_exactly_once()
    finally:
        codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"


def test_dovecot_restarted_under_load(tmp_path: Path, dovecot: DovecotServer,
                                      rabbit_vhost: Vhost, engine: Engine) -> None:
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine,
                        mailbox={"batch_size": 10})
    pipeline.send("alice", "dovecot", range(400))
    try:
        pipeline.start()
        pipeline.wait_persisted(50)
        dovecot.restart()
        pipeline.send("dave", "dovecot", range(400, 500))
        pipeline.wait_persisted()
        pipeline.assert_exactly_once()
    finally:
        codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    pipeline.assert_no_dead_letters()


def test_imap_link_stalled_silently_times_out_and_recovers(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine) -> None:
    with StallableProxy(dovecot.host, dovecot.imap_port) as proxy:
        pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine,
                            mailbox={"batch_size": 10})
        pipeline.write_config(imap_port=proxy.port)
        pipeline.send("alice", "imapstall", range(300))
        try:
            pipeline.start()
            pipeline.wait_persisted(30)
            proxy.stall()
            wait_for(lambda: pipeline.workers.counter(
                "ingest", "mailroute_mailbox_polls_total", outcome="failure") >= 1,
                "a poll to time out on the stalled link", on_timeout=pipeline.workers.logs)
            proxy.cut()
            pipeline.wait_persisted()
            pipeline.assert_exactly_once()
        finally:
            codes = pipeline.stop()
        assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"


# -- one poll, in this process, with another session acting in the middle --------------------
class HookedPublisher:
    """The real publisher, remembering what it published, running ``hook`` after batch 1."""

    def __init__(self, real: Publisher, hook: object = None) -> None:
        self.real = real
        self.hook = hook
        self.published: list[dict[str, object]] = []

    def send_outputs(self, outputs: Sequence[Output]) -> Sent:
        sent = self.real.send_outputs(outputs)
        first = not self.published
        self.published += [out.document for out in outputs]
        if first and callable(self.hook):
            self.hook()
        return sent

    def wait(self, sent: Sent) -> None:
        self.real.wait(sent)


def ingest_for(pipeline: Pipeline, engine: Engine, hook: object = None,
               batch_size: int = 10) -> tuple[IngestWorker, HookedPublisher, MailboxSettings]:
    settings = load_settings(pipeline.config)
    settings = replace(settings, mailboxes=tuple(replace(b, batch_size=batch_size)
                                                 for b in settings.mailboxes))
    broker = Broker(settings.broker)
    broker.declare()
    publisher = HookedPublisher(broker.publisher(), hook)
    worker = IngestWorker(settings, publisher, MailboxStateStore(engine), Metrics())
    return worker, publisher, settings.mailbox("alice")


def last_uid(engine: Engine) -> int:
    cursor = MailboxStateStore(engine).cursor("alice", "INBOX")
    assert cursor is not None
    return cursor.last_uid


def message_ids_by_uid(published: list[dict[str, object]]) -> dict[int, str]:
    result = {}
    for document in published:
        raw = document["raw"]
        assert isinstance(raw, bytes)
        source = document["source"]
        assert isinstance(source, dict)
        result[int(source["uid"])] = str(email.message_from_bytes(raw)["Message-ID"])
    return result


def test_nothing_new_publishes_nothing(tmp_path: Path, dovecot: DovecotServer,
                                       rabbit_vhost: Vhost, engine: Engine) -> None:
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine)
    pipeline.send("alice", "idle", range(3))
    worker, publisher, box = ingest_for(pipeline, engine)
    assert worker.poll_once(box) == 3
    # UID SEARCH 4:* answers UID 3 again; it is not new
    assert worker.poll_once(box) == 0
    assert worker.poll_once(box) == 0
    assert len(publisher.published) == 3


def test_append_during_a_poll_is_picked_up_by_the_next(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine) -> None:
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine)
    uids = pipeline.send("alice", "append", range(30))
    appended: list[int] = []
    worker, publisher, box = ingest_for(
        pipeline, engine,
        hook=lambda: appended.extend(pipeline.send("alice", "append", [30])))
    assert worker.poll_once(box) == 30
    assert last_uid(engine) == max(uids)
    assert worker.poll_once(box) == 1
    assert last_uid(engine) == appended[0]
    by_uid = message_ids_by_uid(publisher.published)
    assert by_uid == {uid: f"<append-{n}@example.org>"
                      for n, uid in enumerate([*uids, *appended])}


def test_expunge_by_another_session_during_a_poll_pairs_no_body_with_a_wrong_uid(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine) -> None:
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine)
    uids = pipeline.send("alice", "expunge", range(30))
    # The hook runs as the first batch of 10 is published; the second batch's FETCH was sent
    # ahead by then, the third's not yet: these two go between the SEARCH and their FETCH.
    gone = [uids[21], uids[25]]

    def expunge_elsewhere() -> None:
        with dovecot.client("alice", "INBOX") as imap:
            imap.delete_messages(gone)
            imap.uid_expunge(gone)

    worker, publisher, box = ingest_for(pipeline, engine, hook=expunge_elsewhere)
    assert worker.poll_once(box) == 28
    by_uid = message_ids_by_uid(publisher.published)
    assert by_uid == {uid: f"<expunge-{n}@example.org>" for n, uid in enumerate(uids)
                      if uid not in gone}
    assert last_uid(engine) == max(uids)


# -- certificates ---------------------------------------------------------------------------------
@pytest.fixture
def tls_dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer(tls=True)
    if not server.tls:
        server.stop()
        pytest.skip("openssl is not installed")
    server.add_user("alice", "alice-secret")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _poll_with_profile(tmp_path: Path, server: DovecotServer, engine: Engine,
                       rabbit_vhost: Vhost, **profile: object) -> None:
    pipeline = Pipeline(tmp_path, server, rabbit_vhost.url, engine)
    pipeline.server = profile
    pipeline.write_config()
    worker, _, box = ingest_for(pipeline, engine)
    worker.poll_once(box)


def test_self_signed_certificate_is_refused(tmp_path: Path, tls_dovecot: DovecotServer,
                                            rabbit_vhost: Vhost, engine: Engine) -> None:
    with pytest.raises(MailboxUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        _poll_with_profile(tmp_path, tls_dovecot, engine, rabbit_vhost, tls="ssl",
                           port=tls_dovecot.imaps_port)
    assert MailboxStateStore(engine).cursor("alice", "INBOX") is None


def test_certificate_for_another_host_is_refused(tmp_path: Path, tls_dovecot: DovecotServer,
                                                 rabbit_vhost: Vhost, engine: Engine) -> None:
    other = socket.gethostname()
    try:
        if socket.gethostbyname(other) != "127.0.0.1" or other in ("localhost",):
            pytest.skip("no other name for 127.0.0.1 on this machine")
    except OSError:
        pytest.skip("the host name does not resolve")
    # the certificate names localhost and 127.0.0.1 only, and is trusted here
    with pytest.raises(MailboxUnavailable, match=r"(?i)hostname|match"):
        _poll_with_profile(tmp_path, tls_dovecot, engine, rabbit_vhost, tls="ssl",
                           host=other, port=tls_dovecot.imaps_port,
                           ca_file=str(tls_dovecot.cert_path))
