"""Ingest on a real Dovecot and the real publisher: cursors, batches, actions, failures.

Each test gets its own Dovecot user (one Dovecot per module), its own SQLite state database
and its own broker queues (kombu's memory transport with a private prefix; the first test
also runs on RabbitMQ in a private vhost).
"""

from __future__ import annotations

import logging
import mailbox
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from ingest.errors import MailboxAuthError, MailboxUnavailable
from ingest.imap_source import ImapSource, quiet_imaplib
from ingest.worker import IngestWorker
from persist.database import create_engine_for, upgrade
from persist.mailbox_state import MailboxStateStore
from shared.errors import TransientError
from shared.metrics import Metrics
from shared.schemas import Codec
from shared.settings import (
    AfterAction,
    BrokerSettings,
    MailboxSettings,
    ServerProfile,
    Settings,
    TlsMode,
)
from shared.stage import Output
from shared.transport import Broker, Publisher, Sent
from tests.broker_fixtures import Vhost, drain_queue
from tests.dovecot import DovecotServer, dovecot_fixture
from tests.tcp_proxy import StallableProxy

dovecot = dovecot_fixture(scope="module")

SEEN = b"\\Seen"


def message(n: int, marker: str = "") -> bytes:
    marker = marker or f"m{n}"
    return (f"From: sender{n}@example.org\r\nTo: alice@example.com\r\n"
            f"Message-ID: <{marker}@example.org>\r\nSubject: {marker}\r\n\r\n"
            f"body of {marker}\r\n").encode()


def marker_of(raw: bytes) -> str:
    return raw.split(b"Subject: ", 1)[1].split(b"\n", 1)[0].rstrip(b"\r").decode()


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def user(dovecot: DovecotServer) -> str:
    name = f"u{uuid.uuid4().hex[:10]}"
    dovecot.add_user(name, f"pw-{name}")
    return name


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'state.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def memory_broker() -> Broker:
    broker = Broker(BrokerSettings(url="memory://", prefix=f"t{uuid.uuid4().hex[:12]}"))
    broker.declare()
    return broker


@dataclass
class Harness:
    dovecot: DovecotServer
    broker: Broker
    store: MailboxStateStore
    publisher: Publisher
    metrics: Metrics = field(default_factory=Metrics)
    codec: Codec = field(default_factory=Codec)

    def mailbox(self, user: str, **kw: Any) -> MailboxSettings:
        fields: dict[str, Any] = {"name": f"box-{user}", "server": "dovecot", "username": user,
                                  "password": self.dovecot.password(user), "batch_size": 50}
        fields.update(kw)
        return MailboxSettings(**fields)

    def worker(self, *boxes: MailboxSettings, publisher: Any = None,
               profile: ServerProfile | None = None) -> IngestWorker:
        settings = Settings(broker=self.broker.settings,
                            servers=(profile or self.dovecot.server_profile("dovecot"),),
                            mailboxes=boxes)
        return IngestWorker(settings, publisher or self.publisher, self.store, self.metrics)

    def published(self) -> list[dict[str, Any]]:
        queue = self.broker.topology.queue_for_edge("raw")
        return [self.codec.decode("raw", body)
                for body, _headers in drain_queue(self.broker.settings.url, queue)]

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def make_harness(dovecot: DovecotServer, broker: Broker, engine: Engine) -> Iterator[Harness]:
    publisher = broker.publisher()
    try:
        yield Harness(dovecot, broker, MailboxStateStore(engine), publisher)
    finally:
        publisher.close()


@pytest.fixture
def harness(dovecot: DovecotServer, memory_broker: Broker, engine: Engine) -> Iterator[Harness]:
    yield from make_harness(dovecot, memory_broker, engine)


@pytest.fixture(params=["memory", "rabbitmq"])
def any_broker_harness(request: pytest.FixtureRequest, dovecot: DovecotServer,
                       engine: Engine) -> Iterator[Harness]:
    if request.param == "memory":
        broker = request.getfixturevalue("memory_broker")
    else:
        vhost: Vhost = request.getfixturevalue("rabbit_vhost")
        broker = Broker(BrokerSettings(url=vhost.url, prefix="mail", confirm_timeout=10))
        broker.declare()
    yield from make_harness(dovecot, broker, engine)


class WatchingPublisher:
    """Wraps the real publisher: runs ``before`` on each batch, or refuses some batches."""

    def __init__(self, inner: Publisher, before: Callable[[Sequence[Output]], None] | None = None,
                 fail_calls: Sequence[int] = ()) -> None:
        self.inner = inner
        self.before = before
        self.fail_calls = set(fail_calls)
        self.calls = 0

    def send_outputs(self, outputs: Sequence[Output]) -> Sent:
        self.calls += 1
        if self.before is not None:
            self.before(outputs)
        if self.calls in self.fail_calls:
            raise TransientError("broker did not confirm")
        return self.inner.send_outputs(outputs)

    def wait(self, sent: Sent) -> None:
        self.inner.wait(sent)


# ---- IMAP: fetching and cursors -------------------------------------------------------------


def test_poll_publishes_every_message_once_with_its_source(
        any_broker_harness: Harness, user: str) -> None:
    h = any_broker_harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(3)]
    box = h.mailbox(user, forward=True, after="keep")
    before = datetime.now(UTC)

    assert h.worker(box).poll_once(box) == 3

    docs = h.published()
    assert sorted(int(d["source"]["uid"]) for d in docs) == uids
    validity = h.dovecot.uidvalidity(user)
    for doc in docs:
        src = doc["source"]
        assert src["mailbox"] == box.name
        assert src["mailbox_kind"] == "forward"
        assert src["folder"] == "INBOX"
        assert src["uidvalidity"] == validity
        assert src["received_at"].tzinfo is not None
        assert src["fetched_at"] >= before
        assert marker_of(doc["raw"]) == f"m{uids.index(int(src['uid']))}"
    assert len({d["trace_id"] for d in docs}) == 3
    cursor = h.store.cursor(box.name, "INBOX")
    assert cursor is not None
    assert (cursor.uidvalidity, cursor.last_uid) == (validity, max(uids))
    assert h.sample("mailroute_mailbox_messages_fetched_total", mailbox=box.name) == 3
    assert h.sample("mailroute_mailbox_polls_total", mailbox=box.name, outcome="success") == 1
    assert h.sample("mailroute_mailbox_last_success_timestamp_seconds", mailbox=box.name) > 0


def test_second_poll_publishes_nothing_and_a_new_append_is_picked_up(
        harness: Harness, user: str) -> None:
    h = harness
    for n in range(2):
        h.dovecot.deliver(user, message(n))
    box = h.mailbox(user, after="keep")
    worker = h.worker(box)
    assert worker.poll_once(box) == 2
    assert len(h.published()) == 2

    assert worker.poll_once(box) == 0
    assert h.published() == []

    new_uid = h.dovecot.deliver(user, message(9))
    assert worker.poll_once(box) == 1
    docs = h.published()
    assert [d["source"]["uid"] for d in docs] == [str(new_uid)]
    assert h.store.cursor(box.name, "INBOX").last_uid == new_uid  # type: ignore[union-attr]
    state = {s.mailbox: s for s in h.store.all_states()}[box.name]
    assert (state.status, state.messages_fetched) == ("success", 3)


def test_uid_search_above_every_uid_returns_the_last_message_which_is_not_new(
        harness: Harness, user: str) -> None:
    h = harness
    last = max(h.dovecot.deliver(user, message(n)) for n in range(2))
    with h.dovecot.client(user, "INBOX") as imap:
        # The hazard is real on this server: n:* with n above every UID still answers.
        assert imap.search(["UID", f"{last + 1}:*"]) == [last]
    box = h.mailbox(user, after="keep")
    with ImapSource(box, h.dovecot.server_profile()) as source:
        assert source.new_uids(last) == []
        assert list(source.batches(last)) == []
    h.store.save_cursor(box.name, "INBOX", h.dovecot.uidvalidity(user), last)
    assert h.worker(box).poll_once(box) == 0
    assert h.published() == []


def test_batches_advance_the_cursor_one_confirmed_batch_at_a_time(
        harness: Harness, user: str) -> None:
    h = harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(5)]
    box = h.mailbox(user, batch_size=2, after="seen")
    failing = WatchingPublisher(h.publisher, fail_calls=[2])

    with pytest.raises(TransientError):
        h.worker(box, publisher=failing).poll_once(box)

    # Batch 2 is refused while batch 1 waits for its confirms: batch 1 is still finished
    # (cursor at its highest UID, flagged); batch 2 untouched.
    assert h.store.cursor(box.name, "INBOX").last_uid == uids[1]  # type: ignore[union-attr]
    flags = h.dovecot.flags(user)
    assert [SEEN in flags[u] for u in uids] == [True, True, False, False, False]
    assert len(h.published()) == 2

    assert h.worker(box).poll_once(box) == 3
    assert sorted(int(d["source"]["uid"]) for d in h.published()) == uids[2:]
    assert all(SEEN in f for f in h.dovecot.flags(user).values())


def test_append_during_a_poll_is_picked_up_by_the_next_poll(
        harness: Harness, user: str) -> None:
    h = harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(2)]
    box = h.mailbox(user, batch_size=1, after="keep")
    appended: list[int] = []

    def append_once(outputs: Sequence[Output]) -> None:
        if not appended:
            appended.append(h.dovecot.deliver(user, message(7)))

    worker = h.worker(box, publisher=WatchingPublisher(h.publisher, before=append_once))
    assert worker.poll_once(box) == 2
    assert h.store.cursor(box.name, "INBOX").last_uid == uids[-1]  # type: ignore[union-attr]
    assert worker.poll_once(box) == 1
    assert [d["source"]["uid"] for d in h.published()][-1] == str(appended[0])


def test_a_stop_request_ends_the_poll_after_the_batch_in_hand(
        harness: Harness, user: str) -> None:
    h = harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(3)]
    box = h.mailbox(user, batch_size=1, after="seen")
    stop = threading.Event()
    worker = h.worker(box, publisher=WatchingPublisher(h.publisher,
                                                       before=lambda outputs: stop.set()))
    assert worker.poll_once(box, stop) == 1
    assert h.store.cursor(box.name, "INBOX").last_uid == uids[0]  # type: ignore[union-attr]
    assert [SEEN in f for f in h.dovecot.flags(user).values()] == [True, False, False]
    assert h.worker(box).poll_once(box) == 2


def test_expunge_between_search_and_fetch_never_pairs_a_body_with_the_wrong_uid(
        harness: Harness, user: str) -> None:
    h = harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(4)]
    box = h.mailbox(user, batch_size=1, after="keep")
    with ImapSource(box, h.dovecot.server_profile()) as source:
        batches = source.batches(0)
        # SEARCH done, the first message fetched and the second's FETCH sent ahead; the
        # third's FETCH is sent only when the second batch is handed over.
        first = next(batches)
        with h.dovecot.client(user, "INBOX") as other:
            other.delete_messages([uids[2]])
            other.uid_expunge([uids[2]])
        rest = list(batches)
    fetched = {m.uid: marker_of(m.raw) for b in [first, *rest] for m in b.messages}
    assert fetched == {str(uids[0]): "m0", str(uids[1]): "m1", str(uids[3]): "m3"}
    assert rest[-1].last_uid == uids[3]


def test_commands_between_batches_wait_for_the_fetch_sent_ahead(
        harness: Harness, user: str) -> None:
    """IMAP pipelining: batch n+1's FETCH is sent as batch n is handed over.  A command sent
    meanwhile (after-processing, a new search) first reads that answer, so no response is
    handed to the wrong command and every body keeps its UID."""
    h = harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(5)]
    box = h.mailbox(user, batch_size=2, after="seen")
    with ImapSource(box, h.dovecot.server_profile()) as source:
        batches = source.batches(0)
        first = next(batches)
        source.after_confirm(first)  # a STORE while the second FETCH's answer is unread
        second = next(batches)
        assert source.new_uids(uids[3]) == [uids[4]]  # a SEARCH, the third FETCH unread
        source.after_confirm(second)
        third = next(batches)
        source.after_confirm(third)
        assert list(batches) == []
    assert [[int(m.uid) for m in b.messages] for b in (first, second, third)] == \
        [uids[0:2], uids[2:4], uids[4:]]
    assert [marker_of(m.raw) for b in (first, second, third) for m in b.messages] == \
        [f"m{n}" for n in range(5)]
    assert sorted(h.dovecot.flags(user)) == uids
    assert all(SEEN in flags for flags in h.dovecot.flags(user).values())


def test_the_next_fetch_is_on_the_wire_before_a_batch_is_handed_over(
        harness: Harness, user: str) -> None:
    """The proxy drops the connection when the second batch's FETCH passes: the server never
    answers it, and the first batch's after-processing, which must read that answer first,
    finds the connection gone (nothing is flagged)."""
    h = harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(4)]
    box = h.mailbox(user, batch_size=2, after="seen")
    with StallableProxy(h.dovecot.host, h.dovecot.imap_port) as proxy:
        proxy.drop_on(f"FETCH {uids[2]},{uids[3]} ".encode())
        profile = replace(h.dovecot.server_profile("dovecot"), port=proxy.port)
        with ImapSource(box, profile) as source:
            first = next(source.batches(0))
            assert [int(m.uid) for m in first.messages] == uids[0:2]
            with pytest.raises(MailboxUnavailable, match=r"fetch on .* failed"):
                source.after_confirm(first)
    assert not any(SEEN in flags for flags in h.dovecot.flags(user).values())


def test_uidvalidity_change_resets_the_cursor(harness: Harness, user: str) -> None:
    h = harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(2)]
    box = h.mailbox(user, after="keep")
    worker = h.worker(box)
    assert worker.poll_once(box) == 2
    h.published()
    old = h.dovecot.uidvalidity(user)

    h.dovecot.set_uidvalidity(user, old + 4242)
    assert worker.poll_once(box) == 2

    docs = h.published()
    assert sorted(int(d["source"]["uid"]) for d in docs) == uids
    assert {d["source"]["uidvalidity"] for d in docs} == {old + 4242}
    cursor = h.store.cursor(box.name, "INBOX")
    assert cursor is not None
    assert (cursor.uidvalidity, cursor.last_uid) == (old + 4242, max(uids))
    assert worker.poll_once(box) == 0


def test_uidvalidity_change_on_an_empty_folder_is_saved_at_once(
        harness: Harness, user: str) -> None:
    h = harness
    box = h.mailbox(user, after="keep")
    h.store.save_cursor(box.name, "INBOX", 1, 99)
    assert h.worker(box).poll_once(box) == 0
    cursor = h.store.cursor(box.name, "INBOX")
    assert cursor is not None
    assert (cursor.uidvalidity, cursor.last_uid) == (h.dovecot.uidvalidity(user), 0)


# ---- IMAP: after-processing only after the confirm -----------------------------------------


def _snapshot(h: Harness, user: str, folder: str | None) -> tuple[Any, ...]:
    moved = h.dovecot.uids(user, folder) if folder else []
    return (h.dovecot.flags(user), moved)


@pytest.mark.parametrize("action", ["keep", "seen", "move", "delete"])
def test_after_processing_happens_only_after_the_confirm(
        harness: Harness, user: str, action: AfterAction) -> None:
    h = harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(3)]
    move_to = "Processed" if action == "move" else None
    if move_to:
        h.dovecot.deliver(user, message(99), folder=move_to)  # create the folder
    box = h.mailbox(user, after=action, move_to=move_to)
    untouched = _snapshot(h, user, move_to)
    seen_at_publish: list[tuple[Any, ...]] = []
    cursor_at_publish: list[Any] = []

    def look(outputs: Sequence[Output]) -> None:
        seen_at_publish.append(_snapshot(h, user, move_to))
        cursor_at_publish.append(h.store.cursor(box.name, "INBOX"))

    assert h.worker(box, publisher=WatchingPublisher(h.publisher, before=look)).poll_once(box) \
        == 3
    assert seen_at_publish == [untouched]
    assert cursor_at_publish == [None]
    assert len(h.published()) == 3

    flags = h.dovecot.flags(user)
    if action == "keep":
        assert flags == {u: () for u in uids}
    elif action == "seen":
        assert all(SEEN in flags[u] for u in uids)
    elif action == "delete":
        assert flags == {}
    else:
        assert flags == {}
        assert len(h.dovecot.uids(user, "Processed")) == 4


@pytest.mark.parametrize("action", ["seen", "move", "delete"])
def test_with_several_batches_each_is_acted_on_only_after_its_own_confirm(
        harness: Harness, user: str, action: AfterAction) -> None:
    h = harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(5)]
    move_to = "Processed" if action == "move" else None
    box = h.mailbox(user, batch_size=2, after=action, move_to=move_to)
    seen: list[tuple[str, list[int], Any]] = []  # (moment, acted on, cursor)

    def look(moment: str) -> None:
        flags = h.dovecot.flags(user)
        acted = sorted(u for u in uids if u not in flags or SEEN in flags[u])
        cursor = h.store.cursor(box.name, "INBOX")
        seen.append((moment, acted, cursor.last_uid if cursor else None))

    class Watching(WatchingPublisher):
        def wait(self, sent: Sent) -> None:
            super().wait(sent)
            look(f"confirmed {[int(o.document['source']['uid']) for o in sent.outputs]}")

    publisher = Watching(h.publisher, before=lambda outputs: look(
        f"sending {[int(o.document['source']['uid']) for o in outputs]}"))
    worker = h.worker(box, publisher=publisher)
    assert worker.poll_once(box) == 5
    # A batch is sent while the one before waits for its confirms; each is acted on, and the
    # cursor moved onto it, only once its own confirms came.
    assert seen == [(f"sending {uids[0:2]}", [], None),
                    (f"sending {uids[2:4]}", [], None),
                    (f"confirmed {uids[0:2]}", [], None),
                    (f"sending {uids[4:]}", uids[0:2], uids[1]),
                    (f"confirmed {uids[2:4]}", uids[0:2], uids[1]),
                    (f"confirmed {uids[4:]}", uids[0:4], uids[3])]
    assert sorted(int(d["source"]["uid"]) for d in h.published()) == uids
    flags = h.dovecot.flags(user)
    assert (all(SEEN in f for f in flags.values()) if action == "seen" else flags == {})


def test_a_connection_lost_while_fetching_a_batch_keeps_the_confirmed_ones(
        harness: Harness, user: str) -> None:
    h = harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(5)]
    box = h.mailbox(user, batch_size=2, after="keep")
    with StallableProxy(h.dovecot.host, h.dovecot.imap_port) as proxy:
        # The second batch's FETCH loses the connection.
        proxy.drop_on(f"FETCH {uids[2]},{uids[3]} ".encode())
        profile = replace(h.dovecot.server_profile("dovecot"), port=proxy.port)
        with pytest.raises(MailboxUnavailable, match=r"fetch on .* failed"):
            h.worker(box, profile=profile).poll_once(box)
    assert sorted(int(d["source"]["uid"]) for d in h.published()) == uids[0:2]
    assert h.store.cursor(box.name, "INBOX").last_uid == uids[1]  # type: ignore[union-attr]

    assert h.worker(box).poll_once(box) == 3
    assert sorted(int(d["source"]["uid"]) for d in h.published()) == uids[2:]


def test_move_creates_a_missing_target_folder(harness: Harness, user: str) -> None:
    h = harness
    h.dovecot.deliver(user, message(1))
    box = h.mailbox(user, after="move", move_to="Done/Ingested")
    assert h.worker(box).poll_once(box) == 1
    assert h.dovecot.uids(user) == []
    assert len(h.dovecot.uids(user, "Done/Ingested")) == 1


def test_unconfirmed_publish_leaves_cursor_and_messages_untouched(
        harness: Harness, user: str) -> None:
    h = harness
    uids = [h.dovecot.deliver(user, message(n)) for n in range(2)]
    box = h.mailbox(user, after="delete")
    refusing = WatchingPublisher(h.publisher, fail_calls=[1])

    with pytest.raises(TransientError):
        h.worker(box, publisher=refusing).poll_once(box)

    assert h.store.cursor(box.name, "INBOX") is None
    assert h.dovecot.flags(user) == {u: () for u in uids}
    assert h.published() == []
    state = {s.mailbox: s for s in h.store.all_states()}[box.name]
    assert state.status == "failing"
    assert "did not confirm" in (state.last_error or "")
    assert h.sample("mailroute_mailbox_polls_total", mailbox=box.name, outcome="failure") == 1


# ---- IMAP: connection failures -----------------------------------------------------------


def test_wrong_password_is_an_auth_error_and_a_failed_poll(harness: Harness, user: str) -> None:
    h = harness
    box = h.mailbox(user, password="not-the-password-xyz")
    with pytest.raises(MailboxAuthError) as raised:
        h.worker(box).poll_once(box)
    assert "not-the-password-xyz" not in str(raised.value)
    state = {s.mailbox: s for s in h.store.all_states()}[box.name]
    assert state.status == "failing"
    assert state.consecutive_failures == 1
    assert "not-the-password-xyz" not in (state.last_error or "")
    assert h.sample("mailroute_mailbox_polls_total", mailbox=box.name, outcome="failure") == 1
    assert h.sample("mailroute_mailbox_polls_total", mailbox=box.name, outcome="success") == 0


def test_unreachable_server_is_unavailable(harness: Harness, user: str) -> None:
    h = harness
    box = h.mailbox(user)
    closed = ServerProfile(name="dovecot", host="127.0.0.1", port=1, tls="none", timeout=5)
    with pytest.raises(MailboxUnavailable):
        h.worker(box, profile=closed).poll_once(box)


def test_missing_folder_is_unavailable(harness: Harness, user: str) -> None:
    h = harness
    box = h.mailbox(user, folder="NoSuchFolder")
    with pytest.raises(MailboxUnavailable, match="select"):
        h.worker(box).poll_once(box)


@pytest.mark.parametrize("tls", ["ssl", "starttls"])
def test_tls_with_the_servers_ca_works(harness: Harness, user: str, tls: TlsMode) -> None:
    h = harness
    h.dovecot.deliver(user, message(1))
    box = h.mailbox(user, after="keep")
    profile = h.dovecot.server_profile("dovecot", tls=tls)
    assert h.worker(box, profile=profile).poll_once(box) == 1


@pytest.mark.parametrize("tls", ["ssl", "starttls"])
def test_self_signed_certificate_is_refused_unless_verification_is_off(
        harness: Harness, user: str, tls: TlsMode) -> None:
    h = harness
    h.dovecot.deliver(user, message(1))
    box = h.mailbox(user, after="keep")
    trusted = h.dovecot.server_profile("dovecot", tls=tls)
    untrusted = replace(trusted, ca_file=None)
    with pytest.raises(MailboxUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
        h.worker(box, profile=untrusted).poll_once(box)
    unverified = replace(untrusted, verify_tls=False)
    assert h.worker(box, profile=unverified).poll_once(box) == 1


def test_run_polls_every_mailbox_and_one_failure_does_not_stop_the_others(
        harness: Harness, dovecot: DovecotServer) -> None:
    h = harness
    good, bad = f"g{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
    dovecot.add_user(good, "pw-good")
    dovecot.add_user(bad, "pw-bad")
    dovecot.deliver(good, message(1))
    bad_box = h.mailbox(bad, password="wrong", interval=0.05)
    good_box = h.mailbox(good, interval=0.05, after="seen")
    published = threading.Event()

    class Signalling(WatchingPublisher):
        def wait(self, sent: Sent) -> None:
            super().wait(sent)
            published.set()

    worker = h.worker(bad_box, good_box, publisher=Signalling(h.publisher))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        assert published.wait(30)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    states = {s.mailbox: s for s in h.store.all_states()}
    assert states[bad_box.name].status == "failing"
    assert states[good_box.name].messages_fetched == 1
    assert len(h.published()) == 1


# ---- Maildir ------------------------------------------------------------------------------


def make_maildir(path: Path, count: int) -> tuple[mailbox.Maildir, list[str]]:
    md = mailbox.Maildir(path, create=True)
    keys = []
    for n in range(count):
        key = md.add(mailbox.MaildirMessage(message(n)))
        # A message just added sits in new/ under its key; give each its own arrival time.
        os.utime(path / "new" / key, (1_700_000_000 + n,) * 2)
        keys.append(key)
    return md, keys


@pytest.mark.parametrize("action", ["seen", "keep", "delete"])  # move: IMAP only
def test_maildir_publishes_new_messages_once_then_acts(
        harness: Harness, tmp_path: Path, action: AfterAction) -> None:
    h = harness
    path = tmp_path / "Maildir"
    _md, keys = make_maildir(path, 3)
    box = MailboxSettings(name="demo", kind="maildir", path=str(path), after=action,
                          batch_size=2)
    worker = h.worker(box)
    assert worker.poll_once(box) == 3
    docs = h.published()
    assert sorted(d["source"]["uid"] for d in docs) == sorted(keys)
    for doc in docs:
        assert doc["source"]["uidvalidity"] is None
        assert doc["source"]["mailbox_kind"] == "direct"
        n = keys.index(doc["source"]["uid"])
        assert marker_of(doc["raw"]) == f"m{n}"
        assert doc["source"]["received_at"] == datetime.fromtimestamp(1_700_000_000 + n, UTC)
    assert os.listdir(path / "new") == []
    cur = sorted(os.listdir(path / "cur"))
    if action == "delete":
        assert cur == []
    else:
        flags = "" if action == "keep" else "S"
        assert cur == sorted(f"{k}:2,{flags}" for k in keys)

    assert worker.poll_once(box) == 0
    assert h.published() == []


def test_maildir_unconfirmed_messages_stay_new(harness: Harness, tmp_path: Path) -> None:
    h = harness
    path = tmp_path / "Maildir"
    _md, keys = make_maildir(path, 2)
    box = MailboxSettings(name="demo", kind="maildir", path=str(path), after="seen")
    with pytest.raises(TransientError):
        h.worker(box, publisher=WatchingPublisher(h.publisher, fail_calls=[1])).poll_once(box)
    assert sorted(os.listdir(path / "new")) == sorted(keys)
    assert h.worker(box).poll_once(box) == 2


def test_maildir_that_does_not_exist_is_unavailable(harness: Harness, tmp_path: Path) -> None:
    box = MailboxSettings(name="demo", kind="maildir", path=str(tmp_path / "nope"))
    with pytest.raises(MailboxUnavailable):
        harness.worker(box).poll_once(box)


# ---- imaplib's debug trace -----------------------------------------------------------------


def test_imaplib_debug_trace_is_off_unless_its_logger_wants_it(
        dovecot: DovecotServer, user: str) -> None:
    with dovecot.client(user, "INBOX") as imap:
        assert imap._imap.debug == 5  # imapclient's own setting, on every connection
        logger = logging.getLogger("imapclient.imaplib")
        old = logger.level
        try:
            logger.setLevel(logging.DEBUG)
            quiet_imaplib(imap)
            assert imap._imap.debug == 5
            logger.setLevel(logging.INFO)
            quiet_imaplib(imap)
            assert imap._imap.debug == 0
        finally:
            logger.setLevel(old)
