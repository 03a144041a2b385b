"""A fast MIME structure parser for well-formed messages, giving what the feedparser gives.

Takes the raw bytes of a message and a ``compat32`` policy; gives the same
``email.message.Message`` tree as ``BytesParser(policy=policy).parsebytes(raw)`` -- the same
headers (through the policy's ``header_source_parse``), payload strings, parts, preamble and
epilogue -- or None when the message is not plainly well-formed, and the caller then uses the
feedparser, whose handling of damage (and the defects it records) stays the reference.  The
message inside a ``message/*`` part is a :class:`CarriedMessage`, which also holds the bytes it
was parsed from (the original's bytes as carried, without the delimiter's line break).

The feedparser reads one line at a time through a stack of end-of-part predicates; this
module finds the header blocks and the delimiter lines with regular expressions over the
whole text instead, which is several times cheaper.  It returns None on anything the
feedparser would record a defect for or treat specially: a header block not made only of
``name: value`` and continuation lines, no blank line after the headers, a bare CR, a
``From `` line, a multipart without boundary or whose start or close delimiter is missing,
two delimiter lines in a row, ``multipart/digest``, ``message/delivery-status``, or a
multipart with a transfer encoding other than 7bit/8bit/binary.  Never raises on content.

The raw bytes are searched in place, by offsets: only what the tree keeps (header lines,
payloads, preambles, epilogues, decoded ``ascii``/``surrogateescape`` as the feedparser
decodes them) is copied, so a 25 MB attachment costs one copy, not five (issue 8).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from email.message import Message
from email.policy import Compat32

_BARE_CR = re.compile(rb"\r(?!\n)")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_HEADER_BLOCK = re.compile(rb"(?:[!-9;-~]+:[^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*)*")
_HEADER = re.compile(rb"[!-9;-~]+:[^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*")
_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?:\r?\n|\Z)")
_IDENTITY_ENCODINGS = ("7bit", "8bit", "binary")
# Deeper nesting goes to the feedparser, whose recursion the caller already bounds.
_MAX_DEPTH = 50


class CarriedMessage(Message):
    """The message inside a message/* part, with the bytes it was parsed from.

    ``source_view`` is those bytes where they lie in the outer message (no copy of a big
    original); ``source`` copies them out.
    """

    source_view: memoryview = memoryview(b"")

    @property
    def source(self) -> bytes:
        return bytes(self.source_view)


def parse_structure(raw: bytes, policy: Compat32) -> Message | None:
    """The feedparser's tree for ``raw``, or None when ``raw`` is not plainly well-formed."""
    if b"\r" in raw and _BARE_CR.search(raw):
        return None
    return _message(raw, 0, len(raw), policy, 0, in_part=False)


def _text(raw: bytes, start: int, end: int) -> str:
    """``raw[start:end]`` decoded as the feedparser decodes it, without a copy of the bytes."""
    return str(memoryview(raw)[start:end], "ascii", "surrogateescape")


def _message(raw: bytes, start: int, end: int, policy: Compat32, depth: int, in_part: bool,
             carried: bool = False) -> Message | None:
    """One message (or body part) in ``raw[start:end]``: headers, a blank line, its body.

    ``in_part``: the text ends before a delimiter line, so the line break that belongs to the
    delimiter is dropped where the feedparser drops it: from the innermost message of a
    message/* chain, from its payload, or from its epilogue (None when that leaves nothing)
    if it is a multipart.
    """
    if depth > _MAX_DEPTH:
        return None
    header_end = start
    if raw.startswith(b"\n", start, end):
        body = start + 1
    elif raw.startswith(b"\r\n", start, end):
        body = start + 2
    else:
        blank = _BLANK_LINE.search(raw, start, end)
        if blank is None:
            return None
        header_end, body = blank.start() + 1, blank.end()
        if _HEADER_BLOCK.fullmatch(raw, start, header_end) is None:
            return None
    message = CarriedMessage(policy=policy) if carried else Message(policy=policy)
    for match in _HEADER.finditer(raw, start, header_end):
        line = match.group().decode("ascii", "surrogateescape")
        message.set_raw(*policy.header_source_parse([line]))
    content_type = message.get_content_type()
    maintype = content_type.split("/", 1)[0]
    if content_type in ("multipart/digest", "message/delivery-status"):
        return None
    if maintype == "message":
        inner = _message(raw, body, end, policy, depth + 1, in_part, carried=True)
        if inner is None:
            return None
        assert isinstance(inner, CarriedMessage)
        inner.source_view = memoryview(raw)[body:_strip_eol(raw, body, end) if in_part else end]
        message.attach(inner)
        return message
    if maintype == "multipart":
        if not _split_multipart(message, raw, body, end, policy, depth):
            return None
        if in_part:
            epilogue = message.epilogue
            message.epilogue = None if epilogue == "" else _strip_eol_text(epilogue or "")
        return message
    message.set_payload(_text(raw, body, _strip_eol(raw, body, end) if in_part else end))
    return message


def _split_multipart(message: Message, raw: bytes, start: int, end: int, policy: Compat32,
                     depth: int) -> bool:
    """Attach the parts in ``raw[start:end]`` to ``message``; False when not plainly
    well-formed."""
    boundary = message.get_boundary()
    if boundary is None:
        return False
    encoding = str(message.get("content-transfer-encoding", "8bit")).lower()
    if encoding not in _IDENTITY_ENCODINGS:
        return False
    try:
        delimiter = ("--" + boundary).encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return False  # a character no raw byte decodes to: no delimiter line can match
    delimiters = _delimiter_lines(raw, start, end, delimiter)
    first = next(delimiters, None)
    if first is None or first[2]:
        return False
    if first[0] != start:
        message.preamble = _text(raw, start, _strip_eol(raw, start, first[0]))
    part_start = first[1]
    for line_start, line_end, closing in delimiters:
        if line_start == part_start:
            return False  # the feedparser skips repeated delimiter lines
        part = _message(raw, part_start, line_start, policy, depth + 1, in_part=True)
        if part is None:
            return False
        message.attach(part)
        if closing:
            message.epilogue = _text(raw, line_end, end)
            return True
        part_start = line_end
    return False  # no close delimiter


def _delimiter_lines(raw: bytes, start: int, end: int,
                     delimiter: bytes) -> Iterator[tuple[int, int, bool]]:
    """(start, end after its line break, is the close delimiter) of each delimiter line.

    A delimiter line is ``--boundary``, ``--`` for the close delimiter, then only blanks
    (the feedparser's rule); found with ``bytes.find``, much cheaper than a MULTILINE regex.
    """
    needle = b"\n" + delimiter
    if raw.startswith(delimiter, start, end):
        position = start
    else:
        position = raw.find(needle, start, end)
        if position >= 0:
            position += 1
    while position >= 0:
        after = _DELIMITER_TAIL.match(raw, position + len(delimiter), end)
        if after is not None:
            yield position, after.end(), after.group(1) is not None
        position = raw.find(needle, position + 1, end)
        if position >= 0:
            position += 1


def _strip_eol(raw: bytes, start: int, end: int) -> int:
    """The end of ``raw[start:end]`` without its last line break (no bare CR reaches here)."""
    if raw.endswith(b"\r\n", start, end):
        return end - 2
    return end - 1 if raw.endswith(b"\n", start, end) else end


def _strip_eol_text(text: str) -> str:
    """``text`` without its last line break."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text
