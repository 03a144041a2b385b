"""A fast MIME structure parser for well-formed messages, giving what the feedparser gives.

Takes the raw bytes of a message and a ``compat32`` policy; gives the same
``email.message.Message`` tree as ``BytesParser(policy=policy).parsebytes(raw)`` -- the same
headers (through the policy's ``header_source_parse``), payload strings, parts, preamble and
epilogue -- or None when the message is not plainly well-formed, and the caller then uses the
feedparser, whose handling of damage (and the defects it records) stays the reference.  The
message inside a ``message/*`` part is a :class:`CarriedMessage`, which also holds the text it
was parsed from (the original's bytes as carried, without the delimiter's line break).

The feedparser reads one line at a time through a stack of end-of-part predicates; this
module finds the header blocks and the delimiter lines with regular expressions over the
whole text instead, which is several times cheaper.  It returns None on anything the
feedparser would record a defect for or treat specially: a header block not made only of
``name: value`` and continuation lines, no blank line after the headers, a bare CR, a
``From `` line, a multipart without boundary or whose start or close delimiter is missing,
two delimiter lines in a row, ``multipart/digest``, ``message/delivery-status``, or a
multipart with a transfer encoding other than 7bit/8bit/binary.  Never raises on content.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from email.message import Message
from email.policy import Compat32

_BARE_CR = re.compile(r"\r(?!\n)")
_BLANK_LINE = re.compile(r"\n\r?\n")
_HEADER_BLOCK = re.compile(r"(?:[!-9;-~]+:[^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*)*")
_HEADER = re.compile(r"[!-9;-~]+:[^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*")
_DELIMITER_TAIL = re.compile(r"(--)?[ \t]*(?:\r?\n|\Z)")
_IDENTITY_ENCODINGS = ("7bit", "8bit", "binary")
# Deeper nesting goes to the feedparser, whose recursion the caller already bounds.
_MAX_DEPTH = 50


class CarriedMessage(Message):
    """The message inside a message/* part, with the text it was parsed from."""

    source: str = ""


def parse_structure(raw: bytes, policy: Compat32) -> Message | None:
    """The feedparser's tree for ``raw``, or None when ``raw`` is not plainly well-formed."""
    text = raw.decode("ascii", "surrogateescape")
    if "\r" in text and _BARE_CR.search(text):
        return None
    return _message(text, policy, 0, in_part=False)


def _message(text: str, policy: Compat32, depth: int, in_part: bool,
             carried: bool = False) -> Message | None:
    """One message (or body part): its header block, a blank line, then its body.

    ``in_part``: the text ends before a delimiter line, so the line break that belongs to the
    delimiter is dropped where the feedparser drops it: from the innermost message of a
    message/* chain, from its payload, or from its epilogue (None when that leaves nothing)
    if it is a multipart.
    """
    if depth > _MAX_DEPTH:
        return None
    if text.startswith("\n"):
        headers, body = "", text[1:]
    elif text.startswith("\r\n"):
        headers, body = "", text[2:]
    else:
        blank = _BLANK_LINE.search(text)
        if blank is None:
            return None
        headers, body = text[: blank.start() + 1], text[blank.end():]
        if _HEADER_BLOCK.fullmatch(headers) is None:
            return None
    message = CarriedMessage(policy=policy) if carried else Message(policy=policy)
    for match in _HEADER.finditer(headers):
        message.set_raw(*policy.header_source_parse([match.group()]))
    content_type = message.get_content_type()
    maintype = content_type.split("/", 1)[0]
    if content_type in ("multipart/digest", "message/delivery-status"):
        return None
    if maintype == "message":
        inner = _message(body, policy, depth + 1, in_part, carried=True)
        if inner is None:
            return None
        assert isinstance(inner, CarriedMessage)
        inner.source = _strip_eol(body) if in_part else body
        message.attach(inner)
        return message
    if maintype == "multipart":
        if not _split_multipart(message, body, policy, depth):
            return None
        if in_part:
            epilogue = message.epilogue
            message.epilogue = None if epilogue == "" else _strip_eol(epilogue or "")
        return message
    message.set_payload(_strip_eol(body) if in_part else body)
    return message


def _split_multipart(message: Message, body: str, policy: Compat32, depth: int) -> bool:
    """Attach the parts of ``body`` to ``message``; False when it is not plainly well-formed."""
    boundary = message.get_boundary()
    if boundary is None:
        return False
    encoding = str(message.get("content-transfer-encoding", "8bit")).lower()
    if encoding not in _IDENTITY_ENCODINGS:
        return False
    delimiters = _delimiter_lines(body, "--" + boundary)
    first = next(delimiters, None)
    if first is None or first[2]:
        return False
    if first[0]:
        message.preamble = _strip_eol(body[: first[0]])
    start = first[1]
    for line_start, line_end, closing in delimiters:
        if line_start == start:
            return False  # the feedparser skips repeated delimiter lines
        part = _message(body[start:line_start], policy, depth + 1, in_part=True)
        if part is None:
            return False
        message.attach(part)
        if closing:
            message.epilogue = body[line_end:]
            return True
        start = line_end
    return False  # no close delimiter


def _delimiter_lines(body: str, delimiter: str) -> Iterator[tuple[int, int, bool]]:
    """(start, end after its line break, is the close delimiter) of each delimiter line.

    A delimiter line is ``--boundary``, ``--`` for the close delimiter, then only blanks
    (the feedparser's rule); found with ``str.find``, much cheaper than a MULTILINE regex.
    """
    if body.startswith(delimiter):
        position = 0
    else:
        position = body.find("\n" + delimiter)
        if position >= 0:
            position += 1
    while position >= 0:
        after = _DELIMITER_TAIL.match(body, position + len(delimiter))
        if after is not None:
            yield position, after.end(), after.group(1) is not None
        position = body.find("\n" + delimiter, position + 1)
        if position >= 0:
            position += 1


def _strip_eol(text: str) -> str:
    """``text`` without its last line break (a bare CR never reaches here)."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text

