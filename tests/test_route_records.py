"""Tracking, threading, rules and the attachment policy, on real messages: no server.

Messages come from ../shared/corpus (parsed by the parse stage) or are built by
``tests.mailgen.crm_mail``; earlier mail is a ``route.history.MemoryHistory``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from parse.extract import parse_raw
from route.directory import Directory, PartyMatch, base_address, strict_address
from route.history import KnownEmail, MemoryHistory
from route.router import Router
from route.rules import is_auto_reply
from route.threading import TrackingToken, normalise_subject, thread_index_root
from route.worker import RouteStage
from shared.metrics import Metrics
from shared.schemas import Codec
from shared.settings import (
    AccountSettings,
    AttachmentSettings,
    ContactSettings,
    LimitSettings,
    MailboxSettings,
    PrincipalSettings,
    RuleActions,
    RuleConditions,
    RuleSettings,
    Settings,
    ThreadingSettings,
)
from tests import documents
from tests.corpus import corpus_folder
from tests.mailgen import crm_mail

CORPUS = corpus_folder()
THREAD_INDEX_MAIL = "django-mailbox/bad_character_attachment.eml"  # Outlook, Thread-Index
REPLY_MAIL = "django-mailbox/message_with_long_content.eml"  # Gmail reply, to inbox+tag@
AUTO_REPLY_MAIL = "flanker/bounce/zed.eml"  # Auto-Submitted: auto-replied
NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def settings(track: str = "all", queue_track: str = "all",
             rules: tuple[RuleSettings, ...] = (), **extra: Any) -> Settings:
    return Settings(
        mailboxes=(MailboxSettings(name="ann", kind="maildir", path="/a"),
                   MailboxSettings(name="support", kind="maildir", path="/s")),
        users=(PrincipalSettings(name="ann", address="ann@corp.example", mailbox="ann",
                                 track=track),),
        queues=(PrincipalSettings(name="support", address="support@corp.example",
                                  mailbox="support", track=queue_track),),
        contacts=(ContactSettings(name="Carol", addresses=("carol@customer.example",)),),
        accounts=(AccountSettings(name="Acme", domains=("acme.example",)),),
        rules=rules, **extra)


def build(sender: str = "carol@customer.example", subject: str = "Order 17",
          body: str = "hello", headers: dict[str, str] | None = None,
          attachments: Sequence[tuple[str, bytes]] = (), to: str = "ann@corp.example") -> bytes:
    return crm_mail(f"{abs(hash((sender, subject, body)))}@customer.example", sender=sender,
                    subject=subject, body=body, headers=headers,
                    attachments=tuple(attachments), to=to)


def parsed(raw: bytes, mailbox: str = "ann") -> dict[str, Any]:
    [(envelope, email)] = parse_raw(raw, "direct", LimitSettings()).items()
    source = documents.source(mailbox)
    source["received_at"] = NOW
    return {"trace_id": "t", "source": source, "envelope": envelope, "email": email}


def corpus(name: str, mailbox: str = "ann") -> dict[str, Any]:
    return parsed((CORPUS / name).read_bytes(), mailbox)


def decide(doc: dict[str, Any], config: Settings, history: MemoryHistory | None = None) -> Any:
    return Router(config, history=history or MemoryHistory()).decide(doc)


# -- directory ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Carol@Customer.EXAMPLE", "carol@customer.example"),
    ("<carol@customer.example>", "carol@customer.example"),
    ('"alice@corp.example"@evil.example', None),  # CVE-2023-27043: two readings
    ("alice@corp.example@evil.example", None),
    ("alice@corp.example, bob@evil.example", None),
    ("alice (x@y) @corp.example", None),
    ("alice@corp..example", None),
    ("", None),
])
def test_strict_address_refuses_what_parses_two_ways(text: str, expected: str | None) -> None:
    assert strict_address(text) == expected


def test_plus_addressing_and_domain_case_match_configured_parties() -> None:
    directory = Directory(settings())
    assert base_address("carol+orders@customer.example") == "carol@customer.example"
    assert directory.configured_party("carol+orders@customer.example") == PartyMatch(
        "contact", "Carol", "config")
    assert directory.configured_party("bob@acme.example") == PartyMatch(
        "account", "Acme", "config")
    assert directory.configured_party("bob@other.example") is None


# -- tracking, every mode ------------------------------------------------------------------


def test_track_all_tracks_mail_from_anyone() -> None:
    [d] = decide(parsed(build(sender="stranger@nowhere.example")), settings("all")).deliveries
    assert (d["tracked"], d["untracked_reason"]) == (True, None)


def test_track_none_records_the_delivery_untracked_with_a_reason() -> None:
    [d] = decide(parsed(build()), settings("none")).deliveries
    assert (d["tracked"], d["untracked_reason"]) == (False, "tracking-off")


def test_track_contacts_accepts_configured_contacts_accounts_and_database_contacts() -> None:
    config = settings("contacts")
    for sender in ("carol@customer.example", "CAROL+x@Customer.Example", "dan@acme.example"):
        [d] = decide(parsed(build(sender=sender)), config).deliveries
        assert d["tracked"], sender
    [d] = decide(parsed(build(sender="eve@db.example")), config).deliveries
    assert (d["tracked"], d["untracked_reason"]) == (False, "sender-not-a-contact")
    history = MemoryHistory(parties={"eve@db.example": PartyMatch("contact", "Eve", "cli")})
    [d] = decide(parsed(build(sender="eve@db.example")), config, history).deliveries
    assert d["tracked"]


def test_track_contacts_refuses_an_ambiguous_sender() -> None:
    raw = build().replace(b"From: carol@customer.example",
                          b'From: "carol@customer.example" <x@evil.example>, y@evil.example')
    doc = parsed(raw)
    [d] = decide(doc, settings("contacts")).deliveries
    assert not d["tracked"]


def test_track_contacts_treats_a_quoted_at_sign_sender_as_unclear() -> None:
    raw = build().replace(b"From: carol@customer.example",
                          b'From: "carol@customer.example"@evil.example')
    decision = decide(parsed(raw), settings("contacts"))
    [d] = decision.deliveries
    assert (d["tracked"], d["untracked_reason"]) == (False, "sender-missing-or-ambiguous")
    assert "sender-missing-or-ambiguous" in decision.records["notes"]


def test_track_replies_only_follows_tracked_parents() -> None:
    doc = corpus(REPLY_MAIL)
    parent_id = "CAAqFzoA1U_QrzJ7X12SpE-AteNpjd6ad6x-mJh847_gtQM8kSw@mail.gmail.com"
    [d] = decide(doc, settings("replies")).deliveries
    assert (d["tracked"], d["untracked_reason"]) == (False, "not-a-reply-to-tracked-mail")
    history = MemoryHistory()
    history.add(KnownEmail(7, 7, parent_id, tracked=False))
    [d] = decide(doc, settings("replies"), history).deliveries
    assert not d["tracked"]
    history = MemoryHistory()
    history.add(KnownEmail(7, 7, parent_id, tracked=True))
    [d] = decide(doc, settings("replies"), history).deliveries
    assert d["tracked"]


def test_route_stage_counts_untracked_mail_by_reason() -> None:
    metrics = Metrics()
    stage = RouteStage(Router(settings("none")), metrics=metrics)
    stage.handle(parsed(build()))
    assert metrics.registry.get_sample_value(
        "mailroute_messages_untracked_total", {"stage": "route", "reason": "tracking-off"}) == 1


# -- threading, every method ----------------------------------------------------------------


def test_token_in_the_subject_links_to_the_email_it_names() -> None:
    token = TrackingToken("[CRM:{number:07d}]")
    assert token.render(1234) == "[CRM:0001234]"
    assert token.find("RE: Order [CRM:0001234] shipped") == 1234
    assert token.find("no token [CRM:12a]") is None
    history = MemoryHistory()
    history.add(KnownEmail(1234, 1200, "<p@x>", case_id=9))
    decision = decide(parsed(build(subject="RE: Order [CRM:0001234]")), settings(), history)
    c = decision.correlation
    assert (c["method"], c["parent_email_id"], c["thread_id"], c["case_id"], c["token"]) == (
        "token", 1234, 1200, 9, 1234)


def test_custom_token_format() -> None:
    token = TrackingToken("#{number}#")
    assert token.find("Re: help #42#") == 42
    assert normalise_subject("Re: help #42#", token) == "help"


def test_in_reply_to_links_a_real_gmail_reply() -> None:
    history = MemoryHistory()
    history.add(KnownEmail(3, 1, "CAAqFzoA1U_QrzJ7X12SpE-AteNpjd6ad6x-mJh847_gtQM8kSw"
                                 "@mail.gmail.com"))
    c = decide(corpus(REPLY_MAIL), settings(), history).correlation
    assert (c["method"], c["parent_email_id"], c["thread_id"]) == ("in-reply-to", 3, 1)


def test_references_link_when_the_direct_parent_is_unknown() -> None:
    raw = build(subject="Re: x", headers={"In-Reply-To": "<unknown@x>",
                                          "References": "<root@x> <middle@x> <unknown@x>"})
    history = MemoryHistory()
    history.add(KnownEmail(1, 1, "root@x"))
    history.add(KnownEmail(2, 1, "middle@x"))
    c = decide(parsed(raw), settings(), history).correlation
    assert (c["method"], c["parent_email_id"]) == ("references", 2)  # the nearest one
    assert c["candidates"] == ["unknown@x", "middle@x", "root@x"]


def test_outlook_thread_index_links_replies_of_one_conversation() -> None:
    doc = corpus(THREAD_INDEX_MAIL)
    root = thread_index_root(doc["email"]["headers"]["thread-index"])
    raw = base64.b64decode("AQHalWpdT02RNiNo9EacvmR/jo7DDw==")
    assert root == base64.b64encode(raw[:22]).decode()
    reply_index = base64.b64encode(raw + b"\x00\x01\x02\x03\x04").decode()
    assert thread_index_root([reply_index]) == root
    assert thread_index_root(["not base64!"]) is None
    assert thread_index_root([base64.b64encode(b"short").decode()]) is None
    history = MemoryHistory()
    history.add(KnownEmail(5, 4, "<other@x>"), thread_index_root=root)
    c = decide(doc, settings(), history).correlation
    assert (c["method"], c["parent_email_id"], c["thread_index_root"]) == (
        "thread-index", 5, root)


def test_smart_matching_needs_subject_participant_and_recency() -> None:
    key = normalise_subject("AW: WG: Re: [ext] Order 17", TrackingToken("[CRM:{number}]"))
    assert key == "order 17"
    history = MemoryHistory()
    history.add(KnownEmail(8, 8, "<o@x>"), subject_key="order 17",
                participants={"carol@customer.example"}, seen_at=NOW - timedelta(days=2))
    c = decide(parsed(build(subject="RE: Order 17")), settings(), history).correlation
    assert (c["method"], c["parent_email_id"]) == ("smart", 8)
    # another sender with the same subject: no shared participant (ann, the user, is internal)
    c = decide(parsed(build(sender="zed@else.example", subject="RE: Order 17")), settings(),
               history).correlation
    assert c["method"] == "none"
    # too old
    old = settings(threading=ThreadingSettings(smart_match_days=1))
    assert decide(parsed(build(subject="RE: Order 17")), old, history
                  ).correlation["method"] == "none"
    off = settings(threading=ThreadingSettings(smart_match=False))
    assert decide(parsed(build(subject="RE: Order 17")), off, history
                  ).correlation["method"] == "none"


def test_no_correlation_keeps_the_ids_for_persist_to_retry() -> None:
    c = decide(corpus(REPLY_MAIL), settings()).correlation
    assert c["method"] == "none" and c["parent_email_id"] is None
    assert c["candidates"] == [
        "CAAqFzoA1U_QrzJ7X12SpE-AteNpjd6ad6x-mJh847_gtQM8kSw@mail.gmail.com"]


# -- rules ------------------------------------------------------------------------------------


def rule(name: str, **kw: Any) -> RuleSettings:
    then = kw.pop("then", RuleActions(create_case=True))
    return RuleSettings(name=name, when=RuleConditions(**kw), then=then)


def fired(doc: dict[str, Any], *rules: RuleSettings, history: MemoryHistory | None = None,
          mailbox_settings: Settings | None = None) -> Any:
    decision = decide(doc, mailbox_settings or settings(rules=rules), history)
    return decision.deliveries[0].get("rule"), decision.records


@pytest.mark.parametrize("condition, matching, other", [
    ({"queue": "support"}, ("support", {}), ("ann", {})),
    ({"queue": "*"}, ("support", {}), ("ann", {})),
    ({"user": "ann"}, ("ann", {}), ("support", {})),
    ({"sender": "known"}, ("ann", {}), ("ann", {"sender": "x@unknown.example"})),
    ({"sender": "unknown"}, ("ann", {"sender": "x@unknown.example"}), ("ann", {})),
    ({"subject": r"\border\b"}, ("ann", {}), ("ann", {"subject": "Invoice"})),
    ({"body": "urgent|asap"}, ("ann", {"body": "please, ASAP"}), ("ann", {})),
])
def test_each_rule_condition(condition: dict[str, Any], matching: tuple[str, dict[str, Any]],
                             other: tuple[str, dict[str, Any]]) -> None:
    r = rule("r", **condition)
    name, records = fired(parsed(build(**matching[1]), matching[0]), r)
    assert name == "r" and records["case"] == "create" and records["rule"] == "r"
    name, records = fired(parsed(build(**other[1]), other[0]), r)
    assert name is None and records["case"] is None


def test_a_case_title_is_the_subject_without_surrounding_blanks() -> None:
    doc = parsed(build(subject="Order 17 broken  "))
    assert doc["email"]["subject"] == "Order 17 broken  "  # the record keeps it as written
    assert fired(doc, rule("r"))[1]["title"] == "Order 17 broken"


def test_thread_state_conditions() -> None:
    history = MemoryHistory()
    history.add(KnownEmail(1, 1, "root@x", case_id=None))
    history.add(KnownEmail(2, 2, "cased@x", case_id=4))
    new = parsed(build())
    existing = parsed(build(subject="Re", headers={"In-Reply-To": "<root@x>"}))
    cased = parsed(build(subject="Re", headers={"In-Reply-To": "<cased@x>"}))
    for state, yes, no in (("new", new, existing), ("existing", existing, new),
                           ("with-case", cased, existing), ("without-case", existing, cased)):
        r = rule(state, thread=state)
        assert fired(yes, r, history=history)[0] == state
        assert fired(no, r, history=history)[0] is None


def test_auto_reply_is_recognised_and_suppressed() -> None:
    bounce = corpus(AUTO_REPLY_MAIL)
    assert is_auto_reply(bounce["email"])
    assert is_auto_reply(parsed(build(subject="Automatic reply: Order 17"))["email"])
    assert is_auto_reply(parsed(build(headers={"Precedence": "bulk"}))["email"])
    assert not is_auto_reply(parsed(build(headers={"Auto-Submitted": "no"}))["email"])
    config = settings(rules=(rule("no auto-replies", auto_reply=True,
                                  then=RuleActions(suppress=True)),
                             rule("cases", then=RuleActions(create_case=True))))
    decision = decide(bounce, config)
    [d] = decision.deliveries
    assert (d["tracked"], d["untracked_reason"], d["rule"]) == (
        False, "suppressed-by-rule", "no auto-replies")
    assert decision.records["case"] is None
    [d] = decide(parsed(build()), config).deliveries
    assert d["tracked"] and d["rule"] == "cases"


def test_rules_are_evaluated_in_order_and_the_first_match_fires() -> None:
    first = rule("vip", sender="known", then=RuleActions(create_case=True, priority="high",
                                                         owner="ann"))
    second = rule("everyone", then=RuleActions(create_case=True, priority="low"))
    name, records = fired(parsed(build(), "support"), first, second)
    assert name == "vip"
    assert (records["priority"], records["owner"], records["queue"]) == ("high", "ann",
                                                                        "support")
    name, records = fired(parsed(build(sender="x@unknown.example"), "support"), first, second)
    assert (name, records["priority"]) == ("everyone", "low")


def test_link_case_by_thread_links_or_creates() -> None:
    history = MemoryHistory()
    history.add(KnownEmail(2, 2, "cased@x", case_id=4))
    both = rule("link", then=RuleActions(create_case=True, link_case=True))
    link_only = rule("link-only", then=RuleActions(link_case=True))
    reply = parsed(build(subject="Re", headers={"In-Reply-To": "<cased@x>"}))
    assert fired(reply, both, history=history)[1]["case"] == "link"
    assert fired(reply, both, history=history)[1]["case_id"] == 4
    assert fired(parsed(build()), both, history=history)[1]["case"] == "create"
    records = fired(parsed(build()), link_only, history=history)[1]
    assert records["case"] is None and records["link_case"] is True


# -- attachments ----------------------------------------------------------------------------


def test_attachment_policy_blocks_extensions_and_oversized_files() -> None:
    raw = build(attachments=[("invoice.pdf.EXE", b"MZ..."), ("big.bin", b"x" * 2000),
                             ("notes.txt", b"fine")])
    config = settings(attachments=AttachmentSettings(max_bytes=1000))
    decision = decide(parsed(raw), config)
    statuses = {a["filename"]: (a["status"], a["content"]) for a in
                decision.email["attachments"]}
    assert statuses == {"invoice.pdf.EXE": ("blocked-extension", b""),
                        "big.bin": ("too-large", b""), "notes.txt": ("stored", b"fine")}
    assert decision.records["notes"] == ["attachment-blocked:invoice.pdf.EXE",
                                         "attachment-too-large:big.bin:2000>1000"]


def test_routed_document_with_records_satisfies_the_schema() -> None:
    codec = Codec()
    config = settings(rules=(rule("cases"),))
    [out] = RouteStage(Router(config)).handle(
        codec.decode("parsed", codec.encode("parsed", parsed(build(
            attachments=[("x.exe", b"MZ")])))))
    routed = codec.decode("routed", codec.encode(out.edge, out.document))
    assert routed["deliveries"][0]["rule"] == "cases"
    assert routed["records"]["case"] == "create"
    assert routed["email"]["attachments"][0]["status"] == "blocked-extension"
    assert routed["correlation"]["method"] == "none"


@pytest.mark.parametrize("extra, message", [
    ({"rules": [{"name": "r", "when": {"subject": "("}}]}, "rules.r.when.subject: bad regular"),
    ({"rules": [{"name": "r", "when": {"queue": "nope"}}]}, "rules.r.when.queue: no queue"),
    ({"rules": [{"name": "r", "then": {"explode": True}}]}, "unknown key(s) explode"),
    ({"threading": {"token_format": "[CRM]"}}, "threading.token_format"),
    ({"contacts": [{"name": "c", "account": "none"}]}, "contacts.c.account"),
    ({"users": [{"name": "u", "address": "u@x.example", "mailbox": "m", "track": "some"}]},
     "users.u.track: 'some' is not one of"),
])
def test_records_settings_are_checked_at_load(tmp_path: Any, extra: dict[str, Any],
                                              message: str) -> None:
    import yaml

    from shared.settings import ConfigError, load_settings

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "mailboxes": [{"name": "m", "kind": "maildir", "path": "x"}], **extra}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path)
