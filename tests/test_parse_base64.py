"""parse.mime.decode_base64: its pybase64 fast path gives exactly what binascii's lenient
decoding (and its recovery of a broken tail) gives, on any text; no server."""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parse import mime

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# padding, line breaks and blanks, the other alphabet, junk, non-ASCII
OTHERS = ["=", "==", "\r\n", "\n", " ", "\t", "-", "_", ".", "*", "\x00", "\x1c", "\x85",
          "\xa0", "\u3000", "é"]


def both(data: bytes | str) -> tuple[tuple[bytes, list[str]], tuple[bytes, list[str]]]:
    fast_defects: list[str] = []
    slow_defects: list[str] = []
    fast = mime.decode_base64(data, fast_defects)
    slow = mime._decode_base64_binascii(data, slow_defects)
    return (fast, fast_defects), (slow, slow_defects)


texts = st.lists(st.one_of(st.sampled_from(list(ALPHABET)), st.sampled_from(OTHERS)),
                 max_size=60).map("".join)


@settings(max_examples=1500, deadline=None)
@given(texts, st.booleans())
def test_any_text_decodes_as_binascii_decodes_it(text: str, as_bytes: bool) -> None:
    # a str is only ever handed over when it is ASCII (payload_bytes)
    data: bytes | str = text.encode("utf-8") if as_bytes or not text.isascii() else text
    fast, slow = both(data)
    assert fast == slow


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 5), st.integers(0, 10**6))
def test_mime_base64_damaged_in_the_usual_ways_decodes_as_binascii_decodes_it(
        content: bytes, damage: int, where: int) -> None:
    text = base64.encodebytes(content).decode("ascii")
    at = where % (len(text) + 1)
    text = [text,
            text[:at],  # cut short
            text + base64.b64encode(b"xy").decode(),  # a second encoding appended
            text[:at] + "=" + text[at:],  # padding inside
            text + "garbage!",
            text.replace("\n", "\r\n")][damage]
    fast, slow = both(text)
    assert fast == slow


def test_ordinary_base64_takes_the_fast_path() -> None:
    content = random.Random(1).randbytes(50_000)
    for text in (base64.encodebytes(content).decode(), base64.encodebytes(content)):
        assert mime._decode_base64_fast(text) == content
        assert mime.decode_base64(text, []) == content


@pytest.mark.parametrize("text", [
    "QQ==QUJD",  # padding, then more: binascii stops at the padding
    "QUJD=REVG",
])
def test_padding_before_the_end_is_left_to_binascii(text: str) -> None:
    assert mime._decode_base64_fast(text) is None
    assert mime.decode_base64(text, []) == mime._decode_base64_binascii(text, [])


def test_a_large_attachment_is_left_to_binascii_which_reads_it_in_place() -> None:
    text = "QUJD" * (mime._FAST_BASE64_MAX // 4 + 1)
    assert mime._decode_base64_fast(text) is None
    assert mime.decode_base64(text, []) == b"ABC" * (mime._FAST_BASE64_MAX // 4 + 1)
