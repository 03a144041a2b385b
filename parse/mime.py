"""The body and attachments of one parsed message, walked without the expensive header policy.

Takes an ``email.message.Message`` parsed with ``policy=compat32`` (cheap: headers stay raw
strings) and gives its text and HTML bodies and its attachments as plain data.  The walk
never descends into an attached message (``message/*``): that is a leaf, an attachment of its
own, or an inner email for the caller to unwrap.  A TNEF ``winmail.dat`` is opened: its
attachments and body (compressed RTF as plain text) take its place.  Payloads are decoded by us
(base64 leniently, charsets with replacement characters); nothing here raises on bad
content -- problems become short defect strings.  Nesting deeper than the limit raises
PermanentError("nesting-too-deep").
"""

from __future__ import annotations

import binascii
import codecs
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from email.message import Message
from email.policy import Compat32
from typing import Any

import pybase64

from parse.headers import add_defect, decode_bytes, decode_words, raw_text, scrub, unfold
from parse.limits import Budget
from parse.rtf import rtf_to_text
from parse.tnef import TnefError, decompress_rtf, embedded_message_to_mime, is_tnef, read_tnef
from shared.errors import PermanentError

_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_INNER_BLANK = re.compile(rb"\S[ \t]+(?=\S)")
_BASE64_SAMPLE = 4096
# pybase64 decodes about ten times as fast as binascii but copies its input first: it is used
# up to this size, where the copy does not matter (a large attachment is read in place).
_FAST_BASE64_MAX = 4 * 1024 * 1024
_PADDING_TAIL = re.compile(r"=[=\s]*\Z")
_PADDING_TAIL_BYTES = re.compile(rb"=[=\s]*\Z")
_BIDI_AND_INVISIBLE = re.compile("[\u061c\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_ENCODED_SEPARATOR = re.compile(r"%(?:2f|5c|00)", re.IGNORECASE)
_MAX_FILENAME = 200
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
INNER_MESSAGE_TYPES = ("message/rfc822", "message/global")
TNEF_TYPES = ("application/ms-tnef", "application/vnd.ms-tnef")


@dataclass
class Leaf:
    """One part that is not a multipart container, in document order."""

    part: Message
    content_type: str
    depth: int


@dataclass
class Content:
    text: str | None = None
    html: str | None = None
    attachments: list[dict[str, Any]] = field(default_factory=list)


def leaves(message: Message, max_depth: int, defects: list[str],
           budget: Budget | None = None) -> list[Leaf]:
    """Every non-multipart part of ``message`` in order, not descending into message/* parts.

    The parser's defects of every part visited (containers too) are added to ``defects``;
    ``budget`` is checked at every part.
    """
    found: list[Leaf] = []
    stack: list[tuple[Message, int]] = [(message, 0)]
    while stack:
        if budget is not None:
            budget.check()
        part, depth = stack.pop()
        if depth > max_depth:
            raise PermanentError("nesting-too-deep", f"more than {max_depth} levels")
        part_defects(part, defects)
        content_type = content_type_of(part)
        payload = stored_payload(part)
        if content_type.startswith("multipart/") and isinstance(payload, list):
            stack.extend((sub, depth + 1) for sub in reversed(payload)
                         if isinstance(sub, Message))
        else:
            found.append(Leaf(part, content_type, depth))
    return found


def stored_payload(part: Message) -> Any:
    """``part.get_payload()``, without its whole-payload copy for a plain ASCII payload.

    compat32's ``get_payload()`` encodes a str payload whole just to look for surrogates: a
    passing copy the size of the attachment.  An ASCII str has none and is returned as it is.
    """
    payload = getattr(part, "_payload", None)
    if isinstance(payload, str) and payload.isascii():
        return payload
    return part.get_payload()


def content_type_of(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:  # a hostile Content-Type is plain text
        return "text/plain"


def disposition_of(part: Message) -> str:
    value = part.get("content-disposition")
    if value is None:
        return ""
    return str(value).split(";", 1)[0].strip().lower()


def raw_filename(part: Message, defects: list[str]) -> str | None:
    """The filename the part declares (RFC 2231 / RFC 2047 decoded), unsanitised, or None."""
    try:
        name = _with_text_headers(part).get_filename()
    except Exception:
        add_defect(defects, "bad-filename")
        return None
    if name is None:
        return None
    _check_rfc2231_names(part, defects)
    return decode_words(str(name), defects)


_RFC2231_NAME = re.compile(r"(?:file)?name\*(?:\d+\*|\*?)=\s*\"?([^;\"]*)", re.IGNORECASE)
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_BAD_QP_ESCAPE = re.compile(rb"=(?![0-9A-Fa-f]{2}|\r?\n|[ \t]*\r?$)", re.MULTILINE)


def _known_charset(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def _check_rfc2231_names(part: Message, defects: list[str]) -> None:
    """Record a defect for an RFC 2231 file name with a broken %-escape or an unknown charset."""
    for header in ("content-disposition", "content-type"):
        for value in _RFC2231_NAME.findall(unfold(str(part.get(header, "")))):
            charset, quote, encoded = value.partition("'")
            if quote and charset and not _known_charset(charset):
                add_defect(defects, f"unknown-charset:{charset[:30].lower()}")
            if _BAD_PERCENT.search(encoded if quote else value):
                add_defect(defects, "bad-rfc2231-parameter")


def _with_text_headers(part: Message) -> Message:
    """``part``, or a stand-in whose Content-* headers have raw 8-bit bytes decoded as text.

    compat32 turns a header holding raw 8-bit bytes into U+FFFD when its parameters are read;
    a UTF-8 (or cp1252) filename sent without RFC 2231 encoding is common enough to keep.
    """
    raw = [(name, value) for name, value in part.raw_items()
           if name.lower() in ("content-disposition", "content-type")]
    if not any(raw_text(value) != value for _, value in raw):
        return part
    stand_in = Message()
    for name, value in raw:
        stand_in[name] = raw_text(value)
    return stand_in


def sanitise_filename(name: str | None, fallback: str) -> str:
    """A name safe to show and store: no directories, control, bidi or NUL characters."""
    if not name:
        return fallback
    name = _ENCODED_SEPARATOR.sub("_", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _BIDI_AND_INVISIBLE.sub("", name)
    name = "".join(char for char in name if unicodedata.category(char)[0] != "C")
    name = name.strip().lstrip(".").strip()
    if not name:
        return fallback
    if len(name) > _MAX_FILENAME:
        _, dot, extension = name.rpartition(".")
        keep = extension if dot and len(extension) <= 16 else ""
        name = name[: _MAX_FILENAME - len(keep) - 1] + ("." + keep if keep else "")
    return name


def payload_bytes(part: Message, defects: list[str], *, text: bool = False) -> bytes:
    """The decoded content of a leaf part (transfer encoding undone); never raises.

    ``text``: the part is read as a body, so "base64" that is plainly text stays text.
    """
    if part.is_multipart():
        return message_part_bytes(part, defects)
    payload = stored_payload(part)
    if not isinstance(payload, str):
        return b""
    encoding = unfold(str(part.get("content-transfer-encoding", ""))).lower()
    if encoding == "base64":
        if payload.isascii():
            # a2b_base64 reads an ASCII str in place: no bytes copy of a big attachment
            if text and _not_base64(payload[:_BASE64_SAMPLE].encode("ascii")):
                add_defect(defects, "not-base64")
                return payload.encode("ascii")
            return decode_base64(payload, defects)
        encoded = payload.encode("utf-8", "surrogateescape")
        if text and _not_base64(encoded):
            add_defect(defects, "not-base64")
            return encoded
        return decode_base64(encoded, defects)
    if encoding == "quoted-printable" and _BAD_QP_ESCAPE.search(
            payload.encode("utf-8", "surrogateescape")):
        add_defect(defects, "bad-quoted-printable")
    try:
        data = part.get_payload(decode=True)
    except Exception:  # uuencode and quoted-printable oddities
        add_defect(defects, f"bad-transfer-encoding:{encoding[:20]}")
        return payload.encode("utf-8", "surrogateescape")
    return data if isinstance(data, bytes) else b""


def decode_base64(data: bytes | str, defects: list[str]) -> bytes:
    """Lenient base64: stray characters skipped, a broken tail dropped, with a defect.

    ``data`` may be an ASCII str (read in place when it is large).
    """
    fast = _decode_base64_fast(data)
    return fast if fast is not None else _decode_base64_binascii(data, defects)


def _decode_base64_fast(data: bytes | str) -> bytes | None:
    """pybase64's lenient decoding, where it gives exactly what binascii's gives; else None.

    Both skip characters outside the alphabet.  They part ways at a "=" before the end
    (binascii stops decoding at a whole group's padding, pybase64 does not) and on an error;
    so only text whose every "=" is in the padding at its end is decoded here, and an error
    leaves the text to binascii and its recovery."""
    if len(data) > _FAST_BASE64_MAX:
        return None
    if isinstance(data, str):
        first = data.find("=")
        padded = first < 0 or _PADDING_TAIL.match(data, first) is not None
    else:
        first = data.find(b"=")
        padded = first < 0 or _PADDING_TAIL_BYTES.match(data, first) is not None
    if not padded:
        return None
    try:
        decoded: bytes = pybase64.b64decode(data)
    except (binascii.Error, ValueError):
        return None
    return decoded


def _decode_base64_binascii(data: bytes | str, defects: list[str]) -> bytes:
    """:func:`decode_base64` with binascii alone (the reference the fast path must match)."""
    try:
        return binascii.a2b_base64(data, strict_mode=False)
    except binascii.Error:
        pass
    add_defect(defects, "broken-base64")
    if isinstance(data, str):
        data = data.encode("ascii")
    cleaned = _NOT_BASE64.sub(b"", data.split(b"=", 1)[0])
    usable = len(cleaned) - len(cleaned) % 4
    tail = cleaned[usable:]
    if len(tail) >= 2:
        cleaned = cleaned[:usable] + tail + b"=" * (4 - len(tail))
    else:
        cleaned = cleaned[:usable]
    try:
        return binascii.a2b_base64(cleaned)
    except binascii.Error:
        return b""


def _not_base64(data: bytes) -> bool:
    """Is ``data`` plainly text: blanks inside its lines (more than 1 in 25 characters)?

    No base64 encoder writes blanks inside a line; decoding such a body (RFC 2045 ignores
    the blanks) turns readable text into bytes of noise.
    """
    sample = data[:_BASE64_SAMPLE].strip()
    if b" " not in sample and b"\t" not in sample:
        return False
    return len(_INNER_BLANK.findall(sample)) * 25 > len(sample)


def message_part_bytes(part: Message, defects: list[str]) -> bytes:
    """The bytes of the message carried by a message/* part (transfer encoding undone)."""
    payload = part.get_payload()
    if (content_type_of(part) in INNER_MESSAGE_TYPES and isinstance(payload, list)
            and len(payload) == 1 and isinstance(payload[0], Message)):
        body = serialise(payload[0])
    else:
        whole = serialise(part)
        split = re.search(rb"\r?\n\r?\n", whole)
        body = whole[split.end():] if split else b""
    encoding = unfold(str(part.get("content-transfer-encoding", ""))).lower()
    if encoding == "base64":
        if _not_base64(body):  # a message labelled base64 but sent as text: keep the text
            add_defect(defects, "not-base64")
            return body
        return decode_base64(body, defects)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    return body


class _VerbatimHeaders(Compat32):
    """compat32 that writes each header back as it was read, without re-folding it."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        return f"{name}: {value}{self.linesep}".encode("utf-8", "surrogateescape")


_LF_HEADERS = _VerbatimHeaders()
_CRLF_HEADERS = _VerbatimHeaders(linesep="\r\n")


def serialise(message: Message) -> bytes:
    """The bytes of a parsed message, headers as read (cheaper and truer than re-folding),
    each header line ended as the message's own lines are (CRLF or LF), so that a message
    sent with CRLF comes out as it was sent, not with mixed line endings."""
    return message.as_bytes(policy=_CRLF_HEADERS if ends_lines_with_crlf(message)
                            else _LF_HEADERS)


def ends_lines_with_crlf(message: Message) -> bool:
    """Whether the first text the parser kept with a line break in it (a body, or a folded
    header) breaks it with CRLF."""
    for part in message.walk():
        for _, value in part.raw_items():  # as read: values() gives Header for 8-bit text
            if "\n" in value:
                return "\r\n" in value
        payload = part.get_payload()
        if isinstance(payload, str) and "\n" in payload:
            return "\r\n" in payload
    return False


def decode_text(part: Message, data: bytes, defects: list[str]) -> str:
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    return decode_bytes(data, charset, defects)


def part_defects(part: Message, defects: list[str]) -> None:
    for defect in getattr(part, "defects", ()):
        add_defect(defects, _CAMEL.sub("-", type(defect).__name__.removesuffix("Defect")).lower())


def inner_subject(message: Message, defects: list[str]) -> str:
    for name, value in message.raw_items():
        if name.lower() == "subject":
            return decode_words(value, defects)
    return ""


def collect(message: Message, max_depth: int, defects: list[str],
            budget: Budget | None = None) -> Content:
    """Text, HTML and attachments of ``message``, in document order."""
    content = Content()
    for leaf in leaves(message, max_depth, defects, budget):
        if budget is not None:
            budget.check()
        part = leaf.part
        if leaf.content_type.startswith("multipart/"):
            # No parts found (a missing or wrong boundary): keep any text as the body.
            add_defect(defects, "multipart-without-parts")
            leftover = decode_text(part, payload_bytes(part, defects, text=True), defects)
            if leftover.strip() and content.text is None:
                content.text = leftover
            continue
        disposition = disposition_of(part)
        if _is_tnef(leaf) and _add_tnef(leaf, content, defects):
            continue
        if leaf.content_type in ("text/plain", "text/html") and disposition != "attachment":
            name = raw_filename(part, defects)
            if name is None:
                text = decode_text(part, payload_bytes(part, defects, text=True), defects)
                if leaf.content_type == "text/plain":
                    content.text = text if content.text is None else content.text + "\n" + text
                    continue
                if content.html is None:
                    content.html = text
                    continue
        content.attachments.append(_attachment_of(leaf, len(content.attachments) + 1, defects))
    return content


def _is_tnef(leaf: Leaf) -> bool:
    if leaf.content_type in TNEF_TYPES:
        return True
    if leaf.content_type != "application/octet-stream":
        return False
    name = raw_filename(leaf.part, [])
    return name is not None and name.strip().lower() == "winmail.dat"


def _add_tnef(leaf: Leaf, content: Content, defects: list[str]) -> bool:
    """Put the attachments (and body) inside a winmail.dat in ``content``; False if unreadable.

    A compressed-RTF body becomes the text body when the message has no other (formatting
    dropped); the winmail.dat itself is kept only when that RTF cannot be read.
    """
    data = payload_bytes(leaf.part, defects)
    try:
        tnef = read_tnef(data)
    except TnefError:
        add_defect(defects, "tnef-unreadable")
        return False
    for defect in tnef.defects:
        add_defect(defects, defect)
    if content.text is None and tnef.text is not None:
        content.text = scrub(tnef.text)
    if content.html is None and tnef.html is not None:
        content.html = scrub(tnef.html)
    for attachment in tnef.attachments:
        number = len(content.attachments) + 1
        if attachment.embedded_message and is_tnef(attachment.data):
            try:
                inner = read_tnef(attachment.data)
                item = embedded_message_to_mime(inner)
            except Exception:  # a damaged embedded item: keep the others
                add_defect(defects, "tnef-unreadable")
                continue
            name = f"{inner.subject}.eml" if (inner.subject or "").strip() else None
            content.attachments.append(_attachment_from(item, None, "message/rfc822", number,
                                                        defects, generated=name))
            continue
        content_type = (attachment.mime_type or "application/octet-stream").strip().lower()
        content.attachments.append(_attachment_from(attachment.data, attachment.name,
                                                    content_type, number, defects))
    if tnef.rtf_compressed is not None and content.text is None and content.html is None:
        try:
            content.text = scrub(rtf_to_text(decompress_rtf(tnef.rtf_compressed)))
            add_defect(defects, "tnef-rtf-body-as-text")
        except TnefError:
            add_defect(defects, "tnef-rtf-body-not-decoded")
            return False
    return True


def _attachment_from(data: bytes, declared: str | None, content_type: str, number: int,
                     defects: list[str], generated: str | None = None) -> dict[str, Any]:
    """An attachment document.  ``filename`` is what persist stores and shows: the declared
    name sanitised, else ``generated``, else ``attachment-N``; ``declared_filename`` is the
    name as the mail declared it (decoded, NUL and lone surrogates replaced), or None."""
    filename = sanitise_filename(declared or generated, f"attachment-{number}")
    if declared is not None and filename != declared:
        add_defect(defects, "unsafe-filename")
    return {"filename": filename,
            "declared_filename": None if declared is None else scrub(declared),
            "content_type": scrub(content_type), "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "content": data}


def _attachment_of(leaf: Leaf, number: int, defects: list[str]) -> dict[str, Any]:
    part = leaf.part
    declared = raw_filename(part, defects)
    generated = None
    if leaf.content_type.startswith("message/"):
        data = message_part_bytes(part, defects) if part.is_multipart() else payload_bytes(
            part, defects)
        if declared is None and leaf.content_type in INNER_MESSAGE_TYPES:
            payload = part.get_payload()
            subject = (inner_subject(payload[0], defects)
                       if isinstance(payload, list) and payload
                       and isinstance(payload[0], Message) else "")
            generated = f"{subject}.eml" if subject.strip() else "attached-message.eml"
    else:
        data = payload_bytes(part, defects)
    return _attachment_from(data, declared, leaf.content_type, number, defects, generated)
