"""The ingest poller's reader of UID FETCH responses (pure logic: imaplib's list, no server).

The lists are shaped as imaplib hands them over (checked against Dovecot in
tests/test_ingest.py): ``(text ending in {size}, literal)`` pairs, then the text after the
last literal.
"""

from __future__ import annotations

import pytest

from ingest.fetch_response import FetchParseError, RawResponse, parse_fetch


def test_dovecots_responses_give_each_body_with_its_own_uid() -> None:
    data: RawResponse = [
        (b'1 (UID 7 INTERNALDATE "27-Nov-2026 11:53:34 +0000" BODY[] {5}', b"hello"), b")",
        (b'2 (UID 9 INTERNALDATE " 3-Nov-2026 01:02:03 -0500" BODY[] {3}', b"abc"), b")"]
    assert list(parse_fetch(data)) == [
        (1, {b"UID": b"7", b"INTERNALDATE": b"27-Nov-2026 11:53:34 +0000", b"BODY[]": b"hello"}),
        (2, {b"UID": b"9", b"INTERNALDATE": b" 3-Nov-2026 01:02:03 -0500", b"BODY[]": b"abc"})]


def test_items_in_any_order_lists_and_unsolicited_responses() -> None:
    data: RawResponse = [b"4 (FLAGS (\\Seen $Junk) UID 12)",  # another session changed flags
            (b"5 (BODY[] {4}", b"body"),
            b' UID 13 FLAGS () BODYSTRUCTURE (("text" "plain" NIL) "mixed") MODSEQ (42))',
            (b"6 (uid 14 body[] {0}", b""), b" INTERNALDATE NIL)"]
    assert list(parse_fetch(data)) == [
        (4, {b"FLAGS": (b"\\Seen", b"$Junk"), b"UID": b"12"}),
        (5, {b"BODY[]": b"body", b"UID": b"13", b"FLAGS": (),
             b"BODYSTRUCTURE": ((b"text", b"plain", None), b"mixed"), b"MODSEQ": (b"42",)}),
        (6, {b"UID": b"14", b"BODY[]": b"", b"INTERNALDATE": None})]


def test_a_literal_is_never_read_as_response_text() -> None:
    trap = b') UID 99 BODY[] {3}\r\n"x" (\r\n'
    data: RawResponse = [(b"1 (UID 5 BODY[] {%d}" % len(trap), trap), b")"]
    assert list(parse_fetch(data)) == [(1, {b"UID": b"5", b"BODY[]": trap})]


def test_quoted_bodies_sections_and_two_literals_in_one_response() -> None:
    data: RawResponse = [(b'3 (UID 8 BODY[HEADER.FIELDS (SUBJECT FROM)]<0> {2}', b"hi"),
            (b' BODY[] {3}', b"all"), b' X-NOTE "a \\"quoted\\" \\\\ note")']
    assert list(parse_fetch(data)) == [(3, {
        b"UID": b"8", b"BODY[HEADER.FIELDS (SUBJECT FROM)]<0>": b"hi", b"BODY[]": b"all",
        b"X-NOTE": b'a "quoted" \\ note'})]


@pytest.mark.parametrize("data", [
    [b"1 (UID 5"],  # unbalanced
    [b"1 (UID 5))"],
    [b"(UID 5)"],  # no sequence number
    [b"1 (UID)"],  # an item without a value
    [(b"1 (UID 5 BODY[] {9}", b"short"), b")"],  # literal shorter than announced
    [(b"1 (UID 5 BODY[]", b"abc"), b")"],  # a literal without its size
    [(b"1 (UID 5 BODY[] {3}", b"abc")],  # ends inside the response
    [b"1 (UID 5 BODY[] {3})"],  # a literal size with no literal
    [b'1 (UID 5 X "unterminated)'],
])
def test_anything_malformed_is_an_error_not_a_skipped_message(
        data: RawResponse) -> None:
    with pytest.raises(FetchParseError):
        list(parse_fetch(data))
