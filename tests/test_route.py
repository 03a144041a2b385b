"""Routing on real messages from ../shared/corpus, parsed by the parse stage: no server."""

from __future__ import annotations

from typing import Any

import pytest

from parse.extract import parse_raw
from route.directory import Directory, normalise_address
from route.router import route
from route.worker import RouteStage
from shared.errors import PermanentError
from shared.schemas import Codec
from shared.settings import LimitSettings, MailboxSettings, PrincipalSettings, Settings
from tests import documents
from tests.corpus import corpus_folder

CORPUS = corpus_folder()
RT_FORWARD = "request-tracker/email-file-attachment.eml"  # Apple Mail, forwarded by user1
DJANGO_FORWARD = "django-mailbox/message_with_rfc822_attachment.eml"
PLAIN = "ruby-mail/plain_emails/raw_email8.eml"


def settings(forwarder: str = "User1@Example.com") -> Settings:
    return Settings(
        mailboxes=(MailboxSettings(name="jim", kind="maildir", path="/x"),
                   MailboxSettings(name="support", kind="maildir", path="/y"),
                   MailboxSettings(name="fwd", kind="maildir", path="/z", forward=True)),
        users=(PrincipalSettings(name="jim", address=forwarder, forward="fwd"),
               PrincipalSettings(name="adam", address="test@adamcoddington.net",
                                 forward="fwd"),
               PrincipalSettings(name="ann", address="ann@example.com", mailbox="jim")),
        queues=(PrincipalSettings(name="support", address="support@example.com",
                                  mailbox="support"),))


def parsed_from_corpus(name: str, mailbox: str, kind: str) -> list[dict[str, Any]]:
    raw = (CORPUS / name).read_bytes()
    result = parse_raw(raw, kind, LimitSettings())
    return [{"trace_id": "t", "source": documents.source(mailbox, kind),
             "envelope": envelope, "email": email} for envelope, email in result.items()]


def test_direct_mailbox_delivers_to_its_owner() -> None:
    [doc] = parsed_from_corpus(PLAIN, "jim", "direct")
    [delivery] = route(doc, Directory(settings()))
    assert (delivery["principal_kind"], delivery["principal"], delivery["method"]) == (
        "user", "ann", "direct")
    assert delivery["evidence"] == {"decided_by": "receiving-mailbox", "mailbox": "jim"}


def test_queue_mailbox_delivers_to_the_queue() -> None:
    [doc] = parsed_from_corpus(PLAIN, "support", "direct")
    [delivery] = route(doc, Directory(settings()))
    assert (delivery["principal_kind"], delivery["principal"]) == ("queue", "support")


def test_forward_envelope_is_delivered_to_the_configured_forwarder_with_evidence() -> None:
    [doc] = parsed_from_corpus(RT_FORWARD, "fwd", "forward")
    [delivery] = route(doc, Directory(settings()))
    assert (delivery["principal"], delivery["method"], delivery["mailbox"]) == (
        "jim", "forward", "fwd")
    evidence = delivery["evidence"]
    assert evidence["decided_by"] == "envelope-from"
    assert evidence["forwarder"] == "user1@example.com"
    # the inner message was addressed to rt@example.com, not to jim: recorded, not hidden
    assert evidence["inner_recipient_agrees"] is False


def test_forward_evidence_records_agreement_of_the_inner_recipient() -> None:
    [doc] = parsed_from_corpus(DJANGO_FORWARD, "fwd", "forward")
    [delivery] = route(doc, Directory(settings()))
    assert delivery["principal"] == "adam"
    assert delivery["evidence"]["inner_recipient_agrees"] is True


def test_envelope_from_an_unconfigured_forwarder_is_refused() -> None:
    [doc] = parsed_from_corpus(RT_FORWARD, "fwd", "forward")
    with pytest.raises(PermanentError) as refused:
        route(doc, Directory(settings(forwarder="someone-else@example.com")))
    assert refused.value.reason == "untrusted-forwarder"
    assert "user1@example.com" in refused.value.detail


def test_wrapped_envelope_in_a_direct_mailbox_is_refused() -> None:
    config = settings()
    doc = parsed_from_corpus(RT_FORWARD, "fwd", "forward")[0]
    doc["source"]["mailbox"] = "jim"  # a direct mailbox handed a wrapped envelope
    with pytest.raises(PermanentError) as refused:
        route(doc, Directory(config))
    assert refused.value.reason == "not-a-forward-mailbox"


def test_mailbox_nobody_owns_is_a_named_error() -> None:
    [doc] = parsed_from_corpus(PLAIN, "fwd-typo", "direct")
    with pytest.raises(PermanentError) as refused:
        route(doc, Directory(settings()))
    assert refused.value.reason == "unassigned-mailbox"


def test_route_stage_output_satisfies_the_routed_schema() -> None:
    [doc] = parsed_from_corpus(RT_FORWARD, "fwd", "forward")
    codec = Codec()
    decoded = codec.decode("parsed", codec.encode("parsed", doc))
    [out] = RouteStage(Directory(settings())).handle(decoded)
    routed = codec.decode("routed", codec.encode(out.edge, out.document))
    assert routed["deliveries"][0]["principal"] == "jim"
    assert routed["email"]["message_id"] == "8DB138B7-D410-4640-81B0-7A3363EB0180@mac.com"


@pytest.mark.parametrize("raw, expected", [
    ("Alice@Example.COM", "alice@example.com"),
    (" <bob@example.com> ", "bob@example.com"),
    ("no-at-sign", ""),
    ("two@at@signs", ""),
])
def test_address_normalisation(raw: str, expected: str) -> None:
    assert normalise_address(raw) == expected
