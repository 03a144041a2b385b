"""Property-based tests (Hypothesis) of parse and route: no server.

parse, on any bytes, on generated MIME messages and on real corpus messages with bytes
damaged: it ends in a result or a ``PermanentError`` (a named dead letter), within the time
budget; what it keeps passes the next edge's schema; attachments are stored by their hash
under safe names; the same bytes always give the same record key (redelivery must find the
same row).  route, on any parsed document: deliveries only to configured principals, once
each, or a named ``PermanentError``.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parse.extract import parse_raw
from route.directory import Directory
from route.router import route
from shared.errors import PermanentError
from shared.schemas import Codec
from shared.settings import LimitSettings, MailboxSettings, PrincipalSettings, Settings
from tests import documents, mail_strategies
from tests.test_hostile_input import TIME_BUDGET

PARSE_REASONS = {"message-too-large", "header-too-large", "too-many-parts", "nesting-too-deep",
                 "invalid-forward-mail-item", "unparseable"}
ROUTE_REASONS = {"unassigned-mailbox", "not-a-forward-mailbox", "untrusted-forwarder"}
FORWARDERS = ["bob@corp.example.com", "Carol@Corp.Example.com"]
CORPUS = mail_strategies.corpus_sample()
PROPERTY = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def directory_settings() -> Settings:
    return Settings(
        mailboxes=(MailboxSettings(name="alice", kind="maildir", path="/a"),
                   MailboxSettings(name="support", kind="maildir", path="/s"),
                   MailboxSettings(name="forward", kind="maildir", path="/f", forward=True)),
        users=(PrincipalSettings(name="alice", address="alice@corp.example.com",
                                 mailbox="alice"),
               PrincipalSettings(name="bob", address=FORWARDERS[0], forward="forward"),
               PrincipalSettings(name="carol", address=FORWARDERS[1], forward="forward")),
        queues=(PrincipalSettings(name="support", address="support@corp.example.com",
                                  mailbox="support"),))


def parse_checked(raw: bytes, kind: str = "direct") -> list[dict[str, Any]]:
    """Parse; assert the outcome is controlled and what is kept is sound; give the emails."""
    started = time.process_time()
    try:
        result = parse_raw(raw, kind, LimitSettings())
    except PermanentError as exc:
        assert exc.reason in PARSE_REASONS, exc.reason
        return []
    finally:
        assert time.process_time() - started < TIME_BUDGET
    codec = Codec()
    for envelope, email in result.items():
        codec.decode("parsed", codec.encode("parsed", {
            "trace_id": "t", "source": documents.source("alice", kind),
            "envelope": envelope, "email": email}))
        for attachment in email["attachments"]:
            assert attachment["size"] == len(attachment["content"])
            assert attachment["sha256"] == hashlib.sha256(attachment["content"]).hexdigest()
            name = attachment["filename"]
            assert name and "/" not in name and "\\" not in name and "\0" not in name
            assert "\u202e" not in name and not name.startswith(".")
        for text in (email["subject"], email["text"] or "", email["html"] or ""):
            text.encode("utf-8")  # no lone surrogates: the database would refuse them
    return result.emails


@PROPERTY
@given(st.binary(max_size=3000))
def test_parse_any_bytes_ends_in_a_result_or_a_named_failure(raw: bytes) -> None:
    parse_checked(raw)
    parse_checked(raw, "forward")


@PROPERTY
@given(mail_strategies.message())
def test_parse_generated_mime_ends_in_a_result_or_a_named_failure(raw: bytes) -> None:
    parse_checked(raw)


@PROPERTY
@given(mail_strategies.forward_envelope(FORWARDERS))
def test_parse_generated_forward_envelopes(raw: bytes) -> None:
    parse_checked(raw, "forward")


@PROPERTY
@given(mail_strategies.mutated(CORPUS or [b"Subject: x\r\n\r\nbody\r\n"]))
def test_parse_damaged_real_messages(raw: bytes) -> None:
    parse_checked(raw)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mail_strategies.message())
def test_the_same_bytes_give_the_same_record_key(raw: bytes) -> None:
    first, second = parse_checked(raw), parse_checked(raw)
    assert [e["dedup_key"] for e in first] == [e["dedup_key"] for e in second]
    assert [e["fingerprint"] for e in first] == [e["fingerprint"] for e in second]


@st.composite
def parsed_documents(draw: st.DrawFn) -> dict[str, Any]:
    mailbox = draw(st.sampled_from(["alice", "support", "forward", "nobody"]))
    kind = draw(st.sampled_from(["direct", "forward"]))
    forwarder = draw(st.one_of(st.none(), st.sampled_from(FORWARDERS).map(
        lambda a: a.upper() if draw(st.booleans()) else a), mail_strategies.address,
        mail_strategies.header_text))
    document = documents.parsed(**{"mailbox": mailbox, "kind": kind})
    document["envelope"].update({
        "kind": draw(st.sampled_from(["direct", "wrapped"])),
        "forwarder": None if forwarder is None else {"name": "", "address": forwarder}})
    document["email"]["to"] = [{"name": "", "address": a}
                               for a in draw(st.lists(mail_strategies.address, max_size=4))]
    return document


@settings(max_examples=200, deadline=None)
@given(parsed_documents())
def test_route_delivers_only_to_configured_principals_once_or_fails_by_name(
        document: dict[str, Any]) -> None:
    directory = Directory(directory_settings())
    try:
        deliveries = route(document, directory)
    except PermanentError as exc:
        assert exc.reason in ROUTE_REASONS, exc.reason
        return
    principals = [(d["principal_kind"], d["principal"]) for d in deliveries]
    assert principals and len(principals) == len(set(principals))
    mailbox = document["source"]["mailbox"]
    for delivery in deliveries:
        assert delivery["mailbox"] == mailbox
        if delivery["method"] == "forward":
            forwarder = document["envelope"]["forwarder"]["address"].lower()
            assert delivery["address"].lower() == forwarder
            assert mailbox == "forward"
        else:
            assert mailbox in ("alice", "support")
    assert route(document, directory) == deliveries  # pure
    Codec().encode("routed", {"trace_id": "t", "source": document["source"],
                              "email": document["email"], "deliveries": deliveries})
