"""bench.parse's field comparison with the standard library, on chosen corpus messages: what
is identical, what each explanation recognises, and that anything else fails (the full
benchmark, timed, is never run by the test suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.parse import Comparison, compare_corpus, differences, ours_direct, stdlib_direct
from shared.settings import LimitSettings

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"


def compared(*names: str) -> Comparison:
    return compare_corpus(list(names), [(CORPUS / name).read_bytes() for name in names],
                          LimitSettings())


@pytest.mark.parametrize("name", [
    # attachments without a name: parse_raw names them, and declares None as the library does
    "django-mailbox/message_with_rfc822_attachment.eml",
    # domains written in capitals (MAILER-DAEMON@AOL.com) are kept as written
    "flufl-bounce/aol_01.txt",
    # an attached message sent with CRLF: both give it back byte for byte
    "ruby-mail/attachment_emails/attachment_message_rfc822.eml",
    # message/delivery-status: every recipient's block, as sent
    "flufl-bounce/dsn_05.txt",
    # an attached message labelled base64 but sent as text, which both keep as text
    "demisto-parse-emails/containing_corrupted_eml.eml",
    # a subject with a trailing blank, which both keep
    "ruby-mail/error_emails/empty_in_reply_to.eml",
    # comments in and around 'Name <addr>' (RFC 5322's obsolete-syntax example): no part of
    # the name for either
    "ruby-mail/rfc2822/example10.eml",
])
def test_identical_messages(name: str) -> None:
    result = compared(name)
    assert (result.compared, result.identical) == (1, 1), result.as_json()


@pytest.mark.parametrize(("name", "reason"), [
    ("james-mime4j/testmsgs/russian-headers.msg", "filename-not-read"),
    ("james-mime4j/testmsgs/base64encoded-rfc822message.msg", "message-still-base64"),
    ("flufl-bounce/postfix_01.txt", "comment-name"),
    # a subject folded right after the colon: the library keeps the fold's tab
    ("demisto-parse-emails/ParseEmailFiles-test-emls.eml", "whitespace"),
])
def test_each_explanation_is_recognised(name: str, reason: str) -> None:
    result = compared(name)
    assert (result.identical, result.explained, result.unexplained) == (0, 1, []), \
        result.as_json()
    assert reason in result.reasons


def test_a_difference_no_explanation_covers_is_unexplained() -> None:
    raw = (CORPUS / "django-mailbox/message_with_rfc822_attachment.eml").read_bytes()
    ours, theirs = ours_direct(raw, LimitSettings()), stdlib_direct(raw, diagnose=True)
    assert differences(ours, theirs) == {}
    ours["attachments"][0]["declared_filename"] = "invented.eml"
    ours["to"][0]["address"] = ours["to"][0]["address"].upper()
    assert differences(ours, theirs) == {"attachments": None, "to": None}


def test_an_attached_message_with_other_content_is_unexplained() -> None:
    raw = (CORPUS / "james-mime4j/testmsgs/base64encoded-rfc822message.msg").read_bytes()
    ours, theirs = ours_direct(raw, LimitSettings()), stdlib_direct(raw, diagnose=True)
    assert differences(ours, theirs) == {"attachments": "message-still-base64"}
    ours["attachments"][0]["content"] += b"one more line\n"
    assert differences(ours, theirs) == {"attachments": None}


def test_encoded_words_inside_an_rfc2231_filename_are_explained() -> None:
    """No corpus message has them; some mailers write an RFC 2047 word in an RFC 2231
    value, which the library gives back still encoded."""
    raw = (b"From: a@example.com\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
           b"Content-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/pdf\r\n"
           b"Content-Disposition: attachment; "
           b"filename*=utf-8''%3D%3Futf-8%3Fq%3Fr%3DC3%3DA9%3F%3D.pdf\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--b--\r\n")
    ours, theirs = ours_direct(raw, LimitSettings()), stdlib_direct(raw, diagnose=True)
    assert ours["attachments"][0]["declared_filename"] == "r\u00e9.pdf"
    assert theirs["attachments"][0][0] == "=?utf-8?q?r=C3=A9?=.pdf"
    assert differences(ours, theirs) == {"attachments": "filename-words-decoded"}
