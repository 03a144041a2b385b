"""Reads the untagged FETCH responses of one ``UID FETCH`` as imaplib hands them over.

Takes imaplib's list for one command: each response is zero or more ``(text, literal)``
pairs (the text ending in ``{size}``) and then one bytes item, the text after the last
literal; gives :func:`parse_fetch`, one ``(sequence number, {ITEM NAME: value})`` per
response, where a value is bytes (an atom, a quoted string unescaped, a literal), ``None``
for NIL, or a tuple for a parenthesised list.  It replaces imapclient's general response
parser on the ingest path, which cost more CPU than everything else the poller does with
a message; pairing stays the same: each value belongs to the response it came in, so a
body is only ever paired with the UID of its own response.

Fails with :class:`FetchParseError` (an ``imaplib.IMAP4.error``, which the IMAP source turns
into ``MailboxUnavailable``) on anything that is not a well-formed FETCH response: nothing is
skipped silently.
"""

from __future__ import annotations

import imaplib
import re
from collections.abc import Iterator, Sequence

FetchValue = bytes | None | tuple["FetchValue", ...]
RawResponse = Sequence[bytes | tuple[bytes, bytes]]


class FetchParseError(imaplib.IMAP4.error):
    pass


# An atom may carry a section and a partial: BODY[], BODY[HEADER.FIELDS (A B)]<0.100>.
_TOKEN = re.compile(
    rb'[ ]*(?:(?P<open>\()|(?P<close>\))|"(?P<quoted>(?:[^"\\\r\n]|\\.)*)"'
    rb'|(?P<atom>[^ ()"\[\]{}\r\n]+(?:\[[^\]\r\n]*\](?:<[0-9.]+>)?)?))')
_LITERAL_AT_END = re.compile(rb'[ ]*~?\{(?P<size>[0-9]+)\+?\}[ ]*\Z')
_QUOTED_ESCAPE = re.compile(rb'\\(.)')
_LITERAL = object()  # where a literal stands in the token stream


def parse_fetch(data: RawResponse) -> Iterator[tuple[int, dict[bytes, FetchValue]]]:
    """One ``(sequence number, items)`` per FETCH response in ``data``."""
    tokens: list[object] = []
    literals: list[bytes] = []
    for item in data:
        if isinstance(item, tuple):
            text, literal = item
            found = _LITERAL_AT_END.search(text)
            if found is None:
                raise FetchParseError(f"FETCH response: literal without a size: {text[-80:]!r}")
            if int(found["size"]) != len(literal):
                raise FetchParseError("FETCH response: literal shorter than announced")
            _tokenize(text[:found.start()], tokens)
            tokens.append(_LITERAL)
            literals.append(literal)
            continue
        if item is None:
            continue
        _tokenize(item, tokens)
        yield _response(tokens, literals)
        tokens, literals = [], []
    if tokens:
        raise FetchParseError("FETCH response: ends inside a response")


def _tokenize(text: bytes, tokens: list[object]) -> None:
    position, end = 0, len(text.rstrip(b" \r\n"))
    while position < end:
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise FetchParseError(f"FETCH response: cannot read {text[position:position + 80]!r}")
        position = match.end()
        if match["open"]:
            tokens.append(b"(")
        elif match["close"]:
            tokens.append(b")")
        elif match["quoted"] is not None:
            tokens.append(("quoted", _QUOTED_ESCAPE.sub(rb"\1", match["quoted"])))
        else:
            tokens.append(match["atom"])


def _response(tokens: list[object], literals: list[bytes]) -> tuple[int, dict[bytes, FetchValue]]:
    if len(tokens) < 3 or not isinstance(tokens[0], bytes) or not tokens[0].isdigit() \
            or tokens[1] != b"(" or tokens[-1] != b")":
        raise FetchParseError(f"FETCH response: not 'n (...)': {tokens[:4]!r}")
    sequence = int(tokens[0])
    stream = _Stream(tokens[2:-1], literals)
    items: dict[bytes, FetchValue] = {}
    while not stream.done():
        name = stream.next()
        if not isinstance(name, bytes) or name in (b"(", b")"):
            raise FetchParseError(f"FETCH response: item name expected, got {name!r}")
        items[name.upper()] = stream.value()
    return sequence, items


class _Stream:
    def __init__(self, tokens: list[object], literals: list[bytes]) -> None:
        self._tokens = tokens
        self._literals = iter(literals)
        self._at = 0

    def done(self) -> bool:
        return self._at >= len(self._tokens)

    def next(self) -> object:
        if self.done():
            raise FetchParseError("FETCH response: an item has no value")
        token = self._tokens[self._at]
        self._at += 1
        return token

    def value(self) -> FetchValue:
        token = self.next()
        if token is _LITERAL:
            return next(self._literals)
        if isinstance(token, tuple):
            return token[1]  # quoted
        if token == b"(":
            values: list[FetchValue] = []
            while not self.done() and self._tokens[self._at] != b")":
                values.append(self.value())
            if self.done():
                raise FetchParseError("FETCH response: unbalanced parentheses")
            self._at += 1
            return tuple(values)
        if token == b")":
            raise FetchParseError("FETCH response: unbalanced parentheses")
        assert isinstance(token, bytes)
        return None if token.upper() == b"NIL" else token
