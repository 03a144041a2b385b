"""Routing a batch with its threading lookups asked at once gives what routing each email
alone gives (SQLite and PostgreSQL); on PostgreSQL the batch's lookups travel in one round
trip instead of one or more per email, counted in libpq's own protocol trace."""

from __future__ import annotations

import base64
import copy
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg.pq import Trace
from sqlalchemy import event
from sqlalchemy.engine import Engine

from parse.extract import parse_raw
from persist.directory_store import DirectoryStore
from persist.history import SqlHistory
from route.tracking import SENDER_UNKNOWN
from shared.schemas import Codec
from shared.settings import LimitSettings
from tests import documents
from tests.mailgen import crm_mail as mail
from tests.test_records_store import Pipeline, config

pytest_plugins = ["tests.db_fixtures"]

ROOT = bytes(range(22))


def parsed(raw: bytes, mailbox: str = "support") -> dict[str, Any]:
    codec = Codec()
    [(envelope, email)] = parse_raw(raw, "direct", LimitSettings()).items()
    document = {"trace_id": "t", "source": documents.source(mailbox), "envelope": envelope,
                "email": email}
    return codec.decode("parsed", codec.encode("parsed", document))


def thread_index(extra: bytes = b"") -> dict[str, str]:
    return {"Thread-Index": base64.b64encode(ROOT + extra).decode()}


def statements(engine: Engine) -> list[str]:
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: seen.append(statement))
    return seen


@contextmanager
def round_trips(connection: Any) -> Iterator[list[int]]:
    """How many round trips the psycopg ``connection`` made while the block ran (given in
    the list once it ends): each ends with the server's ReadyForQuery."""
    counted: list[int] = []
    with tempfile.TemporaryFile("w+") as trace:
        connection.pgconn.trace(trace.fileno())
        connection.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield counted
        finally:
            connection.pgconn.untrace()
        trace.seek(0)
        counted.append(sum("\tReadyForQuery" in line for line in trace))


def test_a_batch_routes_as_each_email_alone_in_fewer_queries(db_engine: Engine) -> None:
    run = Pipeline(db_engine, config())
    first = run(mail("m1@c", subject="Order 17"))
    run(mail("m2@c", subject="Invoice 5", headers=thread_index()))
    run(mail("m3@c", subject="Order 18", sender="dan@customer.example"))
    token = run.stage.router.token.render(first)
    batch = [parsed(raw) for raw in (
        mail("r1@c", subject="Re: Order 17", reply_to="m1@c"),
        mail("r2@c", subject="Something else", headers={"References": "<zz@c> <m1@c>"}),
        mail("r3@c", subject="Re: Invoice 5", headers=thread_index(b"\x01" * 5)),
        mail("r4@c", subject="RE: Order 18", sender="dan@customer.example"),
        mail("r5@c", subject=f"About {token}"),
        mail("r6@c", subject="Brand new"),
        mail("r7@c", subject="Re: Order 17", reply_to="nowhere@c"),
    )]
    seen = statements(db_engine)
    if db_engine.dialect.name == "postgresql":
        history = run.stage.router.history
        assert isinstance(history, SqlHistory)
        kept = history._kept._connection  # route's one kept connection, made by now
        assert kept is not None
        with round_trips(kept.connection.driver_connection) as alone_trips:
            alone = [run.stage.handle(copy.deepcopy(document)) for document in batch]
        seen.clear()
        with round_trips(kept.connection.driver_connection) as trips:
            together = run.stage.handle_batch(copy.deepcopy(batch))
        # the emails by id, by Message-ID, by root and by subject: one round trip for all
        # (statements sent through SQLAlchemy: none; the parties are cached by now)
        assert (trips, seen) == ([1], []), (trips, seen)
        # alone, each email's lookups travel together too: one round trip each at most
        assert 4 < alone_trips[0] <= len(batch), alone_trips
    else:
        alone = [run.stage.handle(copy.deepcopy(document)) for document in batch]
        together = run.stage.handle_batch(copy.deepcopy(batch))
    assert together == alone
    methods = [outputs[0].document["correlation"]["method"] for outputs in together]
    assert methods == ["in-reply-to", "references", "thread-index", "smart", "token", "none",
                       "smart"]


def test_a_single_email_with_one_lookup_is_routed_with_the_history_itself(
        db_engine: Engine) -> None:
    run = Pipeline(db_engine, config())
    document = parsed(mail("s1@c"))
    assert run.stage.router.history_for([document]) is run.stage.router.history


def test_a_single_emails_lookups_travel_in_one_round_trip(postgres_engine: Engine) -> None:
    """A mail with a Thread-Index and a subject to match (as Outlook's replies are) made two
    round trips when routed alone, each waiting for the database on a busy machine."""
    run = Pipeline(postgres_engine, config())
    run(mail("p1@c", subject="Invoice 9", headers=thread_index()))
    other_root = {"Thread-Index": base64.b64encode(bytes(range(1, 23))).decode()}
    document = parsed(mail("p2@c", subject="Re: Invoice 9", headers=other_root))
    history = run.stage.router.history
    assert isinstance(history, SqlHistory)
    kept = history._kept._connection
    assert kept is not None
    seen = statements(postgres_engine)
    with round_trips(kept.connection.driver_connection) as trips:
        outputs = run.stage.handle(copy.deepcopy(document))
    assert (trips, seen) == ([1], []), (trips, seen)
    # the root is not known: the subject lookup, asked with it, finds the thread
    assert outputs[0].document["correlation"]["method"] == "smart"


def test_a_batch_reads_each_emails_threading_facts_once(db_engine: Engine,
                                                         monkeypatch: Any) -> None:
    import route.router

    run = Pipeline(db_engine, config())
    read: list[str] = []
    original = route.router.thread_facts

    def counted(email: dict[str, Any], token: Any) -> Any:
        read.append(email["message_id"])
        return original(email, token)

    monkeypatch.setattr(route.router, "thread_facts", counted)
    batch = [parsed(mail(f"b{n}@c", subject=f"Order {n}")) for n in range(3)]
    outputs = run.stage.handle_batch(batch)
    assert len(outputs) == 3
    assert sorted(read) == ["b0@c", "b1@c", "b2@c"]  # prefetch and routing share them


def test_a_single_emails_sender_is_looked_up_with_its_threading(
        postgres_engine: Engine) -> None:
    """An uncached sender's contact is asked in the same round trip as the threading
    lookups (it was a round trip of its own), and its answer decides tracking as before."""
    run = Pipeline(postgres_engine, config(ann_track="contacts"))
    DirectoryStore(postgres_engine).add_contact("Gil", ["gil@new.example"])
    run(mail("g0@c", subject="Warm-up", to="ann@corp.example"))  # the connection is made
    history = run.stage.router.history
    assert isinstance(history, SqlHistory)
    kept = history._kept._connection
    assert kept is not None
    seen = statements(postgres_engine)
    other_root = {"Thread-Index": base64.b64encode(bytes(range(3, 25))).decode()}
    outcomes = []
    for mid, sender in (("g1@c", "gil@new.example"), ("h1@c", "hal@new.example")):
        document = parsed(mail(mid, sender=sender, subject=f"Hello from {sender}",
                               to="ann@corp.example", headers=other_root), mailbox="ann")
        with round_trips(kept.connection.driver_connection) as trips:
            [output] = run.stage.handle(copy.deepcopy(document))
        [delivery] = output.document["deliveries"]
        outcomes.append((trips[0], delivery["tracked"], delivery["untracked_reason"]))
    assert seen == []
    assert outcomes == [(1, True, None), (1, False, SENDER_UNKNOWN)], outcomes
