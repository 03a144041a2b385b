"""Canaries without mail servers: recognised in real message bytes, marked seen, alerted on.

The canary is built by ``ingest.canary.build_canary``, wrapped as an Exchange rule wraps it
(forward as attachment; also the Graph stand-in's ``forwardAsAttachmentTo`` envelope) or
redirected as Pigeonhole's ``redirect`` leaves it (``X-Sieve-Redirected-From``), parsed by
``parse_raw`` and routed by the real Router: route is pure.  The bookkeeping
(``persist.canaries``) and persist's side run on SQLite and PostgreSQL; the hand-over to a
mail server is the one stand-in here (the integration test in ``test_canary_integration.py``
hands canaries to Dovecot over LMTP).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from ingest.canary import CanaryService, build_canary, canary_targets, new_canary_id
from parse.extract import parse_raw
from persist.canaries import Canary, CanaryStore, CanaryTarget
from persist.store import EmailStore
from persist.worker import PersistStage
from route.router import Router
from route.worker import RouteStage
from shared.cli import main
from shared.errors import PermanentError
from shared.fastschema import compile_loader
from shared.metrics import Metrics
from shared.schemas import Codec, RoutedSchema
from shared.settings import (
    CanarySettings,
    ConfigError,
    LimitSettings,
    MailboxSettings,
    PrincipalSettings,
    Settings,
)
from tests import documents, mailgen
from tests.graph_standin import forward_as_attachment

pytest_plugins = ["tests.db_fixtures"]

FORWARD = "forward@corp.example.com"
SENDER = "canary@mailroute.corp.example.com"
SETTINGS = Settings(
    mailboxes=(MailboxSettings(name="alice", kind="maildir", path="/a"),
               MailboxSettings(name="fwd", kind="maildir", path="/f", forward=True,
                               address=FORWARD)),
    users=(PrincipalSettings(name="alice", address="alice@corp.example.com", mailbox="alice"),
           PrincipalSettings(name="bob", address="bob@corp.example.com", forward="fwd"),
           PrincipalSettings(name="carol", address="carol@corp.example.com", forward="fwd")),
    queues=(PrincipalSettings(name="sales", address="sales@corp.example.com", forward="fwd"),),
    canaries=CanarySettings(enabled=True, interval=60, deadline=10,
                            delivery_url="lmtp://127.0.0.1:24", sender=SENDER))


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Handed:
    """Stands in for the mail server's hand-over: keeps what it was given, fails on demand."""

    def __init__(self, refuse: Sequence[str] = ()) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.refuse = set(refuse)

    def send(self, sender: str, messages: Sequence[tuple[str, bytes]]) -> list[str | None]:
        self.messages += messages
        return [f"550 no such user {rcpt}" if rcpt in self.refuse else None
                for rcpt, _ in messages]


def a_canary(principal: str = "bob", canary_id: str | None = None) -> Canary:
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    return Canary(id=canary_id or new_canary_id(), principal_kind="user", principal=principal,
                  address=f"{principal}@corp.example.com", forward_mailbox="fwd", sent_at=now,
                  deadline_at=now + timedelta(seconds=10), seen_at=None, outcome="sending",
                  detail=None)


def exchange_forward(raw: bytes, forwarder: str = "bob@corp.example.com") -> bytes:
    return mailgen.forward_envelope(forwarder, FORWARD, raw)


def graph_rule_forward(raw: bytes, user: str = "bob@corp.example.com") -> bytes:
    """What Exchange Online sends for the Graph rule ``forwardAsAttachmentTo`` (stand-in)."""
    return forward_as_attachment(user, FORWARD, raw)


def sieve_redirect(raw: bytes, user: str = "bob@corp.example.com") -> bytes:
    """What Pigeonhole's redirect hands on: the message, its headers above, unchanged."""
    return (f"Return-Path: <{SENDER}>\r\nX-Sieve-Redirected-From: {user}\r\n"
            f"Delivered-To: {user}\r\n").encode() + raw


def route_documents(raw: bytes, mailbox: str = "fwd", kind: str = "forward"
                    ) -> list[dict[str, Any]]:
    """parse then route, as the stages do; gives the routed documents (encoded and decoded)."""
    stage, codec = RouteStage(Router(SETTINGS)), Codec()
    routed = []
    for envelope, mail in parse_raw(raw, kind, LimitSettings()).items():
        parsed = {"trace_id": "t", "source": documents.source(mailbox, kind),
                  "envelope": envelope, "email": mail}
        parsed = codec.decode("parsed", codec.encode("parsed", parsed))
        for output in stage.handle(parsed):
            routed.append(codec.decode("routed", codec.encode("routed", output.document)))
    return routed


# -- route: recognising a canary is pure -------------------------------------------------------
@pytest.mark.parametrize("wrap", [exchange_forward, graph_rule_forward, sieve_redirect],
                         ids=["exchange-attachment", "graph-rule", "sieve-redirect"])
def test_a_forwarded_canary_is_routed_to_its_forwarder_without_records(
        wrap: Callable[[bytes], bytes]) -> None:
    canary = a_canary()
    raw = build_canary(canary, SENDER)
    assert b"Auto-Submitted" not in raw  # the forward check would take it for a loop
    [routed] = route_documents(wrap(raw))
    assert routed["canary"] == canary.id
    [delivery] = routed["deliveries"]
    assert (delivery["principal_kind"], delivery["principal"], delivery["method"]) == (
        "user", "bob", "forward")
    assert (delivery["tracked"], delivery["untracked_reason"]) == (False, "canary")
    assert routed["records"] == {} and routed["correlation"] == {}


def test_ordinary_mail_keeps_the_routed_shape_without_a_canary_key() -> None:
    raw = mailgen.message("customer@example.net", ["bob@corp.example.com"], "hello", "hi",
                          message_id="<plain@example.net>")
    [routed] = route_documents(exchange_forward(raw))
    assert "canary" not in routed
    assert routed["deliveries"][0]["tracked"] is True


def test_a_canary_header_on_someone_elses_mail_is_ignored() -> None:
    """Nobody keeps their mail out of the records by adding the header."""
    raw = (f"X-Mailroute-Canary: {new_canary_id()}\r\n".encode()
           + mailgen.message("customer@example.net", ["bob@corp.example.com"], "hello", "hi",
                             message_id="<forged@example.net>"))
    [routed] = route_documents(exchange_forward(raw))
    assert "canary" not in routed
    assert routed["deliveries"][0]["tracked"] is True


def test_the_canary_key_loads_alike_through_the_compiled_codec_and_marshmallow() -> None:
    [routed] = route_documents(exchange_forward(build_canary(a_canary(), SENDER)))
    data = json.loads(Codec().encode("routed", routed))
    assert compile_loader(RoutedSchema())(copy.deepcopy(data)) == RoutedSchema().load(data)
    assert data["canary"] == routed["canary"]


@pytest.mark.parametrize("value, detail", [
    ("short", "not a canary id"), ("bad id with spaces here", "not a canary id")])
def test_a_malformed_canary_header_is_dead_lettered_as_unknown_canary(
        value: str, detail: str) -> None:
    raw = build_canary(a_canary(), SENDER).replace(
        b"X-Mailroute-Canary: ", b"X-Mailroute-Canary: " + value.encode() + b"\r\nX-Old: ")
    with pytest.raises(PermanentError) as caught:
        route_documents(exchange_forward(raw))
    assert caught.value.reason == "unknown-canary"
    assert detail in caught.value.detail


def test_a_canary_from_someone_not_forwarding_here_is_untrusted() -> None:
    raw = exchange_forward(build_canary(a_canary(), SENDER), forwarder="mallory@evil.example")
    with pytest.raises(PermanentError) as caught:
        route_documents(raw)
    assert caught.value.reason == "untrusted-forwarder"


# -- persist: seen, or dead-lettered with the reason; never a record --------------------------
def _persist(engine: Engine, clock: Clock, metrics: Metrics | None = None
             ) -> tuple[PersistStage, CanaryStore]:
    store = CanaryStore(engine, clock)
    return PersistStage(EmailStore(engine, clock), store, metrics), store


def _record(store: CanaryStore, *principals: str, force: bool = True) -> list[Canary]:
    targets = [t for t in canary_targets(SETTINGS) if t.principal in principals]
    return store.start_round(targets, 60, 10, new_canary_id, force=force)


def test_persist_marks_a_canary_seen_once_and_stores_no_email(db_engine: Engine) -> None:
    clock, metrics = Clock(), Metrics()
    stage, store = _persist(db_engine, clock, metrics)
    [sent] = _record(store, "bob")
    store.mark_sent(sent.id)
    [routed] = route_documents(sieve_redirect(build_canary(sent, SENDER)))
    ordinary = route_documents(exchange_forward(mailgen.message(
        "customer@example.net", ["bob@corp.example.com"], "hello", "hi",
        message_id="<plain@example.net>")))
    clock.advance(4)
    stage.handle_batch([routed, *ordinary])
    stage.handle(routed)  # redelivered: changes nothing
    seen = store.get(sent.id)
    assert seen is not None and seen.outcome == "seen" and seen.roundtrip == 4.0
    counts = EmailStore(db_engine).count_rows()
    assert (counts["emails"], counts["deliveries"]) == (1, 1)  # the ordinary mail only
    assert metrics.registry.get_sample_value(
        "mailroute_canary_seen_total", {"principal": "bob"}) == 1
    assert metrics.registry.get_sample_value("mailroute_canary_roundtrip_seconds_sum") == 4.0


def test_a_forged_canary_id_is_dead_lettered_as_unknown_canary(db_engine: Engine) -> None:
    stage, _ = _persist(db_engine, Clock())
    [routed] = route_documents(exchange_forward(build_canary(a_canary(), SENDER)))
    with pytest.raises(PermanentError) as caught:
        stage.handle(routed)
    assert caught.value.reason == "unknown-canary"
    assert EmailStore(db_engine).count_rows()["emails"] == 0


def test_a_canary_arriving_through_another_users_rule_is_a_mismatch(db_engine: Engine) -> None:
    stage, store = _persist(db_engine, Clock())
    [for_carol] = _record(store, "carol")
    [routed] = route_documents(exchange_forward(build_canary(for_carol, SENDER),
                                                forwarder="bob@corp.example.com"))
    with pytest.raises(PermanentError) as caught:
        stage.handle(routed)
    assert caught.value.reason == "canary-principal-mismatch"
    assert "carol" in caught.value.detail and "bob" in caught.value.detail
    assert store.get(for_carol.id).seen_at is None  # type: ignore[union-attr]
    assert EmailStore(db_engine).count_rows()["emails"] == 0


# -- the schedule: one sender per round, whatever the number of ingest processes --------------
def test_only_one_process_claims_each_round(db_engine: Engine) -> None:
    clock = Clock()
    first, second = CanaryStore(db_engine, clock), CanaryStore(db_engine, clock)
    targets = canary_targets(SETTINGS)
    first.schedule(targets)
    second.schedule(targets)  # both processes start: the rows are made once
    assert {c.principal for c in first.start_round(targets, 60, 10, new_canary_id)} == {
        "bob", "carol", "sales"}
    assert second.start_round(targets, 60, 10, new_canary_id) == []
    clock.advance(59)
    assert second.start_round(targets, 60, 10, new_canary_id) == []
    clock.advance(1)
    assert len(second.start_round(targets, 60, 10, new_canary_id)) == 3
    assert first.start_round(targets, 60, 10, new_canary_id) == []
    # the interval shortened (a new configuration): due at once, not an old interval later
    clock.advance(1)
    assert len(first.start_round(targets, 20, 10, new_canary_id)) == 3
    assert second.start_round(targets, 20, 10, new_canary_id) == []


def test_racing_processes_send_each_principal_one_canary_per_round(db_engine: Engine) -> None:
    clock, targets = Clock(), canary_targets(SETTINGS)
    CanaryStore(db_engine, clock).schedule(targets)
    start = threading.Barrier(6)

    def one_process() -> list[Canary]:
        store = CanaryStore(db_engine, clock)
        start.wait()
        return store.start_round(targets, 60, 10, new_canary_id)

    with ThreadPoolExecutor(max_workers=6) as pool:
        rounds = [f.result() for f in [pool.submit(one_process) for _ in range(6)]]
    assert sorted(c.principal for found in rounds for c in found) == ["bob", "carol", "sales"]


# -- the monitor: alert on the missing, clear on the next arrival -----------------------------
def _service(engine: Engine, clock: Clock, metrics: Metrics, handed: Handed
             ) -> tuple[CanaryService, CanaryStore]:
    store = CanaryStore(engine, clock)
    return CanaryService(SETTINGS, store, metrics, handed), store  # type: ignore[arg-type]


def _gauge(metrics: Metrics, principal: str) -> float | None:
    return metrics.registry.get_sample_value("mailroute_canary_missing",
                                             {"principal": principal})


def test_a_missing_canary_raises_that_users_alert_until_a_later_one_arrives(
        db_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    clock, metrics, handed = Clock(), Metrics(), Handed()
    service, store = _service(db_engine, clock, metrics, handed)
    first = {c.principal: c for c in service.send_due()}
    assert set(first) == {"bob", "carol", "sales"}
    assert sorted(rcpt for rcpt, _ in handed.messages) == [
        "bob@corp.example.com", "carol@corp.example.com", "sales@corp.example.com"]
    for principal in ("bob", "sales"):  # carol's rule is gone: hers never comes
        store.mark_seen(first[principal].id, first[principal].principal_kind, principal)
    clock.advance(9)
    service.check()
    assert _gauge(metrics, "carol") == 0  # not late yet
    clock.advance(1)
    with caplog.at_level(logging.ERROR, logger="ingest.canary"):
        states = service.check()
        service.check()  # raised once, not at every check
    alerts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT")]
    assert alerts == [
        "ALERT canary for user carol not seen in the forward mailbox fwd within 10 s: check "
        "the user's forwarding rule (`mailroute rules check --user carol`)"]
    assert {key[1]: s.state for key, s in states.items()} == {
        "bob": "ok", "carol": "missing", "sales": "ok"}
    assert (_gauge(metrics, "carol"), _gauge(metrics, "bob"), _gauge(metrics, "sales")) == (1, 0, 0)
    assert metrics.registry.get_sample_value(
        "mailroute_mailbox_alerts_total", {"mailbox": "carol", "kind": "canary"}) == 1
    clock.advance(50)
    second = {c.principal: c for c in service.send_due()}
    service.check()
    assert _gauge(metrics, "carol") == 1  # the next one is on its way: still alerting
    store.mark_seen(second["carol"].id, "user", "carol")  # the rule was mended
    assert service.check()[("user", "carol")].state == "ok"
    assert _gauge(metrics, "carol") == 0
    assert metrics.registry.get_sample_value(
        "mailroute_canary_sent_total", {"principal": "carol"}) == 2


def test_a_canary_that_cannot_be_handed_over_is_recorded_failed_and_alerted(
        db_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    clock, metrics = Clock(), Metrics()
    service, store = _service(db_engine, clock, metrics, Handed(refuse=["bob@corp.example.com"]))
    with caplog.at_level(logging.ERROR, logger="ingest.canary"):
        sent = {c.principal: c for c in service.send_now(frozenset({"bob", "carol"}))}
    assert (sent["bob"].outcome, sent["carol"].outcome) == ("failed", "sent")
    assert store.get(sent["bob"].id).detail == "550 no such user bob@corp.example.com"  # type: ignore[union-attr]
    assert any("ALERT canary for user bob could not be sent" in r.getMessage()
               for r in caplog.records)
    assert metrics.registry.get_sample_value(
        "mailroute_canary_failed_total", {"principal": "bob"}) == 1
    assert service.check()[("user", "bob")].state == "failed"


def test_a_mail_server_outage_is_one_alert_line_not_one_per_user(
        db_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    class Down(Handed):
        def send(self, sender: str, messages: Sequence[tuple[str, bytes]]) -> list[str | None]:
            return ["cannot reach lmtp://127.0.0.1:24: ConnectionRefusedError"] * len(messages)

    service, _ = _service(db_engine, Clock(), Metrics(), Down())
    with caplog.at_level(logging.ERROR, logger="ingest.canary"):
        assert {c.outcome for c in service.send_due()} == {"failed"}
    assert [r.getMessage() for r in caplog.records] == [
        "ALERT canaries for 3 users/queues could not be sent: cannot reach "
        "lmtp://127.0.0.1:24: ConnectionRefusedError (queue sales, user bob, user carol)"]


def test_a_canary_never_handed_over_is_failed_not_missing(db_engine: Engine) -> None:
    clock = Clock()
    store = CanaryStore(db_engine, clock)
    [stuck] = _record(store, "bob")  # the sender died between recording and sending
    clock.advance(10)
    [expired] = store.expire()
    assert (expired.id, expired.outcome) == (stuck.id, "failed")
    assert "never handed over" in (expired.detail or "")


def test_send_now_names_a_user_without_a_forward_mailbox(db_engine: Engine) -> None:
    service, _ = _service(db_engine, Clock(), Metrics(), Handed())
    with pytest.raises(ConfigError, match="alice"):
        service.send_now(frozenset({"alice"}))


def test_old_canaries_are_pruned_but_each_users_last_verdict_stays(db_engine: Engine) -> None:
    clock = Clock()
    store = CanaryStore(db_engine, clock)
    [old_bob, old_carol] = _record(store, "bob", "carol")
    clock.advance(11)
    store.expire()
    clock.advance(8 * 86400)
    [new_bob] = _record(store, "bob")
    assert store.prune(timedelta(days=7)) == 1
    assert store.get(old_bob.id) is None and store.get(new_bob.id) is not None
    assert store.get(old_carol.id) is not None  # carol has nothing newer


def test_canary_targets_are_the_principals_with_a_forward_mailbox() -> None:
    assert canary_targets(SETTINGS) == [
        CanaryTarget("user", "bob", "bob@corp.example.com", "fwd"),
        CanaryTarget("user", "carol", "carol@corp.example.com", "fwd"),
        CanaryTarget("queue", "sales", "sales@corp.example.com", "fwd")]


# -- the CLI without servers -------------------------------------------------------------------
def test_the_canary_cli_names_what_is_missing_and_shows_each_forwarding_user(
        tmp_path: Path, sqlite_database_url: str) -> None:
    config = tmp_path / "mailroute.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": sqlite_database_url},
        "mailboxes": [{"name": "fwd", "kind": "maildir", "path": "fwd", "forward": True,
                       "address": FORWARD}],
        "users": [{"name": "bob", "address": "bob@corp.example.com", "forward": "fwd"}]}))
    runner = CliRunner()

    def mailroute(*args: str) -> Any:
        return runner.invoke(main, ["-c", str(config), "canary", *args])

    unsent = mailroute("send")
    assert unsent.exit_code == 2 and "canaries.delivery_url: not set" in unsent.output
    nobody = mailroute("send", "--user", "alice")
    assert nobody.exit_code == 2 and "alice" in nobody.output
    shown = mailroute("status")
    assert shown.exit_code == 0, shown.output
    assert [line.split() for line in shown.output.splitlines()[1:]] == [
        ["user", "bob", "-", "-", "-", "-", "never"]]
