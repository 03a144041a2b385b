"""A backlog of large messages is fetched a few at a time: batches stop at ``batch_bytes``.

The cutting itself (:func:`ingest.source.byte_bounded`) and IMAP's sequence sets are pure and
tested alone; then each source on a real folder holding messages of known sizes: IMAP and
POP3 on the tests' own Dovecot, and a Maildir; and that the worker finishes a batch that
large, and lets go of it, before the next is fetched.  Before ``batch_bytes``, every source cut by
count only, so a folder of 200 messages with 25 MB attachments was one 5 GB batch.
"""

from __future__ import annotations

import gc
import mailbox
import os
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ingest.imap_source import ImapSource, uid_ranges
from ingest.maildir_source import MaildirSource
from ingest.pop3_source import Pop3Source
from ingest.source import FetchedMessage, MailSource, byte_bounded
from ingest.worker import IngestWorker
from persist.database import create_engine_for, upgrade
from persist.mailbox_state import MailboxStateStore
from shared.metrics import Metrics
from shared.secrets import Secret
from shared.settings import BrokerSettings, MailboxSettings, Settings
from shared.transport import Broker
from tests.dovecot import DovecotServer, dovecot_fixture

dovecot = dovecot_fixture(scope="module")

KB = 1024
# Sizes of the messages in each folder, in KB: small ones around two that are large for
# a batch of 4 under 100 KB (a share of 25 KB each), and one larger than a whole batch.
SIZES_KB = [2, 3, 60, 2, 2, 2, 2, 150, 2, 45, 2]
BATCH_SIZE = 4
BATCH_BYTES = 100 * KB


def message(n: int, size: int) -> bytes:
    head = (f"From: sender@example.org\r\nTo: alice@example.com\r\n"
            f"Message-ID: <big-{n}@example.org>\r\nSubject: m{n}\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def real_sizes() -> list[int]:
    return [len(message(n, kb * KB)) for n, kb in enumerate(SIZES_KB)]


def expected_batches(sizes: list[int] | None = None) -> list[list[int]]:
    """What the sources must give, as message numbers, from the sizes they know."""
    return byte_bounded(list(range(len(SIZES_KB))), sizes or real_sizes(), BATCH_SIZE,
                        BATCH_BYTES)


def assert_bounded(batches: list[list[int]]) -> None:
    """Every message once, in order; no batch over the count, nor over the bytes unless it
    is one message."""
    sizes = real_sizes()
    assert [n for batch in batches for n in batch] == list(range(len(SIZES_KB)))
    for batch in batches:
        assert len(batch) <= BATCH_SIZE
        assert len(batch) == 1 or sum(sizes[n] for n in batch) <= BATCH_BYTES, batch


def numbers(source: MailSource) -> list[list[int]]:
    with source:
        return [[int(m.raw.split(b"Subject: m", 1)[1].split(b"\r\n", 1)[0])
                 for m in batch.messages] for batch in source.batches(0)]


# ---- pure -------------------------------------------------------------------------------


def test_byte_bounded_cuts_by_count_and_by_bytes_and_never_leaves_a_key_out() -> None:
    assert byte_bounded("abcdefg", [1] * 7, 3, 100) == [list("abc"), list("def"), ["g"]]
    assert byte_bounded("abcd", [40, 40, 40, 40], 10, 100) == [list("ab"), list("cd")]
    # A key bigger than the limit is a batch alone; nothing is dropped.
    assert byte_bounded("abc", [10, 500, 10], 10, 100) == [["a"], ["b"], ["c"]]
    assert byte_bounded("ab", [100, 0], 10, 100) == [list("ab")]
    assert byte_bounded([], [], 3, 100) == []


def test_uid_ranges_writes_runs_as_ranges() -> None:
    assert uid_ranges([1, 2, 3, 7, 9, 10]) == "1:3,7,9:10"
    assert uid_ranges([5]) == "5"
    assert uid_ranges([1, 3, 4]) == "1,3:4"


def test_the_folder_here_needs_both_cuts() -> None:
    # Guards the test data: by count alone it would be [0-3], [4-7], [8-10].
    assert expected_batches() != [list(range(i, min(i + BATCH_SIZE, len(SIZES_KB))))
                                  for i in range(0, len(SIZES_KB), BATCH_SIZE)]


# ---- on real folders --------------------------------------------------------------------


@pytest.fixture
def user(dovecot: DovecotServer) -> Iterator[str]:
    name = f"u{uuid.uuid4().hex[:10]}"
    dovecot.add_user(name, f"pw-{name}")
    for n, kb in enumerate(SIZES_KB):
        dovecot.deliver(name, message(n, kb * KB))
    yield name


def box(**kw: Any) -> MailboxSettings:
    return MailboxSettings(**{"name": "box", "batch_size": BATCH_SIZE,
                              "batch_bytes": BATCH_BYTES, "after": "keep", **kw})


def test_imap_batches_stop_at_batch_bytes(dovecot: DovecotServer, user: str) -> None:
    settings = box(server="dovecot", username=user, password=Secret(dovecot.password(user)))
    source = ImapSource(settings, dovecot.server_profile("dovecot"))
    batches = numbers(source)
    assert_bounded(batches)
    # IMAP learns the sizes of the messages over a batch's share of the bytes only; each of
    # the others counts as that share.
    share = BATCH_BYTES // BATCH_SIZE
    assert batches == expected_batches([max(size, share) for size in real_sizes()])


def test_imap_batches_of_small_messages_are_cut_by_count_alone(
        dovecot: DovecotServer, user: str) -> None:
    settings = box(server="dovecot", username=user, password=Secret(dovecot.password(user)),
                   batch_bytes=1024 * KB)
    source = ImapSource(settings, dovecot.server_profile("dovecot"))
    assert numbers(source) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


def test_pop3_batches_stop_at_batch_bytes(dovecot: DovecotServer, user: str) -> None:
    settings = box(server="dovecot", kind="pop3", username=user,
                   password=Secret(dovecot.password(user)))
    profile = replace(dovecot.server_profile("dovecot"), port=dovecot.pop3_port)
    source = Pop3Source(settings, profile, seen=set())
    batches = numbers(source)
    assert_bounded(batches)
    assert batches == expected_batches()


def test_maildir_batches_stop_at_batch_bytes(tmp_path: Path) -> None:
    folder = mailbox.Maildir(tmp_path / "box", create=True)
    keys = [folder.add(message(n, kb * KB)) for n, kb in enumerate(SIZES_KB)]
    # Oldest first by modification time: give each its own second, in order.
    for second, key in enumerate(keys):
        path = tmp_path / "box" / "new" / key
        os.utime(path, (1_700_000_000 + second, 1_700_000_000 + second))
    source = MaildirSource(box(kind="maildir", path=str(tmp_path / "box")))
    batches = numbers(source)
    assert_bounded(batches)
    assert batches == expected_batches()


def test_a_large_batch_is_finished_and_let_go_before_the_next_is_fetched(
        dovecot: DovecotServer, user: str, tmp_path: Path) -> None:
    limit = 40 * KB  # three batches of this folder reach it: messages 2, 7 and 9 alone
    settings_box = box(server="dovecot", username=user, password=Secret(dovecot.password(user)),
                       batch_bytes=limit)
    broker = Broker(BrokerSettings(url="memory://", prefix=f"t{uuid.uuid4().hex[:12]}"))
    broker.declare()
    engine = create_engine_for(f"sqlite:///{tmp_path / 'state.db'}")
    upgrade(engine)
    publisher = broker.publisher()
    settings = Settings(broker=broker.settings, servers=(dovecot.server_profile("dovecot"),),
                        mailboxes=(settings_box,))
    worker = IngestWorker(settings, publisher, MailboxStateStore(engine), Metrics())
    source = ImapSource(settings_box, dovecot.server_profile("dovecot"))
    fetch = source._fetched
    large: list[weakref.ref[FetchedMessage]] = []
    alive_at_fetch: list[int] = []

    def watched_fetch(uids: list[int]) -> list[FetchedMessage]:
        gc.collect()
        alive_at_fetch.append(sum(ref() is not None for ref in large))
        messages = fetch(uids)
        if sum(len(m.raw) for m in messages) >= limit:
            large.extend(weakref.ref(m) for m in messages)
        return messages

    source._fetched = watched_fetch  # type: ignore[method-assign]
    try:
        with source:
            assert worker.poll_source(settings_box, source) == len(SIZES_KB)
    finally:
        publisher.close()
        engine.dispose()
    assert len(large) == 3
    assert alive_at_fetch == [0] * len(alive_at_fetch), alive_at_fetch
