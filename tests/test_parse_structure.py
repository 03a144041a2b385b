"""The fast structure parser gives the feedparser's tree or None: corpus, crafted, random input.

A tree is compared whole: headers (as the policy parsed them), payload strings, parts,
preamble, epilogue, defects, default type, unixfrom.  A None is always allowed (the caller
then uses the feedparser); a different tree never is.
"""

from __future__ import annotations

from email.message import Message
from email.parser import BytesParser
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as settings_hypothesis
from hypothesis import strategies as st

from parse import extract
from parse.extract import _PARSE_POLICY, parse_raw
from parse.structure import CarriedMessage, parse_structure
from shared.settings import LimitSettings
from tests.test_parse_corpus import CORPUS, MESSAGES


def tree(message: Message) -> tuple[Any, ...]:
    payload = vars(message)["_payload"]  # raw: get_payload() decodes 8-bit text
    return (list(message.raw_items()), [tree(part) for part in payload] if isinstance(payload, list)
            else payload, message.preamble, message.epilogue,
            [type(defect).__name__ for defect in message.defects], message.get_default_type(),
            message.get_unixfrom())


def feedparser_tree(raw: bytes) -> tuple[Any, ...]:
    return tree(BytesParser(policy=_PARSE_POLICY).parsebytes(raw))


def test_corpus_trees_are_the_feedparsers() -> None:
    fast = 0
    for path in MESSAGES:
        raw = path.read_bytes()
        message = parse_structure(raw, _PARSE_POLICY)
        if message is None:
            continue
        fast += 1
        assert tree(message) == feedparser_tree(raw), path.relative_to(CORPUS)
    # most real mail is well-formed: the fast path must not silently stop applying
    assert fast > len(MESSAGES) * 0.6, f"only {fast} of {len(MESSAGES)} on the fast path"


def _carried(message: Message) -> list[CarriedMessage]:
    payload = message.get_payload()
    if not isinstance(payload, list):
        return []
    found = [part for part in payload if isinstance(part, CarriedMessage)]
    for part in payload:
        if isinstance(part, Message):
            found.extend(_carried(part))
    return found


def test_carried_source_parses_to_the_carried_tree() -> None:
    """The bytes kept for an attached message are the ones its tree was parsed from."""
    seen = 0
    for path in MESSAGES:
        message = parse_structure(path.read_bytes(), _PARSE_POLICY)
        for inner in _carried(message) if message is not None else []:
            seen += 1
            source = inner.source
            again = (parse_structure(source, _PARSE_POLICY)
                     or BytesParser(policy=_PARSE_POLICY).parsebytes(source))
            # the epilogue may differ in None/"" only (the delimiter's line break)
            assert tree(again)[:3] == tree(inner)[:3], path.relative_to(CORPUS)
    assert seen > 10


FORWARD = (b"From: Bob <bob@corp.example>\r\nTo: fwd@corp.example\r\n"
           b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
           b"preamble\r\n--outer\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
           b"--outer\r\nContent-Type: message/rfc822\r\n\r\n"
           b"From: a@example.org\r\nSubject: inner\r\n"
           b'Content-Type: multipart/alternative;\r\n boundary="in"\r\n\r\n'
           b"--in\r\nContent-Type: text/plain\r\n\r\nhello\r\n--in\r\n"
           b"Content-Type: text/html\r\n\r\n<p>hello</p>\r\n--in--\r\n\r\n"
           b"--outer--\r\nepilogue\r\n")


def test_a_forward_envelope_is_read_fast_and_keeps_the_original_bytes() -> None:
    message = parse_structure(FORWARD, _PARSE_POLICY)
    assert message is not None
    assert tree(message) == feedparser_tree(FORWARD)
    [inner] = _carried(message)
    assert inner.source.startswith(b"From: a@example.org\r\n")
    assert inner.source.endswith(b"--in--\r\n")  # the delimiter's own line break is not in it


@pytest.mark.parametrize("raw", [
    pytest.param(FORWARD.replace(b"see attached\r\n", b"see\rattached\r\n"), id="bare CR"),
    pytest.param(FORWARD.replace(b"--outer--", b"--other--"), id="no close delimiter"),
    pytest.param(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\ntext\r\n--b--\r\n',
                 id="no start delimiter"),
    pytest.param(FORWARD.replace(b"--outer\r\nContent-Type: message",
                                 b"--outer\r\n--outer\r\nContent-Type: message"),
                 id="repeated delimiter"),
    pytest.param(FORWARD.replace(b"To: fwd@corp.example\r\n", b"To fwd@corp.example\r\n"),
                 id="a header line without colon"),
    pytest.param(b"From bob Mon Jan  1 00:00:00 2026\r\n" + FORWARD, id="mbox From line"),
    pytest.param(FORWARD.replace(b"multipart/mixed", b"multipart/digest"), id="digest"),
    pytest.param(FORWARD.replace(b'boundary="outer"', b""), id="no boundary"),
    pytest.param(b"Subject: only headers\r\n", id="no blank line"),
])
def test_damaged_or_special_messages_go_to_the_feedparser(raw: bytes) -> None:
    assert parse_structure(raw, _PARSE_POLICY) is None


TOKENS = [b"\r\n", b"\n", b"\r", b"--b", b"--b--", b"--c", b"--c--", b" ", b"\t", b"x",
          b"Subject: s", b"From ", b":", b"Content-Type: multipart/mixed; boundary=b",
          b"Content-Type: multipart/alternative; boundary=c", b"Content-Type: message/rfc822",
          b"Content-Transfer-Encoding: base64", b"\xff", b"=?utf-8?q?x?="]


@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=40))
@settings_hypothesis(max_examples=400, deadline=None)
def test_random_messages_give_the_feedparsers_tree_or_none(pieces: list[bytes]) -> None:
    raw = b"".join(pieces)
    message = parse_structure(raw, _PARSE_POLICY)
    if message is not None:
        assert tree(message) == feedparser_tree(raw)


def test_a_forwarded_original_is_the_message_as_carried() -> None:
    [email] = parse_raw(FORWARD, "forward", LimitSettings()).emails
    start = FORWARD.index(b"From: a@example.org")
    end = FORWARD.index(b"--in--\r\n") + len(b"--in--\r\n")
    assert email["size"] == end - start  # not a re-serialised copy's size
    assert (email["subject"], email["text"], email["html"]) == ("inner", "hello", "<p>hello</p>")


def test_the_feedparser_fed_in_slices_gives_the_tree_of_the_whole_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback feeds the message in slices (memory); slices of 7 bytes cut CRLFs too."""
    monkeypatch.setattr(extract, "_FEED_BYTES", 7)
    slow = 0
    for path in MESSAGES:
        raw = path.read_bytes()
        if parse_structure(raw, _PARSE_POLICY) is not None:
            continue
        slow += 1
        assert tree(extract._parse_bytes(raw)) == feedparser_tree(raw), path.relative_to(CORPUS)
    crafted = FORWARD.replace(b"see attached\r\n", b"see\rattached\r\n")
    assert tree(extract._parse_bytes(crafted)) == feedparser_tree(crafted)
    assert slow > 10
