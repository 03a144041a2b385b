"""Unit tests of the parse stage on real corpus messages and crafted hostile inputs."""

from __future__ import annotations

import email.parser
import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from email import policy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parse.extract import parse_raw
from parse.mime import sanitise_filename
from parse.worker import ParseStage
from shared.errors import PermanentError
from shared.schemas import Codec
from shared.settings import LimitSettings

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
LIMITS = LimitSettings()


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def only_email(raw: bytes, kind: str = "direct", limits: LimitSettings = LIMITS) -> dict:
    result = parse_raw(raw, kind, limits)
    assert len(result.emails) == 1
    return result.emails[0]


def crafted(headers: str, body: str = "hello\n") -> bytes:
    return (headers.strip("\n") + "\n\n" + body).replace("\n", "\r\n").encode("utf-8")


def source(kind: str) -> dict:
    now = datetime.now(UTC)
    return {"mailbox": "alice", "mailbox_kind": kind, "folder": "INBOX", "uidvalidity": 7,
            "uid": "42", "received_at": now, "fetched_at": now}


# --- real messages -------------------------------------------------------------------------

def test_plain_message() -> None:
    raw = corpus("ruby-mail/plain_emails/basic_email.eml")
    result = parse_raw(raw, "direct", LIMITS)
    assert result.envelope == {"kind": "direct", "forwarder": None, "forwarder_header": None,
                               "outer_message_id": None, "outer_subject": None, "index": 0,
                               "count": 1, "headers": {}, "chain": [], "defects": []}
    mail = result.emails[0]
    assert mail["message_id"] == "6B7EC235-5B17-4CA8-B2B8-39290DEB43A3@test.lindsaar.net"
    assert mail["dedup_key"] == "mid:" + mail["message_id"]
    assert mail["subject"] == "Testing 123"
    assert mail["from_"] == [{"name": "Mikel Lindsaar", "address": "test@lindsaar.net"}]
    assert mail["to"] == [{"name": "Mikel Lindsaar", "address": "raasdnil@gmail.com"}]
    assert mail["date"] == datetime(2008, 11, 22, 4, 4, 59, tzinfo=UTC)
    assert mail["text"].startswith("Plain email.")
    assert mail["html"] is None
    assert mail["attachments"] == []
    assert mail["headers"] == {"delivered-to": ["raasdnil@gmail.com"], "received-count": ["4"]}
    assert mail["size"] == len(raw)
    assert len(mail["fingerprint"]) == 64


def test_rfc2047_subject_in_euc_kr() -> None:
    mail = only_email(corpus("ruby-mail/plain_emails/raw_email.eml"))
    assert mail["subject"] == "NOTE: 한국말로 하는 것"
    assert "우리는 하나님을 믿습니다" in mail["text"]


def test_comments_are_no_part_of_a_display_name() -> None:
    """RFC 5322's obsolete-syntax example: comments in the name, inside the angle brackets
    and after them.  getaddresses alone gave 'Pete (A wonderful ) chap his account his
    host)' and "Chris Jones (Chris's host.)"."""
    mail = only_email(corpus("ruby-mail/rfc2822/example10.eml"))
    assert mail["from_"] == [{"name": "Pete", "address": "pete@silly.test"}]
    assert mail["to"] == [{"name": "Chris Jones", "address": "c@public.example"},
                          {"name": "", "address": "joe@example.org"},
                          {"name": "John", "address": "jdoe@one.test"}]


@pytest.mark.parametrize(("value", "expected"), [
    ("John (middle) Smith <js@example.com>", [("John Smith", "js@example.com")]),
    ("(team) Ann <ann@example.com>", [("Ann", "ann@example.com")]),
    ('"Sales (EMEA)" <sales@example.com>', [("Sales (EMEA)", "sales@example.com")]),
    ("Eve <eve(at@work)@example.com>", [("Eve", "eve@example.com")]),
    ("Nested (a (b) c) Name <n@example.com>", [("Nested Name", "n@example.com")]),
    # the old 'addr (Name)' form keeps its comment as the name, in a list with the new form
    ("bob@example.com (Bob Smith), Ann (x) <ann@example.com>",
     [("Bob Smith", "bob@example.com"), ("Ann", "ann@example.com")]),
    ("Team: Ann (x) <ann@example.com>, bob@example.com (Bob);",
     [("Ann", "ann@example.com"), ("Bob", "bob@example.com")]),
])
def test_comments_in_address_headers(value: str, expected: list[tuple[str, str]]) -> None:
    mail = only_email(crafted(f"From: {value}\nSubject: s"))
    assert [(a["name"], a["address"]) for a in mail["from_"]] == expected
    assert mail["defects"] == []


def test_subject_keeps_trailing_blanks_and_drops_the_fold_after_the_colon() -> None:
    assert only_email(corpus("ruby-mail/error_emails/empty_in_reply_to.eml"))["subject"] \
        == "illegal copy of our patient education software "
    mail = only_email(crafted("From: a@example.com\nSubject:\n\t  Quarterly  report \t"))
    assert mail["subject"] == "Quarterly  report \t"
    assert only_email(crafted("From: a@example.com\nSubject: =?utf-8?q?caf=C3=A9_?="))[
        "subject"] == "café "


def test_multipart_with_attachment() -> None:
    mail = only_email(corpus("demisto-parse-emails/eml_contains_htm_attachment.eml"))
    assert mail["html"] == '<div dir="ltr"><br></div>\n'
    [attachment] = mail["attachments"]
    assert attachment["filename"] == "1.htm"
    assert attachment["content_type"] == "text/html"
    assert attachment["size"] == len(attachment["content"]) == 14
    assert attachment["sha256"] == hashlib.sha256(attachment["content"]).hexdigest()


def test_direct_message_keeps_attached_message_as_attachment() -> None:
    mail = only_email(corpus("django-mailbox/message_with_rfc822_attachment.eml"))
    assert mail["subject"] == "Email with RFC 822 attachment"
    [attachment] = mail["attachments"]
    assert attachment["content_type"] == "message/rfc822"
    assert attachment["filename"] == "Attached email.eml"  # generated from its subject
    assert attachment["declared_filename"] is None
    inner = email.parser.BytesParser(policy=policy.default).parsebytes(attachment["content"])
    assert inner["subject"] == "Attached email"


@pytest.mark.parametrize(("name", "forwarder", "inner_subject", "inner_text"), [
    ("request-tracker/email-file-attachment.eml", "user1@example.com", "This is a test",
     "This is a test."),
    ("django-mailbox/message_with_rfc822_attachment.eml", "test@adamcoddington.net",
     "Attached email", "This is the attached email."),
    ("mimekit/messages/simple-embedded-message.eml", "mimekit@example.com",
     "embedded message", "This is the embedded message body."),
])
def test_forward_envelope_unwraps_the_attached_message(
        name: str, forwarder: str, inner_subject: str, inner_text: str) -> None:
    result = parse_raw(corpus(name), "forward", LIMITS)
    assert result.envelope["kind"] == "wrapped"
    assert result.envelope["forwarder"]["address"] == forwarder
    assert result.envelope["count"] == 1
    [mail] = result.emails
    assert mail["subject"] == inner_subject
    assert inner_text in mail["text"]
    # The inner message's own parts, not the envelope's, make up the email.
    assert mail["subject"] != result.envelope["outer_subject"] or mail["text"] != ""
    assert mail["size"] < len(corpus(name))


def test_forward_without_message_id_gets_fingerprint_key() -> None:
    [mail] = parse_raw(corpus("mimekit/messages/simple-embedded-message.eml"),
                       "forward", LIMITS).emails
    assert mail["message_id"] is None
    assert mail["dedup_key"] == "fp:" + mail["fingerprint"]


@pytest.mark.parametrize(("name", "inner_message_id", "inner_subject"), [
    ("flanker/enclosed-global.eml", "BANLkTinHZL1QMDHOv7Ewp+Z5u6SPvYcc+Q@mail.gmail.com",
     "Thanks!"),
    ("demisto-parse-emails/eml_contains_base64_eml.eml",
     "2FC50179-3666-4770-A365-744882CDA54C@demisto.com", "test - inner attachment eml"),
])
def test_eml_attached_as_octet_stream_is_unwrapped(
        name: str, inner_message_id: str, inner_subject: str) -> None:
    result = parse_raw(corpus(name), "forward", LIMITS)
    [mail] = result.emails
    assert mail["message_id"] == inner_message_id
    assert mail["subject"] == inner_subject
    assert mail["from_"]


def test_plain_message_in_forward_mailbox_is_invalid_forward() -> None:
    with pytest.raises(PermanentError) as caught:
        parse_raw(corpus("ruby-mail/plain_emails/basic_email.eml"), "forward", LIMITS)
    assert caught.value.reason == "invalid-forward-mail-item"


def test_forward_with_two_originals_gives_two_emails_with_one_trace() -> None:
    first = crafted("From: a@example.org\nSubject: one\nMessage-ID: <one@x>\n"
                    "Date: Mon, 1 Jan 2024 10:00:00 +0000")
    second = crafted("From: b@example.org\nSubject: two\nMessage-ID: <two@x>\n"
                     "Date: Mon, 1 Jan 2024 11:00:00 +0000")
    envelope = (
        b"From: Alice <alice@corp.example>\r\nTo: fwd@corp.example\r\nSubject: FW\r\n"
        b"Message-ID: <outer@corp>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--B\r\nContent-Type: message/rfc822\r\n\r\n" + first +
        b"\r\n--B\r\nContent-Type: message/rfc822\r\n\r\n" + second + b"\r\n--B--\r\n")
    document = {"trace_id": "trace-1", "source": source("forward"), "raw": envelope}
    outputs = ParseStage(LIMITS).handle(document)
    assert [out.edge for out in outputs] == ["parsed", "parsed"]
    assert [out.document["trace_id"] for out in outputs] == ["trace-1", "trace-1"]
    assert [out.document["envelope"]["index"] for out in outputs] == [0, 1]
    assert {out.document["envelope"]["count"] for out in outputs} == {2}
    assert [out.document["email"]["message_id"] for out in outputs] == ["one@x", "two@x"]
    assert outputs[0].document["envelope"]["forwarder"] == {
        "name": "Alice", "address": "alice@corp.example"}
    assert outputs[0].document["envelope"]["outer_message_id"] == "outer@corp"


# --- limits, checked before parsing --------------------------------------------------------

def nested_multiparts(levels: int) -> bytes:
    opening = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n'
                      for i in range(1, levels))
    closing = "".join(f"\n--b{i}--\n" for i in reversed(range(levels)))
    return crafted('From: a@example.org\nSubject: deep\nMIME-Version: 1.0\n'
                   'Content-Type: multipart/mixed; boundary="b0"',
                   "--b0\n" + opening + "Content-Type: text/plain\n\ninnermost" + closing)


@pytest.mark.parametrize(("raw", "limits", "reason"), [
    (crafted("Subject: x", "y" * 2000), LimitSettings(max_message_bytes=1000),
     "message-too-large"),
    (crafted("Subject: x\nX-Big: " + "z" * 5000), LimitSettings(max_header_bytes=4096),
     "header-too-large"),
    (crafted('Content-Type: multipart/mixed; boundary="q"',
             "--q\n\nx\n" * 30 + "--q--\n"), LimitSettings(max_parts=20), "too-many-parts"),
    (nested_multiparts(30), LimitSettings(max_depth=20), "nesting-too-deep"),
    (crafted("Subject: chain",
             "".join("Content-Type: message/rfc822\n\n" for _ in range(1000)) + "end\n"),
     LIMITS, "nesting-too-deep"),
])
def test_limits_raise_named_permanent_errors(raw: bytes, limits: LimitSettings,
                                             reason: str) -> None:
    for kind in ("direct", "forward"):
        with pytest.raises(PermanentError) as caught:
            parse_raw(raw, kind, limits)
        assert caught.value.reason == reason


def test_within_limits_nesting_parses() -> None:
    mail = only_email(nested_multiparts(10))
    assert mail["text"] == "innermost"


def test_parser_recursion_becomes_unparseable_not_a_crash() -> None:
    # With the depth limit lifted, 1,000 levels reach the parser's recursion limit.
    limits = LimitSettings(max_depth=100_000, max_parts=100_000)
    with pytest.raises(PermanentError) as caught:
        parse_raw(nested_multiparts(1000), "direct", limits)
    assert caught.value.reason in ("unparseable", "nesting-too-deep")


def test_unknown_mailbox_kind_is_permanent() -> None:
    with pytest.raises(PermanentError):
        parse_raw(crafted("Subject: x"), "pop3", LIMITS)


# --- hostile and damaged content -----------------------------------------------------------

def test_ambiguous_addresses_are_dropped_with_a_defect() -> None:
    mail = only_email(crafted(
        'From: "alice@example.com"@evil.com\n'
        "To: alice@example.org)<bob@example.org>, carol@example.org\n"
        "Cc: Dave <dave@Example.ORG>\n"
        "Reply-To: " + "(" * 500 + "x" + ")" * 500 + " <eve@example.org>\n"
        "Subject: cve"))
    assert mail["from_"] == []
    assert mail["to"] == []
    assert mail["cc"] == [{"name": "Dave", "address": "dave@Example.ORG"}]  # as written
    assert mail["reply_to"] == []
    assert {"ambiguous-address:from", "ambiguous-address:to",
            "ambiguous-address:reply-to"} <= set(mail["defects"])


def test_unsafe_attachment_names_are_sanitised() -> None:
    names = ["../../etc/cron.d/x", "..%2F..%2Fboot.ini", "a\x00b.txt", "invoice\u202egpj.exe",
             "..", "C:\\Windows\\evil.dll"]
    body = "".join(
        f'--q\nContent-Type: application/octet-stream\nContent-Disposition: attachment; '
        f'filename="{name}"\nContent-Transfer-Encoding: base64\n\naGk=\n' for name in names)
    mail = only_email(crafted("Subject: names\nMIME-Version: 1.0\n"
                              'Content-Type: multipart/mixed; boundary="q"', body + "--q--\n"))
    filenames = [item["filename"] for item in mail["attachments"]]
    assert filenames == ["x", "_.._boot.ini", "a\ufffdb.txt", "invoicegpj.exe",
                         "attachment-5", "evil.dll"]
    # the name as declared stays beside it (only NUL replaced: PostgreSQL text cannot hold it)
    assert [item["declared_filename"] for item in mail["attachments"]] == [
        name.replace("\x00", "\ufffd") for name in names]
    for name in filenames:
        assert "/" not in name and "\\" not in name and "\x00" not in name
    assert all(item["content"] == b"hi" for item in mail["attachments"])
    assert "unsafe-filename" in mail["defects"]


@pytest.mark.parametrize(("name", "expected"), [
    ("report.pdf", "report.pdf"), ("", "fallback"), (None, "fallback"), ("/", "fallback"),
    (" .hidden ", "hidden"), ("x" * 300 + ".pdf", "x" * 196 + ".pdf"),
])
def test_sanitise_filename(name: str | None, expected: str) -> None:
    assert sanitise_filename(name, "fallback") == expected


def test_declared_filename_is_none_when_the_name_was_generated() -> None:
    body = ('--q\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\naGk=\n'
            '--q\nContent-Type: text/csv; name="rows.csv"\n\na,b\n--q--\n')
    mail = only_email(crafted('Subject: n\nMIME-Version: 1.0\n'
                              'Content-Type: multipart/mixed; boundary="q"', body))
    assert [(a["filename"], a["declared_filename"]) for a in mail["attachments"]] == [
        ("attachment-1", None), ("rows.csv", "rows.csv")]


def test_declared_filename_in_an_unquoted_encoded_word_is_decoded() -> None:
    # name==?koi8-r?B?...?=: the standard library's policy.default finds no filename here
    [attachment] = only_email(corpus("james-mime4j/testmsgs/russian-headers.msg"))["attachments"]
    assert attachment["declared_filename"] == attachment["filename"] == "Список.doc"


def test_an_attached_message_keeps_its_folded_content_type_as_sent() -> None:
    inner = ('From: a@example.org\nSubject: inner\nMIME-Version: 1.0\n'
             'Content-Type: multipart/alternative;\n\tboundary="in"\n\n'
             '--in\nContent-Type: text/plain\n\nplain\n--in--\n')
    body = f'--q\nContent-Type: message/rfc822\n\n{inner}--q--\n'
    mail = only_email(crafted('Subject: outer\nMIME-Version: 1.0\n'
                              'Content-Type: multipart/mixed; boundary="q"', body))
    [attachment] = mail["attachments"]
    # the fold between parameters is kept (only a fold inside quotes is removed)
    assert b'multipart/alternative;\r\n\tboundary="in"' in attachment["content"]
    reread = email.parser.BytesParser(policy=policy.default).parsebytes(attachment["content"])
    plain = reread.get_body(("plain",))
    assert plain is not None and plain.get_content().strip() == "plain"


def test_an_attached_message_with_raw_8bit_headers_comes_back_as_sent() -> None:
    inner = (b"From: a@example.org\r\nSubject: caf\xc3\xa9\r\n au lait\r\n\r\n"
             b"body\r\n")
    raw = (b'Subject: outer\r\nMIME-Version: 1.0\r\n'
           b'Content-Type: multipart/mixed; boundary="q"\r\n\r\n'
           b"--q\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--q--\r\n")
    [attachment] = only_email(raw)["attachments"]
    # byte for byte, but for the line break before the delimiter, which is the delimiter's
    assert attachment["content"] == inner.removesuffix(b"\r\n")


def test_address_case_is_kept_as_written() -> None:
    mail = only_email(crafted("From: Bob <Bob@Example.COM>\nTo: carol@EXAMPLE.org\n"
                              "Subject: case"))
    assert mail["from_"] == [{"name": "Bob", "address": "Bob@Example.COM"}]
    assert mail["to"] == [{"name": "", "address": "carol@EXAMPLE.org"}]
    # the fingerprint compares addresses case-insensitively
    lower = only_email(crafted("From: Bob <bob@example.com>\nTo: carol@example.org\n"
                               "Subject: case"))
    assert mail["fingerprint"] == lower["fingerprint"]


def test_broken_base64_decodes_with_a_defect() -> None:
    mail = only_email(crafted("Subject: b64\nContent-Type: text/plain; charset=utf-8\n"
                              "Content-Transfer-Encoding: base64",
                              "SGVsbG8g*d29y\nbGQhI"))
    assert mail["text"].startswith("Hello world!")
    assert "broken-base64" in mail["defects"]


def test_unknown_charset_decodes_with_replacement_and_defect() -> None:
    raw = (b"Subject: =?x-no-such-charset?q?caf=E9?=\r\n"
           b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\ncaf\xe9 ok\r\n")
    mail = only_email(raw)
    assert mail["text"] == "caf\ufffd ok\r\n"
    assert "unknown-charset:x-no-such-charset" in mail["defects"]
    assert mail["subject"].startswith("caf")


def test_multipart_without_parts_does_not_raise() -> None:
    mail = only_email(crafted('Subject: empty\nContent-Type: multipart/mixed; boundary="z"',
                              "--z--\n"))
    assert mail["text"] is None and mail["attachments"] == []
    assert "multipart-without-parts" in mail["defects"]
    lost = only_email(crafted('Subject: lost\nContent-Type: multipart/mixed; boundary="z"',
                              "no delimiter at all\n"))
    assert lost["text"] == "no delimiter at all\r\n"


def test_missing_headers_and_naive_date() -> None:
    mail = only_email(crafted("Date: Mon, 1 Jan 2024 10:00:00 -0000"))
    assert mail["message_id"] is None
    assert mail["dedup_key"].startswith("fp:")
    assert mail["date"] == datetime(2024, 1, 1, 10, 0, tzinfo=UTC)
    assert mail["subject"] == ""
    bad = only_email(crafted("Date: not a date\nSubject: x"))
    assert bad["date"] is None and "bad-date" in bad["defects"]


def test_fingerprint_ignores_line_endings_and_timezone_notation() -> None:
    one = only_email(crafted("From: a@example.org\nDate: Mon, 1 Jan 2024 10:00:00 +0000\n"
                             "Subject: same", "body\n"))
    two = only_email(crafted("From: a@EXAMPLE.org\nDate: Mon, 1 Jan 2024 11:00:00 +0100\n"
                             "Subject: same", "body\n").replace(b"\r\n", b"\n"))
    three = only_email(crafted("From: a@example.org\nDate: Mon, 1 Jan 2024 10:00:00 +0000\n"
                               "Subject: other", "body\n"))
    assert one["fingerprint"] == two["fingerprint"] != three["fingerprint"]


def test_routing_headers_are_kept_raw_and_others_dropped() -> None:
    mail = only_email(crafted(
        "Received: a\nReceived: b\nAuto-Submitted: auto-replied\n"
        "X-Original-To: alice@example.com\nX-Spam: no\nList-Id: <list.example.org>"))
    assert mail["headers"] == {"auto-submitted": ["auto-replied"],
                               "x-original-to": ["alice@example.com"],
                               "list-id": ["<list.example.org>"], "received-count": ["2"]}


def test_references_and_in_reply_to() -> None:
    mail = only_email(crafted("In-Reply-To: <b@x>\nReferences: <a@x>\n <b@x>\nMessage-ID:  <c@x> "))
    assert (mail["message_id"], mail["in_reply_to"], mail["references"]) == (
        "c@x", "b@x", ["a@x", "b@x"])


# --- the worker ----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "kind"), [
    ("django-mailbox/message_with_rfc822_attachment.eml", "direct"),
    ("django-mailbox/message_with_rfc822_attachment.eml", "forward"),
    ("demisto-parse-emails/eml_contains_htm_attachment.eml", "direct"),
])
def test_stage_output_round_trips_through_the_codec(name: str, kind: str) -> None:
    stage = ParseStage(LIMITS)
    assert (stage.name, stage.input_edge) == ("parse", "raw")
    codec = Codec()
    trace_id = uuid.uuid4().hex
    raw_document = codec.decode("raw", codec.encode(
        "raw", {"trace_id": trace_id, "source": source(kind), "raw": corpus(name)}))
    [output] = stage.handle(raw_document)
    assert output.edge == "parsed"
    decoded = codec.decode("parsed", codec.encode("parsed", output.document))
    assert decoded["trace_id"] == trace_id
    assert decoded["source"] == raw_document["source"]
    assert decoded["envelope"] == output.document["envelope"]
    sent, received = output.document["email"], decoded["email"]
    for key in ("message_id", "dedup_key", "fingerprint", "subject", "from_", "to", "cc",
                "text", "html", "headers", "defects", "size", "attachments"):
        assert received[key] == sent[key], key
    assert received["date"] == sent["date"]
    assert received["date"].utcoffset() is not None
    assert received["date"] - sent["date"] == timedelta(0)


def test_stage_propagates_permanent_errors() -> None:
    document = {"trace_id": "t", "source": source("forward"),
                "raw": corpus("ruby-mail/plain_emails/basic_email.eml")}
    with pytest.raises(PermanentError) as caught:
        ParseStage(LIMITS).handle(document)
    assert caught.value.reason == "invalid-forward-mail-item"


# --- fuzzing -------------------------------------------------------------------------------

FUZZ_SEEDS = ["django-mailbox/message_with_rfc822_attachment.eml",
              "demisto-parse-emails/eml_contains_base64_eml.eml",
              "ruby-mail/plain_emails/raw_email.eml"]
FUZZ_TOKENS = [b"\r\n", b"--", b"=?utf-8?b?", b"?=", b'"', b"(", b")", b"<", b">", b"@", b"\x00",
               b"\xff", b";", b"\\", b"Content-Type: message/rfc822\r\n\r\n",
               b"Content-Transfer-Encoding: base64\r\n", b"charset=x-bad", b'boundary="']


@settings(max_examples=150, deadline=None, derandomize=True)
@given(seed=st.sampled_from(FUZZ_SEEDS),
       edits=st.lists(st.tuples(st.floats(0, 1), st.sampled_from(FUZZ_TOKENS) | st.binary(
           max_size=8), st.integers(0, 40)), min_size=1, max_size=12))
def test_mutated_messages_end_in_success_or_a_named_failure(
        seed: str, edits: list[tuple[float, bytes, int]]) -> None:
    raw = bytearray(corpus(seed))
    for where, insert, delete in edits:
        position = int(where * len(raw))
        raw[position:position + delete] = insert
    codec = Codec()
    for kind in ("direct", "forward"):
        try:
            result = parse_raw(bytes(raw), kind, LIMITS)
        except PermanentError as exc:
            assert exc.reason != "bad-document"
            continue
        for envelope, mail in result.items():
            codec.encode("parsed", {"trace_id": "t", "source": source(kind),
                                    "envelope": envelope, "email": mail})


@pytest.mark.parametrize("name", [
    "james-mime4j/mimetools-testmsgs/multi-simple.msg",
    "james-mime4j/mimetools-testmsgs/multi-clen.msg",
])
def test_a_folded_quoted_boundary_still_splits_the_parts(name: str) -> None:
    # Content-type: multipart/mixed; boundary="simple<CRLF> boundary": unfolded, the
    # boundary is "simple boundary"; kept folded, every part would be lost in the preamble.
    [email] = parse_raw(corpus(name), "direct", LimitSettings()).emails
    assert email["text"] is not None
    assert email["text"].startswith("This is implicitly typed plain ASCII text.")
    assert "This is the preamble" not in email["text"]


def test_the_folded_boundary_message_agrees_with_the_standard_library() -> None:
    raw = corpus("stalwart-mail-parser/thirdparty/012.eml")
    reference = email.parser.BytesParser(policy=policy.default).parsebytes(raw)
    expected = sorted(part.get_filename() or "" for part in reference.iter_attachments())
    [parsed] = parse_raw(raw, "direct", LimitSettings()).emails
    assert len(parsed["attachments"]) == len(expected) > 0


# --- regressions found comparing with the standard library on the corpus ---------------------

@pytest.mark.parametrize(("name", "start"), [
    ("demisto-parse-emails/multipart_with_eml_attachment_containing_html.eml",
     "Email with attached another email"),
    ("enmime/testdata/mail/mime-bad-content-transfer-encoding.raw",
     "ploozdect  nispplul swunkglap zarplontruskdremp fruftsist\nploystoov"),
])
def test_text_body_labelled_base64_that_is_plain_text_stays_text(name: str, start: str) -> None:
    mail = only_email(corpus(name))
    assert mail["text"].startswith(start)
    assert "not-base64" in mail["defects"]


def test_an_attached_message_labelled_base64_but_sent_as_text_stays_text() -> None:
    mail = only_email(corpus("demisto-parse-emails/containing_corrupted_eml.eml"))
    [attachment] = mail["attachments"]
    assert attachment["content"].startswith(b"Content-Type: text/plain")
    assert "not-base64" in mail["defects"]


def test_real_base64_with_a_stray_character_is_still_decoded() -> None:
    mail = only_email(corpus("enmime/testdata/parts/extra-base64-character.raw"))
    assert mail["text"] == "Hello World!"
    assert mail["html"] == "<p>Hello World</p>"
    assert "not-base64" not in mail["defects"]


def test_raw_utf8_filename_cut_inside_a_character_stays_utf8() -> None:
    mail = only_email(corpus("flanker/russian-attachment-yahoo.eml"))
    [attachment] = mail["attachments"]
    assert attachment["filename"].startswith("Картинка")
    assert "очень, очень длинным" in attachment["filename"]
    assert attachment["filename"].endswith("таким чт\ufffd")


def test_adjacent_encoded_words_join_without_a_blank_whatever_their_charset() -> None:
    mail = only_email(corpus("james-mime4j/mimetools-testmsgs/intl.msg"))
    assert mail["subject"] == "If you can read this you understand the example... so, cool!"


def test_encoded_word_with_rfc2231_language_decodes_without_a_charset_defect() -> None:
    mail = only_email(corpus("james-mime4j/mimetools-testmsgs/multi-2evil.msg"))
    assert mail["attachments"][0]["filename"] == "3d-compress.gif"
    assert not any(defect.startswith("unknown-charset") for defect in mail["defects"])


@pytest.mark.parametrize(("name", "header"), [
    ("ruby-mail/plain_emails/raw_email_with_at_display_name.eml", "to"),  # Mikel@Lindsaar <..>
    ("mimekit/messages/issue358.txt", "from_"),  # a@b <a@c>
    ("enmime/testdata/mail/malformed-multiple-address-header-values.raw", "from_"),  # <a> B <b>
    ("ruby-mail/plain_emails/mix_caps_content_type.eml", "from_"),  # Big Bug bb@bug.com
])
def test_an_address_in_front_of_an_angle_address_is_ambiguous(name: str, header: str) -> None:
    mail = only_email(corpus(name))
    assert mail[header] == []
    key = "from" if header == "from_" else header
    assert f"ambiguous-address:{key}" in mail["defects"]


def test_a_display_name_that_looks_like_an_address_is_not_a_sender() -> None:
    mail = only_email(crafted("From: ceo@example.com <eve@evil.test>\n"
                              "To: Bob <bob@example.org>, carol@example.org\nSubject: x"))
    assert mail["from_"] == []
    assert "ambiguous-address:from" in mail["defects"]
    assert [item["address"] for item in mail["to"]] == ["bob@example.org", "carol@example.org"]
