"""The persist stage against real databases: SQLite in a temporary folder and PostgreSQL."""

from __future__ import annotations

import copy
import hashlib
import socket
import threading
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from persist.database import (
    create_engine_for,
    current_revision,
    migrations_folder,
    normalise_url,
    upgrade,
)
from persist.mailbox_state import Cursor, MailboxStateStore
from persist.store import EmailStore
from persist.tables import build_tables
from persist.worker import PersistStage
from shared.errors import PermanentError, TransientError
from shared.schemas import Codec
from shared.stage import BatchStage

pytest_plugins = ["tests.db_fixtures"]

RECEIVED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def attachment(content: bytes, filename: str = "report.pdf") -> dict[str, Any]:
    return {
        "filename": filename,
        "content_type": "application/pdf",
        "size": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
        "content": content,
    }


def routed_document(
    dedup_key: str = "<abc@example.com>",
    deliveries: list[dict[str, Any]] | None = None,
    source_mailbox: str = "alice",
    forward: bool = False,
    attachments: list[dict[str, Any]] | None = None,
    uid: str = "42",
    trace_id: str = "trace-1",
) -> dict[str, Any]:
    """A routed document exactly as the persist worker receives it (encoded, then decoded)."""
    document = {
        "trace_id": trace_id,
        "source": {
            "mailbox": source_mailbox,
            "mailbox_kind": "forward" if forward else "direct",
            "folder": "INBOX",
            "uidvalidity": 7,
            "uid": uid,
            "received_at": RECEIVED,
            "fetched_at": RECEIVED + timedelta(seconds=3),
        },
        "envelope": {
            "kind": "wrapped" if forward else "direct",
            "forwarder": {"name": "Bob", "address": "bob@example.com"} if forward else None,
        },
        "email": {
            "message_id": dedup_key,
            "dedup_key": dedup_key,
            "fingerprint": hashlib.sha256(dedup_key.encode()).hexdigest(),
            "subject": "Quarterly report",
            "date": datetime(2024, 5, 6, 9, 0, tzinfo=timezone(timedelta(hours=2))),
            "from_": [{"name": "Carol", "address": "carol@example.org"}],
            "to": [
                {"name": "Alice", "address": "alice@example.com"},
                {"name": "Bob", "address": "bob@example.com"},
                {"name": "Alice again", "address": "alice@example.com"},
                {"name": "Alice shouting", "address": "ALICE@example.COM"},  # the same party
            ],
            "cc": [{"address": "support@example.com"}],
            "reply_to": [],
            "text": "Hello,\nthe report is attached.\n",
            "html": "<p>Hello</p>",
            "attachments": attachments or [],
            "defects": ["MissingHeaderBodySeparatorDefect"],
            "size": 4321,
        },
        "deliveries": deliveries or [user_delivery("alice")],
    }
    codec = Codec()
    return codec.decode("routed", codec.encode("routed", document))


def user_delivery(name: str, method: str = "direct") -> dict[str, Any]:
    return {
        "principal_kind": "user",
        "principal": name,
        "address": f"{name}@example.com",
        "mailbox": name if method == "direct" else "forwards",
        "method": method,
        "evidence": {"matched": "to", "header": f"{name}@example.com"},
    }


def queue_delivery(name: str) -> dict[str, Any]:
    return {
        "principal_kind": "queue",
        "principal": name,
        "address": f"{name}@example.com",
        "mailbox": name,
        "method": "direct",
        "evidence": {"matched": "cc"},
    }


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- migrations --------------------------------------------------------------------------------


def assert_migrations_match_tables(engine: Engine) -> None:
    assert current_revision(engine) is None
    upgrade(engine)
    upgrade(engine)  # a second run finds nothing to do
    head = ScriptDirectory(str(migrations_folder())).get_current_head()
    assert head is not None
    assert current_revision(engine) == head
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, build_tables().metadata) == []


def test_migrations_produce_the_tables_on_sqlite(tmp_path: Any) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'nested' / 'folder' / 'm.db'}")
    try:
        assert_migrations_match_tables(engine)
        assert (tmp_path / "nested" / "folder" / "m.db").exists()
    finally:
        engine.dispose()


def test_migrations_produce_the_tables_on_postgresql(empty_postgres_database_url: str) -> None:
    engine = create_engine_for(empty_postgres_database_url)
    try:
        assert_migrations_match_tables(engine)
    finally:
        engine.dispose()


def test_upgrade_accepts_a_url(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'by-url.db'}"
    upgrade(url)
    engine = create_engine_for(url)
    try:
        assert current_revision(engine) is not None
    finally:
        engine.dispose()


@pytest.mark.parametrize("given", ["postgresql://u@h/db", "postgres://u@h/db",
                                   "postgresql+psycopg://u@h/db"])
def test_postgresql_urls_use_psycopg_3(given: str) -> None:
    assert normalise_url(given).drivername == "postgresql+psycopg"


def test_sqlite_engine_uses_wal_and_foreign_keys(tmp_path: Any) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'pragmas.db'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        engine.dispose()


# -- saving ------------------------------------------------------------------------------------


def test_the_same_document_twice_changes_nothing(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    document = routed_document(attachments=[attachment(b"%PDF-1.4 report")])

    [first] = store.save([document])
    counts = store.count_rows()
    [second] = store.save([copy.deepcopy(document)])

    assert first.email_new and first.deliveries[0].new
    assert not second.email_new and not second.deliveries[0].new
    assert not second.changed_anything
    assert second.email_id == first.email_id
    assert store.count_rows() == counts
    assert counts["emails"] == 1 and counts["deliveries"] == 1
    assert counts["attachments"] == 1 and counts["attachment_contents"] == 1


def test_an_email_routed_to_three_principals_is_one_email(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    documents = [
        routed_document(deliveries=[user_delivery("alice")], source_mailbox="alice"),
        routed_document(deliveries=[user_delivery("bob", method="forward")],
                        source_mailbox="forwards", forward=True, uid="9"),
        routed_document(deliveries=[queue_delivery("support")], source_mailbox="support"),
    ]

    results = [store.save([document])[0] for document in documents]

    assert [r.email_new for r in results] == [True, False, False]
    assert all(r.deliveries[0].new for r in results)
    assert len({r.email_id for r in results}) == 1
    counts = store.count_rows()
    assert (counts["emails"], counts["deliveries"], counts["queue_items"]) == (1, 3, 1)
    deliveries = store.deliveries_for(results[0].email_id)
    assert {(d["principal_kind"], d["principal"], d["method"]) for d in deliveries} == {
        ("user", "alice", "direct"), ("user", "bob", "forward"), ("queue", "support", "direct")
    }
    bob = next(d for d in deliveries if d["principal"] == "bob")
    assert (bob["source_mailbox"], bob["source_uid"], bob["source_uidvalidity"]) == (
        "forwards", "9", 7)
    assert bob["evidence"] == {"matched": "to", "header": "bob@example.com"}
    [item] = store.queue_items_for(results[0].email_id)
    assert (item["queue"], item["state"]) == ("support", "active")


def test_one_batch_holding_the_same_email_twice(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    batch = [
        routed_document(deliveries=[user_delivery("alice"), queue_delivery("support")]),
        routed_document(deliveries=[user_delivery("bob", method="forward")], forward=True),
        routed_document(deliveries=[user_delivery("alice")]),  # a redelivery inside the batch
    ]

    results = store.save(batch)

    assert [r.email_new for r in results] == [True, False, False]
    assert [[d.new for d in r.deliveries] for r in results] == [[True, True], [True], [False]]
    counts = store.count_rows()
    assert (counts["emails"], counts["deliveries"], counts["queue_items"]) == (1, 3, 1)
    assert counts["parties"] == 4  # from carol; to alice, bob (alice once); cc support


def test_a_batch_mixing_stored_and_new_emails(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    [stored] = store.save([routed_document("<old@example.com>")])
    parties = store.parties_for(stored.email_id)

    results = store.save([
        routed_document("<old@example.com>", deliveries=[user_delivery("bob")]),
        routed_document("<new@example.com>", deliveries=[queue_delivery("support")]),
        routed_document("<old@example.com>"),  # a redelivery of the stored one
        routed_document("<new@example.com>", deliveries=[user_delivery("alice")]),
    ])

    assert [r.email_new for r in results] == [False, True, False, False]
    assert [[d.new for d in r.deliveries] for r in results] == [[True], [True], [False], [True]]
    assert results[0].email_id == results[2].email_id == stored.email_id
    assert results[1].email_id == results[3].email_id != stored.email_id
    counts = store.count_rows()
    assert (counts["emails"], counts["deliveries"], counts["queue_items"]) == (2, 4, 1)
    assert counts["parties"] == 8  # four each, the stored email's not written again
    assert store.parties_for(stored.email_id) == parties
    new = store.email(results[1].email_id)
    assert new is not None and new["thread_id"] == results[1].email_id


def test_a_connection_lost_before_the_pipelined_look_up_is_transient_then_remade(
        database: Engine) -> None:
    """PostgreSQL ends the kept connection between two batches: the next batch's look-up
    (BEGIN, emails and parties in one psycopg pipeline) fails as TransientError, nothing is
    stored, and the batch after makes a new connection and stores it all."""
    store = EmailStore(database)
    store.save([routed_document("<before@example.com>")])
    with database.connect() as admin:
        admin.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with pytest.raises(TransientError, match="database unavailable"):
        store.save([routed_document("<after@example.com>")])
    assert store.count_rows()["emails"] == 1

    [result] = store.save([routed_document("<after@example.com>")])
    assert result.email_new
    assert store.count_rows()["emails"] == 2


def test_a_batch_that_loses_a_new_email_to_another_writer_is_redone(database: Engine) -> None:
    class Interrupted(EmailStore):
        """Another writer stores the same email between this batch's look-up and insert."""

        looked_up = 0

        def _look_up(self, *args: Any, **kwargs: Any) -> Any:
            found = super()._look_up(*args, **kwargs)
            self.looked_up += 1
            if self.looked_up == 1:
                EmailStore(database).save([routed_document("<race@example.com>")])
            return found

    store = Interrupted(database)
    [result] = store.save([routed_document("<race@example.com>",
                                           deliveries=[user_delivery("bob")])])

    assert store.looked_up == 2
    assert not result.email_new and result.deliveries[0].new
    counts = store.count_rows()
    assert (counts["emails"], counts["deliveries"], counts["parties"]) == (1, 2, 4)
    assert {d["principal"] for d in store.deliveries_for(result.email_id)} == {"alice", "bob"}


def test_email_fields_are_stored_faithfully(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    [result] = store.save([routed_document()])

    email = store.email(result.email_id)
    assert email is not None
    assert email["subject"] == "Quarterly report"
    assert email["from_address"] == "carol@example.org"
    assert email["sent_at"] == datetime(2024, 5, 6, 7, 0, tzinfo=UTC)
    assert email["sent_at"].tzinfo is not None and email["first_seen_at"].tzinfo is not None
    assert email["defects"] == ["MissingHeaderBodySeparatorDefect"]
    assert email["trace_id"] == "trace-1"
    assert store.parties_for(result.email_id) == [
        {"role": "from", "address": "carol@example.org", "name": "Carol"},
        {"role": "to", "address": "alice@example.com", "name": "Alice"},
        {"role": "to", "address": "bob@example.com", "name": "Bob"},
        {"role": "cc", "address": "support@example.com", "name": ""},
    ]
    [listed] = store.list_emails(limit=5)
    assert (listed["id"], listed["deliveries"]) == (result.email_id, 1)


def test_text_the_database_cannot_hold_is_cleaned_not_refused(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    document = routed_document()
    document["email"]["text"] = "before\x00after \udce9"

    [result] = store.save([document])

    email = store.email(result.email_id)
    assert email is not None
    assert email["text_body"] == "before\ufffdafter ?"


def test_attachment_content_is_stored_once(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    shared_pdf = b"%PDF-1.4 the same bytes in two emails"
    results = store.save([
        routed_document("<one@example.com>", attachments=[attachment(shared_pdf, "a.pdf")]),
        routed_document("<two@example.com>", attachments=[attachment(shared_pdf, "b.pdf"),
                                                           attachment(b"other", "c.pdf")]),
    ])

    counts = store.count_rows()
    assert (counts["emails"], counts["attachments"], counts["attachment_contents"]) == (2, 3, 2)
    sha = hashlib.sha256(shared_pdf).hexdigest()
    assert store.attachment_content(sha) == shared_pdf
    assert [a["filename"] for a in store.attachments_for(results[1].email_id)] == [
        "b.pdf", "c.pdf"]

    store.save([routed_document("<three@example.com>", attachments=[attachment(shared_pdf)])])
    assert store.count_rows()["attachment_contents"] == 2


def test_declared_filenames_are_stored_beside_the_shown_ones(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    generated = {**attachment(b"one", "attachment-1"), "declared_filename": None}
    unsafe = {**attachment(b"two", "evil.dll"), "declared_filename": "C:\\Windows\\evil.dll"}
    older = attachment(b"three", "old.pdf")  # parsed before documents carried the field
    [result] = store.save([routed_document(attachments=[generated, unsafe, older])])
    assert [(a["filename"], a["declared_filename"])
            for a in store.attachments_for(result.email_id)] == [
        ("attachment-1", None), ("evil.dll", "C:\\Windows\\evil.dll"), ("old.pdf", None)]


def test_an_attachment_whose_hash_lies_is_refused(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    lying = attachment(b"real bytes")
    lying["sha256"] = hashlib.sha256(b"other bytes").hexdigest()

    with pytest.raises(PermanentError) as caught:
        store.save([routed_document(attachments=[lying])])

    assert caught.value.reason == "unstorable"
    assert store.count_rows()["emails"] == 0


def test_a_bad_document_fails_the_batch_and_the_rest_save_one_by_one(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    bad = routed_document("<bad@example.com>")
    bad["deliveries"][0]["principal_kind"] = "robot"  # refused by the database's CHECK
    batch = [routed_document("<good1@example.com>"), bad, routed_document("<good2@example.com>")]

    with pytest.raises(PermanentError) as caught:
        store.save(batch)

    assert caught.value.reason == "unstorable"
    assert "principal_kind" in caught.value.detail
    assert set(store.count_rows().values()) == {0}  # the whole batch rolled back

    outcomes = []
    for document in batch:
        try:
            store.save([document])
            outcomes.append("saved")
        except PermanentError as error:
            outcomes.append(error.reason)
    assert outcomes == ["saved", "unstorable", "saved"]
    assert store.count_rows()["emails"] == 2


@pytest.mark.parametrize("damage", ["no-dedup-key", "no-deliveries", "size-not-int",
                                    "naive-date", "not-a-dict"])
def test_malformed_documents_are_unstorable(db_engine: Engine, damage: str) -> None:
    store = EmailStore(db_engine)
    document: Any = routed_document()
    if damage == "no-dedup-key":
        del document["email"]["dedup_key"]
    elif damage == "no-deliveries":
        document["deliveries"] = []
    elif damage == "size-not-int":
        document["email"]["size"] = "big"
    elif damage == "naive-date":
        document["email"]["date"] = datetime(2024, 1, 1)
    else:
        document = "not a document"

    with pytest.raises(PermanentError) as caught:
        store.save([routed_document("<fine@example.com>"), document])

    assert caught.value.reason == "unstorable"
    assert store.count_rows()["emails"] == 0


def test_concurrent_writers_store_each_email_once(db_engine: Engine) -> None:
    batch = [
        routed_document(f"<m{i}@example.com>",
                        deliveries=[user_delivery("alice"), queue_delivery("support")])
        for i in range(30)
    ]
    results: list[list[Any]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3, timeout=60)

    def writer(documents: list[dict[str, Any]]) -> None:
        start.wait()
        # Under contention a deadlock or a busy SQLite is a TransientError, which the worker
        # runtime retries; the store's promise is exactly-once effects across those retries.
        for _ in range(20):
            try:
                results.append(EmailStore(db_engine).save(documents))
                return
            except TransientError:
                continue
            except BaseException as error:  # surfaced by the assertion below
                errors.append(error)
                return
        errors.append(AssertionError("still failing after 20 transient errors"))

    threads = [threading.Thread(target=writer, args=(list(order),))
               for order in (batch, list(reversed(batch)), batch[::2] + batch[1::2])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    counts = EmailStore(db_engine).count_rows()
    assert (counts["emails"], counts["deliveries"], counts["queue_items"]) == (30, 60, 30)
    new_emails = sum(r.email_new for batch_results in results for r in batch_results)
    assert new_emails == 30


def test_an_unreachable_database_is_a_transient_error() -> None:
    engine = create_engine_for(f"postgresql://postgres@127.0.0.1:{closed_port()}/mailroute")
    try:
        with pytest.raises(TransientError):
            EmailStore(engine).save([routed_document()])
        with pytest.raises(TransientError):
            MailboxStateStore(engine).cursor("alice", "INBOX")
        with pytest.raises(TransientError):
            upgrade(engine)
    finally:
        engine.dispose()


# -- the stage ---------------------------------------------------------------------------------


def test_persist_stage_ends_the_pipeline(db_engine: Engine) -> None:
    stage = PersistStage(EmailStore(db_engine))
    assert isinstance(stage, BatchStage)
    assert (stage.name, stage.input_edge) == ("persist", "routed")

    assert stage.handle(routed_document("<a@example.com>")) == []
    assert stage.handle_batch([routed_document("<b@example.com>"),
                               routed_document("<c@example.com>")]) == [[], []]
    assert EmailStore(db_engine).count_rows()["emails"] == 3


# -- mailbox state -----------------------------------------------------------------------------


def test_cursor_moves_forward_only_within_one_uidvalidity(db_engine: Engine) -> None:
    states = MailboxStateStore(db_engine)
    assert states.cursor("alice", "INBOX") is None

    assert states.save_cursor("alice", "INBOX", 7, 100) == Cursor(7, 100)
    assert states.save_cursor("alice", "INBOX", 7, 50) == Cursor(7, 100)
    assert states.cursor("alice", "INBOX") == Cursor(7, 100)
    assert states.save_cursor("alice", "INBOX", 7, 120) == Cursor(7, 120)
    # A new UIDVALIDITY means the old UIDs mean nothing: start again from what is given.
    assert states.save_cursor("alice", "INBOX", 8, 3) == Cursor(8, 3)
    assert states.cursor("alice", "INBOX") == Cursor(8, 3)
    assert states.cursor("alice", "Archive") is None
    assert states.save_cursor("pop", "INBOX", None, 5) == Cursor(None, 5)
    assert states.save_cursor("pop", "INBOX", None, 4) == Cursor(None, 5)


def test_poll_bookkeeping(db_engine: Engine) -> None:
    states = MailboxStateStore(db_engine)
    t0 = datetime(2024, 5, 6, 10, 0, tzinfo=UTC)

    states.record_poll("alice", "INBOX", ok=True, fetched=5, at=t0)
    states.record_poll("alice", "INBOX", ok=False, error="connection refused",
                       at=t0 + timedelta(minutes=1))
    failing = states.record_poll("alice", "INBOX", ok=False, error="timed out",
                                 at=t0 + timedelta(minutes=2))

    assert (failing.status, failing.consecutive_failures, failing.last_error) == (
        "failing", 2, "timed out")
    assert failing.last_success_at == t0
    assert failing.last_poll_at == t0 + timedelta(minutes=2)

    recovered = states.record_poll("alice", "INBOX", ok=True, fetched=3,
                                   at=t0 + timedelta(minutes=3))
    assert (recovered.status, recovered.consecutive_failures, recovered.last_error) == (
        "success", 0, None)
    assert recovered.messages_fetched == 8
    assert recovered.last_success_at == t0 + timedelta(minutes=3)

    states.save_cursor("alice", "INBOX", 7, 10)
    states.mark_disabled("queue", "INBOX")
    all_states = states.all_states()
    assert [(s.mailbox, s.folder, s.status) for s in all_states] == [
        ("alice", "INBOX", "success"), ("queue", "INBOX", "disabled")]
    assert (all_states[0].uidvalidity, all_states[0].last_uid) == (7, 10)
    assert all_states[0].messages_fetched == 8  # saving the cursor keeps the counters
