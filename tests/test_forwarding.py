"""Forward mailboxes without servers: every envelope kind, whose mail it was, spoofing, loops.

Envelopes are built here with the standard library (Outlook .msg and TNEF payloads come from
../shared/corpus), parsed by parse_raw, then routed by route.router.route with a
ForwardPolicy, exactly as the parse and route stages do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as settings_hypothesis
from hypothesis import strategies as st

from parse.extract import parse_raw
from parse.limits import Budget
from route.directory import Directory
from route.forwarding import ForwardPolicy, parse_authentication_results
from route.router import route
from shared.errors import PermanentError
from shared.settings import (
    ConfigError,
    LimitSettings,
    MailboxSettings,
    PrincipalSettings,
    Settings,
    load_settings,
)
from tests import documents, mailgen

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
LIMITS = LimitSettings()
FORWARD = "forward@corp.example.com"


def settings(**trust: Any) -> Settings:
    return Settings(
        mailboxes=(MailboxSettings(name="alice", kind="maildir", path="/a"),
                   MailboxSettings(name="fwd", kind="maildir", path="/f", forward=True,
                                   address=FORWARD, **trust)),
        users=(PrincipalSettings(name="alice", address="alice@corp.example.com",
                                 mailbox="alice"),
               PrincipalSettings(name="bob", address="bob@corp.example.com", forward="fwd")),
        queues=(PrincipalSettings(name="sales", address="sales@corp.example.com",
                                  forward="fwd"),))


def routed(raw: bytes, config: Settings | None = None,
           limits: LimitSettings = LIMITS) -> list[dict[str, Any]]:
    config = config or settings()
    deliveries = []
    for envelope, mail in parse_raw(raw, "forward", limits).items():
        parsed = {"trace_id": "t", "source": documents.source("fwd", "forward"),
                  "envelope": envelope, "email": mail}
        deliveries.extend(route(parsed, Directory(config), ForwardPolicy(config)))
    return deliveries


def refused(raw: bytes, config: Settings | None = None) -> PermanentError:
    with pytest.raises(PermanentError) as caught:
        routed(raw, config)
    return caught.value


def original(to: str = "bob@corp.example.com", **headers: str) -> bytes:
    raw = mailgen.message("customer@example.net", [to], "help", "please",
                          message_id="<orig@example.net>")
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return extra.encode() + raw


def envelope(forwarder: str = "bob@corp.example.com", inner: bytes | None = None,
             **headers: str) -> bytes:
    raw = mailgen.forward_envelope(forwarder, FORWARD, inner or original())
    extra = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    return extra.encode() + raw


def attaching(forwarder: str, data: bytes, maintype: str, subtype: str,
              filename: str) -> bytes:
    outer = EmailMessage()
    outer["From"] = forwarder
    outer["To"] = FORWARD
    outer["Subject"] = "FW: something"
    outer["Message-ID"] = "<outer@corp.example.com>"
    outer.set_content("forwarded")
    outer.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return outer.as_bytes(policy=SMTP)


# -- who it was for, and the evidence ---------------------------------------------------------


def test_wrapped_envelope_goes_to_the_forwarder_with_the_evidence() -> None:
    [delivery] = routed(envelope())
    assert (delivery["principal"], delivery["method"], delivery["mailbox"]) == (
        "bob", "forward", "fwd")
    evidence = delivery["evidence"]
    assert evidence["decided_by"] == "envelope-from"
    assert evidence["envelope_kind"] == "wrapped"
    assert evidence["forwarder"] == "bob@corp.example.com"
    assert evidence["agreed"] == ["inner-to"]
    assert evidence["inner_recipient_agrees"] is True
    assert evidence["proof"] is None


def test_inner_recipients_that_name_someone_else_are_recorded_as_disagreeing() -> None:
    [delivery] = routed(envelope(inner=original(to="someone@example.org")))
    assert delivery["evidence"]["disagreed"] == ["inner-to"]
    assert delivery["evidence"]["inner_recipient_agrees"] is False


def test_a_queue_can_forward_too() -> None:
    [delivery] = routed(envelope("Sales <SALES@corp.example.com>"))
    assert (delivery["principal_kind"], delivery["principal"]) == ("queue", "sales")


@pytest.mark.parametrize("forwarder", [
    "mallory@evil.example",          # not configured at all
    "alice@corp.example.com",        # a user, but monitored directly, not via this mailbox
    FORWARD,                         # the forward mailbox itself
])
def test_an_envelope_from_anyone_not_configured_for_the_mailbox_is_refused(
        forwarder: str) -> None:
    assert refused(envelope(forwarder)).reason == "untrusted-forwarder"


def test_several_attached_originals_are_each_delivered() -> None:
    outer = email.message_from_bytes(envelope(), policy=SMTP)
    second = mailgen.message("x@example.net", ["bob@corp.example.com"], "two", "2",
                             message_id="<second@example.net>")
    part = EmailMessage()
    part["Content-Type"] = "message/rfc822"
    part.set_payload([email.message_from_bytes(second)])
    outer.attach(part)
    result = parse_raw(outer.as_bytes(policy=SMTP), "forward", LIMITS)
    assert [m["message_id"] for m in result.emails] == ["orig@example.net", "second@example.net"]
    assert [e["index"] for e, _ in result.items()] == [0, 1]


def test_a_message_with_no_original_is_an_invalid_forward_mail_item() -> None:
    plain = mailgen.message("bob@corp.example.com", [FORWARD], "hi", "no attachment")
    with pytest.raises(PermanentError) as caught:
        parse_raw(plain, "forward", LIMITS)
    assert caught.value.reason == "invalid-forward-mail-item"


# -- redirected mail --------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "value", "decided_by"), [
    ("Resent-From", "Bob <bob@corp.example.com>", "envelope-resent-from"),
    ("X-Sieve-Redirected-From", "bob@corp.example.com", "envelope-x-sieve-redirected-from"),
    ("X-Forwarded-For", "bob@corp.example.com forward@corp.example.com",
     "envelope-x-forwarded-for"),
])
def test_redirected_mail_goes_to_the_user_who_redirected_it(header: str, value: str,
                                                           decided_by: str) -> None:
    [delivery] = routed(original(**{header: value}))
    assert delivery["principal"] == "bob"
    assert delivery["evidence"]["decided_by"] == decided_by
    assert delivery["evidence"]["envelope_kind"] == "redirected"
    assert "inner-to" in delivery["evidence"]["agreed"]


def test_a_delivered_to_chain_names_the_first_mailbox() -> None:
    raw = original(**{"Delivered-To": FORWARD}).replace(
        b"\r\n", b"\r\nDelivered-To: bob@corp.example.com\r\n", 1)
    [delivery] = routed(raw)
    assert delivery["evidence"]["decided_by"] == "envelope-delivered-to"


def test_a_redirect_by_someone_not_configured_is_refused() -> None:
    error = refused(original(**{"Resent-From": "mallory@evil.example"}))
    assert error.reason == "untrusted-forwarder"


# -- loops ------------------------------------------------------------------------------------


def hops(count: int) -> bytes:
    return b"".join(b"Received: from hop%d by mx.example.net\r\n" % i for i in range(count))


@pytest.mark.parametrize("raw", [
    envelope(X_Mailroute_Loop="fwd"),
    envelope(inner=original(**{"X-Mailroute-Loop": "fwd"})),
    envelope(inner=original(**{"Auto-Submitted": "auto-replied"})),
    envelope(inner=original(**{"Auto-Submitted": "auto-generated; owner-email=x@y"})),
    hops(26) + envelope(),
    hops(26) + original(**{"Resent-From": "bob@corp.example.com"}),
], ids=["marker", "inner-marker", "auto-replied", "auto-generated", "received",
        "redirected-received"])
def test_loops_are_never_delivered(raw: bytes) -> None:
    assert refused(raw).reason == "mail-loop"


def test_auto_submitted_no_and_25_received_are_fine() -> None:
    [delivery] = routed(hops(25) + envelope(inner=original(**{"Auto-Submitted": "no"})))
    assert delivery["principal"] == "bob"


# -- proof from Authentication-Results --------------------------------------------------------

TRUSTED = {"authserv_id": "mx.corp.example.com", "require_proof": True}


@pytest.mark.parametrize(("results", "method"), [
    ("mx.corp.example.com; dkim=pass header.d=corp.example.com header.s=s1", "dkim"),
    ("mx.corp.example.com 1; spf=pass (sender ok) smtp.mailfrom=bob@corp.example.com", "spf"),
    ("MX.corp.example.com; dkim=fail header.d=corp.example.com; arc=pass", "arc"),
    ("mx.corp.example.com; dkim=pass header.d=mail.corp.example.com", "dkim"),
])
def test_a_trusted_aligned_pass_is_proof(results: str, method: str) -> None:
    [delivery] = routed(envelope(Authentication_Results=results), settings(**TRUSTED))
    assert delivery["evidence"]["proof"]["method"] == method
    assert delivery["evidence"]["authserv_id"] == "mx.corp.example.com"


@pytest.mark.parametrize("results", [
    "evil.example; dkim=pass header.d=corp.example.com",             # forged: other id
    "mx.corp.example.com; dkim=pass header.d=evil.example",           # not aligned
    "mx.corp.example.com; dkim=fail header.d=corp.example.com; spf=softfail "
    "smtp.mailfrom=bob@corp.example.com",
    "mx.corp.example.com.evil.example; arc=pass",                     # look-alike id
])
def test_without_trusted_aligned_proof_a_forward_is_refused_when_proof_is_required(
        results: str) -> None:
    error = refused(envelope(Authentication_Results=results), settings(**TRUSTED))
    assert error.reason == "untrusted-forwarder"


def test_proof_is_recorded_but_not_required_unless_configured() -> None:
    [delivery] = routed(envelope(Authentication_Results="evil.example; arc=pass"),
                        settings(authserv_id="mx.corp.example.com"))
    assert delivery["evidence"]["proof"] is None


def test_authentication_results_parsing_ignores_comments() -> None:
    serv_id, results = parse_authentication_results(
        "mx.example.com (Postfix (x)); dkim=pass (2048-bit key; secure) header.d=a.example "
        'header.i="@a.example"; spf=none')
    assert serv_id == "mx.example.com"
    assert results == [("dkim", "pass", {"header.d": "a.example", "header.i": "@a.example"}),
                       ("spf", "none", {})]


# -- every envelope kind real clients produce -------------------------------------------------


def test_an_outlook_msg_attachment_is_unwrapped() -> None:
    msg = (CORPUS / "outlook-message-parser" / "simple reply with CC.msg").read_bytes()
    raw = attaching("bob@corp.example.com", msg, "application", "vnd.ms-outlook",
                    "Re Sent by CV Contact Form.msg")
    result = parse_raw(raw, "forward", LIMITS)
    [mail] = result.emails
    assert result.envelope["kind"] == "wrapped"
    assert mail["subject"] == "Re: Sent by CV Contact Form"
    assert mail["from_"][0]["address"] == "benny@bennybottema.com"
    assert mail["message_id"]


def test_an_eml_attached_as_octet_stream_is_unwrapped() -> None:
    raw = attaching("bob@corp.example.com", original(), "application", "octet-stream",
                    "original.eml")
    [delivery] = routed(raw)
    assert delivery["principal"] == "bob"


def test_a_tnef_winmail_dat_with_an_embedded_outlook_item_is_unwrapped() -> None:
    tnef = (CORPUS / "mimekit" / "tnef" / "christmas.tnef").read_bytes()
    raw = attaching("bob@corp.example.com", tnef, "application", "ms-tnef", "winmail.dat")
    result = parse_raw(raw, "forward", LIMITS)
    assert [m["subject"] for m in result.emails] == ["Build a train table",
                                                     "Christmas Celebration!"]


def test_a_damaged_msg_attachment_is_a_named_defect_not_a_crash() -> None:
    msg = (CORPUS / "outlook-message-parser" / "simple sent.msg").read_bytes()[:2000]
    raw = attaching("bob@corp.example.com", msg, "application", "vnd.ms-outlook", "x.msg")
    with pytest.raises(PermanentError) as caught:
        parse_raw(raw, "forward", LIMITS)
    assert caught.value.reason == "invalid-forward-mail-item"


def test_nested_forwards_are_opened_to_the_configured_depth() -> None:
    middle = mailgen.forward_envelope("carol@corp.example.com", "bob@corp.example.com",
                                      original())
    raw = envelope(inner=middle)
    shallow = parse_raw(raw, "forward", LIMITS)
    assert shallow.emails[0]["from_"][0]["address"] == "carol@corp.example.com"
    deep = parse_raw(raw, "forward", dataclasses.replace(LIMITS, forward_depth=2))
    [(env, mail)] = deep.items()
    assert mail["message_id"] == "orig@example.net"
    assert env["chain"] == [{"name": "", "address": "carol@corp.example.com"}]
    assert "nested-forward-unwrapped" in env["defects"]
    [delivery] = routed(raw, limits=dataclasses.replace(LIMITS, forward_depth=2))
    assert (delivery["principal"], delivery["evidence"]["chain"]) == (
        "bob", ["carol@corp.example.com"])


def test_the_time_budget_ends_a_slow_parse_with_a_named_reason() -> None:
    ticks = iter(range(0, 10_000, 5))
    budget = Budget(7.0, clock=lambda: float(next(ticks)))
    with pytest.raises(PermanentError) as caught:
        parse_raw(envelope(), "forward", LIMITS, budget)
    assert caught.value.reason == "parse-time-exceeded"


# -- settings ---------------------------------------------------------------------------------


def test_a_forward_mailbox_deletes_by_default_and_proof_needs_an_authserv_id(
        tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("mailboxes:\n"
                    "  - {name: f, kind: maildir, path: f, forward: true}\n"
                    "  - {name: g, kind: maildir, path: g, forward: true, after: keep}\n"
                    "  - {name: d, kind: maildir, path: d}\n")
    loaded = load_settings(path, environ={})
    assert [box.after for box in loaded.mailboxes] == ["delete", "keep", "seen"]
    path.write_text("mailboxes:\n"
                    "  - {name: f, kind: maildir, path: f, forward: true, require_proof: true}\n")
    with pytest.raises(ConfigError, match="authserv_id"):
        load_settings(path, environ={})


def test_datetime_of_the_outlook_message_is_kept() -> None:
    msg = (CORPUS / "outlook-message-parser" / "simple reply with CC.msg").read_bytes()
    raw = attaching("bob@corp.example.com", msg, "application", "octet-stream", "x.msg")
    [mail] = parse_raw(raw, "forward", LIMITS).emails
    assert isinstance(mail["date"], datetime) and mail["date"].tzinfo is not None
    assert mail["date"] < datetime.now(UTC)


# -- the container readers never raise anything but their own error -------------------------

@settings_hypothesis(max_examples=60, deadline=None)
@given(data=st.data())
def test_damaged_tnef_and_msg_containers_fail_only_by_name(data: st.DataObject) -> None:
    from parse.outlook import OutlookError, msg_to_mime
    from parse.tnef import TnefError, read_tnef

    name = data.draw(st.sampled_from(["christmas.tnef", "attachments.tnef", "winmail.tnef"]))
    tnef = bytearray((CORPUS / "mimekit" / "tnef" / name).read_bytes())
    for _ in range(data.draw(st.integers(1, 20))):
        position = data.draw(st.integers(0, len(tnef) - 1))
        tnef[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(tnef)))
    with contextlib.suppress(TnefError):
        read_tnef(bytes(tnef[:cut]))
    msg = bytearray((CORPUS / "outlook-message-parser" / "simple sent.msg").read_bytes())
    for _ in range(data.draw(st.integers(1, 20))):
        position = data.draw(st.integers(0, len(msg) - 1))
        msg[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(OutlookError):
        msg_to_mime(bytes(msg))


def test_the_time_budget_holds_on_the_real_clock_for_a_many_part_message() -> None:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i
                     for i in range(1500))
    raw = (b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           + parts + b"--b--\r\n")
    assert len(parse_raw(raw, "direct", LIMITS).emails) == 1
    tight = dataclasses.replace(LIMITS, parse_seconds=0.000_001)
    with pytest.raises(PermanentError) as caught:
        parse_raw(raw, "direct", tight)
    assert caught.value.reason == "parse-time-exceeded"


def test_a_compressed_rtf_body_in_tnef_becomes_text() -> None:
    from parse.rtf import rtf_to_text
    from parse.tnef import decompress_rtf, read_tnef

    tnef = read_tnef((CORPUS / "mimekit" / "tnef" / "triples.tnef").read_bytes())
    assert tnef.rtf_compressed is not None
    rtf = decompress_rtf(tnef.rtf_compressed)
    assert rtf.startswith(b"{\\rtf1")
    assert rtf_to_text(rtf) == "Sample description\n"
    note = mailgen.message("ann@example.org", ["bob@corp.example.com"], "rich", "")
    outer = email.message_from_bytes(note, policy=SMTP)
    outer.clear_content()
    outer.add_attachment((CORPUS / "mimekit" / "tnef" / "rtf.tnef").read_bytes(),
                         maintype="application", subtype="ms-tnef", filename="winmail.dat")
    [mail] = parse_raw(outer.as_bytes(policy=SMTP), "direct", LIMITS).emails
    assert "Greg Allen\nSenior Engineer" in mail["text"]
    assert "tnef-rtf-body-as-text" in mail["defects"]
    assert [a["filename"] for a in mail["attachments"]] == []


def test_parsed_documents_without_the_new_envelope_fields_still_load() -> None:
    from shared.schemas import Codec

    codec = Codec()
    old = documents.parsed()
    decoded = codec.decode("parsed", codec.encode("parsed", old))
    assert (decoded["envelope"]["headers"], decoded["envelope"]["chain"],
            decoded["envelope"]["forwarder_header"]) == ({}, [], None)
    redirected = {**old, "envelope": {**old["envelope"], "kind": "redirected",
                                      "forwarder_header": "resent-from"}}
    assert codec.decode("parsed", codec.encode("parsed", redirected))["envelope"]["kind"] == (
        "redirected")
