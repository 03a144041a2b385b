"""Outlook's TNEF container (``winmail.dat``, ``application/ms-tnef``), read without a library.

Takes the bytes of a TNEF stream; gives a :class:`Tnef`: the attachments it carries (name,
data, and whether the attachment is itself a message) and the message body when it holds one
(plain text or HTML; :func:`decompress_rtf` opens a compressed RTF body, MS-OXRTFCP).
Written here because the one maintained Python reader (tnefparse) is LGPL-3.0, which the
Apache-2.0 project may not require.  Never raises on bad input: :func:`read_tnef` raises
only :class:`TnefError` when the stream is not TNEF at all; a damaged stream gives what was
read before the damage plus a defect string.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, formataddr

from parse.rebuilt import stable_bytes
from parse.rtf import rtf_to_text

SIGNATURE = 0x223E9F78
_LEVEL_ATTACHMENT = 2
# TNEF attribute ids (low 16 bits of the attribute; the high bits are its type).
_ATT_SUBJECT = 0x8004
_ATT_BODY = 0x800C
_ATT_ATTACH_DATA = 0x800F
_ATT_ATTACH_TITLE = 0x8010
_ATT_MAPI_PROPS = 0x9003
_ATT_ATTACH_RENDDATA = 0x9002
_ATT_ATTACHMENT = 0x9005
# MAPI property ids.
PR_SUBJECT = 0x0037
PR_BODY = 0x1000
PR_BODY_HTML = 0x1013
PR_RTF_COMPRESSED = 0x1009
PR_DISPLAY_NAME = 0x3001
PR_ATTACH_DATA = 0x3701
PR_ATTACH_FILENAME = 0x3704
PR_ATTACH_METHOD = 0x3705
PR_ATTACH_LONG_FILENAME = 0x3707
PR_ATTACH_MIME_TAG = 0x370E
ATTACH_EMBEDDED_MSG = 5
PR_CLIENT_SUBMIT_TIME = 0x0039
PR_TRANSPORT_MESSAGE_HEADERS = 0x007D
PR_SENDER_NAME = 0x0C1A
PR_SENDER_EMAIL = 0x0C1F
PR_INTERNET_MESSAGE_ID = 0x1035
PR_SENDER_SMTP_ADDRESS = 0x5D01
PR_SENT_REPRESENTING_SMTP = 0x5D02
_UNSAFE_HEADER_TEXT = re.compile(r"[\r\n\x00]+")
_STRUCTURE_HEADERS = frozenset((
    "content-type", "content-transfer-encoding", "mime-version", "content-disposition"))
# MAPI property types.
_FIXED_SIZES = {0x0001: 4, 0x0002: 4, 0x0003: 4, 0x0004: 4, 0x0005: 8, 0x0006: 8, 0x0007: 8,
                0x000A: 4, 0x000B: 4, 0x0014: 8, 0x0040: 8, 0x0048: 16}
_PT_STRING8, _PT_UNICODE, _PT_BINARY, _PT_OBJECT = 0x001E, 0x001F, 0x0102, 0x000D
_MULTI = 0x1000
_MAX_PROPERTIES = 100_000


class TnefError(ValueError):
    """Not a TNEF stream."""


@dataclass
class TnefAttachment:
    name: str | None = None
    data: bytes = b""
    mime_type: str | None = None
    embedded_message: bool = False


@dataclass
class Tnef:
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    rtf_compressed: bytes | None = None
    properties: dict[int, object] = field(default_factory=dict)
    attachments: list[TnefAttachment] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)


def is_tnef(data: bytes) -> bool:
    return len(data) >= 6 and struct.unpack_from("<I", data)[0] == SIGNATURE


def read_tnef(data: bytes) -> Tnef:
    if not is_tnef(data):
        raise TnefError("no TNEF signature")
    result = Tnef()
    position = 6
    current: TnefAttachment | None = None
    while position + 9 <= len(data):
        level = data[position]
        attribute, length = struct.unpack_from("<II", data, position + 1)
        start = position + 9
        end = start + length
        if end + 2 > len(data):
            result.defects.append("tnef-truncated")
            break
        value = data[start:end]
        position = end + 2  # the checksum is not verified: damaged data is still worth reading
        attribute_id = attribute & 0xFFFF
        if level == _LEVEL_ATTACHMENT:
            if attribute_id == _ATT_ATTACH_RENDDATA or current is None:
                current = TnefAttachment()
                result.attachments.append(current)
            _attachment_attribute(current, attribute_id, value, result.defects)
        else:
            _message_attribute(result, attribute_id, value)
    return result


def _message_attribute(result: Tnef, attribute_id: int, value: bytes) -> None:
    if attribute_id == _ATT_SUBJECT:
        result.subject = _cstring(value)
    elif attribute_id == _ATT_BODY:
        result.text = _cstring(value)
    elif attribute_id == _ATT_MAPI_PROPS:
        properties = read_properties(value, result.defects)
        result.properties = properties
        subject, body = properties.get(PR_SUBJECT), properties.get(PR_BODY)
        if isinstance(subject, str):
            result.subject = subject
        if isinstance(body, str):
            result.text = body
        html = properties.get(PR_BODY_HTML)
        if isinstance(html, bytes | str):
            result.html = html if isinstance(html, str) else html.decode("utf-8", "replace")
        rtf = properties.get(PR_RTF_COMPRESSED)
        if isinstance(rtf, bytes):
            result.rtf_compressed = rtf


def _attachment_attribute(attachment: TnefAttachment, attribute_id: int, value: bytes,
                          defects: list[str]) -> None:
    if attribute_id == _ATT_ATTACH_TITLE and attachment.name is None:
        attachment.name = _cstring(value)
    elif attribute_id == _ATT_ATTACH_DATA:
        attachment.data = value
    elif attribute_id == _ATT_ATTACHMENT:
        properties = read_properties(value, defects)
        for key in (PR_ATTACH_LONG_FILENAME, PR_DISPLAY_NAME, PR_ATTACH_FILENAME):
            name = properties.get(key)
            if isinstance(name, str) and name.strip():
                attachment.name = name
                break
        mime_type = properties.get(PR_ATTACH_MIME_TAG)
        if isinstance(mime_type, str):
            attachment.mime_type = mime_type
        data = properties.get(PR_ATTACH_DATA)
        if isinstance(data, bytes) and not attachment.data:
            attachment.data = data
        if properties.get(PR_ATTACH_METHOD) == ATTACH_EMBEDDED_MSG:
            attachment.embedded_message = True
            if isinstance(data, bytes) and len(data) > 16 and not is_tnef(data):
                attachment.data = data[16:]  # PT_OBJECT: an interface id, then the stream


def read_properties(data: bytes, defects: list[str]) -> dict[int, object]:
    """MAPI properties (id -> str, bytes or int) of an attMAPIProps / attAttachment value."""
    properties: dict[int, object] = {}
    try:
        (count,) = struct.unpack_from("<I", data)
        position = 4
        for _ in range(min(count, _MAX_PROPERTIES)):
            kind, prop_id = struct.unpack_from("<HH", data, position)
            position += 4
            if prop_id >= 0x8000:  # a named property: GUID, then an id or a name
                (name_kind,) = struct.unpack_from("<I", data, position + 16)
                position += 20
                if name_kind == 0:
                    position += 4
                else:
                    (name_length,) = struct.unpack_from("<I", data, position)
                    position += 4 + _padded(name_length)
            value, position = _property_value(data, position, kind)
            properties.setdefault(prop_id, value)
    except struct.error:
        defects.append("tnef-bad-properties")
    return properties


def _property_value(data: bytes, position: int, kind: int) -> tuple[object, int]:
    base = kind & ~_MULTI
    count = 1
    if kind & _MULTI or base in (_PT_STRING8, _PT_UNICODE, _PT_BINARY, _PT_OBJECT):
        (count,) = struct.unpack_from("<I", data, position)
        position += 4
    values: list[object] = []
    for _ in range(min(count, _MAX_PROPERTIES)):
        if base in (_PT_STRING8, _PT_UNICODE, _PT_BINARY, _PT_OBJECT):
            (length,) = struct.unpack_from("<I", data, position)
            raw = data[position + 4: position + 4 + length]
            if len(raw) != length:
                raise struct.error("property value past the end")
            position += 4 + _padded(length)
            if base == _PT_UNICODE:
                values.append(raw.decode("utf-16-le", "replace").rstrip("\x00"))
            elif base == _PT_STRING8:
                values.append(_cstring(raw))
            else:
                values.append(raw)
        elif base in _FIXED_SIZES:
            size = _FIXED_SIZES[base]
            if base in (0x0002, 0x0003, 0x000B, 0x000A):
                values.append(struct.unpack_from("<i", data, position)[0])
            else:
                values.append(data[position: position + size])
            position += size
        else:
            raise struct.error(f"unknown MAPI type {kind:#x}")
    return (values[0] if len(values) == 1 and not kind & _MULTI else values), position


def _padded(length: int) -> int:
    return length + (-length % 4)


def _cstring(value: bytes) -> str:
    return value.split(b"\x00", 1)[0].decode("cp1252", "replace")


def embedded_message_to_mime(tnef: Tnef) -> bytes:
    """An RFC 5322 message rebuilt from an embedded TNEF message (an attached Outlook item).

    Uses the transport headers Outlook kept when there are any, else the subject, sender,
    date and Message-ID properties; then the text or HTML body and the by-value attachments.
    """
    message = EmailMessage()
    props = tnef.properties
    transport = props.get(PR_TRANSPORT_MESSAGE_HEADERS)
    if isinstance(transport, str) and ":" in transport:
        for name, value in _header_fields(transport):
            _set_header(message, name, value)
    else:
        sender = next((v for k in (PR_SENDER_SMTP_ADDRESS, PR_SENT_REPRESENTING_SMTP,
                                   PR_SENDER_EMAIL) if isinstance(v := props.get(k), str)
                       and "@" in v and not v.startswith("/")), None)
        sender_name = props.get(PR_SENDER_NAME)
        if sender:
            _set_header(message, "From", formataddr((
                sender_name if isinstance(sender_name, str) else "",
                                                     sender)))
        _set_header(message, "Subject", tnef.subject or "")
        message_id = props.get(PR_INTERNET_MESSAGE_ID)
        if isinstance(message_id, str):
            _set_header(message, "Message-ID", message_id)
        sent = _filetime(props.get(PR_CLIENT_SUBMIT_TIME))
        if sent is not None:
            _set_header(message, "Date", format_datetime(sent))
    if tnef.text is not None:
        message.set_content(tnef.text)
    elif tnef.html is not None:
        message.set_content(tnef.html, subtype="html")
    elif tnef.rtf_compressed is not None:
        try:
            message.set_content(rtf_to_text(decompress_rtf(tnef.rtf_compressed)))
        except TnefError:
            message.set_content("")
    else:
        message.set_content("")
    for attachment in tnef.attachments:
        if not attachment.embedded_message:
            message.add_attachment(attachment.data, maintype="application",
                                   subtype="octet-stream",
                                   filename=_UNSAFE_HEADER_TEXT.sub(" ", attachment.name or
                                                                    "attachment"))
    return stable_bytes(message)


def _header_fields(text: str) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], f"{fields[-1][1]} {line.strip()}")
        elif ":" in line:
            name, _, value = line.partition(":")
            if name.strip() and " " not in name.strip():
                fields.append((name.strip(), value.strip()))
    return [(n, v) for n, v in fields if n.lower() not in _STRUCTURE_HEADERS]


def _set_header(message: EmailMessage, name: str, value: str) -> None:
    try:
        message[name] = _UNSAFE_HEADER_TEXT.sub(" ", value).strip()
    except Exception:  # a value the header policy refuses: keep the message without it
        return


def _filetime(raw: object) -> datetime | None:
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    (ticks,) = struct.unpack_from("<Q", raw)
    try:
        return datetime(1601, 1, 1, tzinfo=UTC) + timedelta(microseconds=ticks // 10)
    except OverflowError:
        return None


_RTF_PREBUFFER = (
    b"{\\rtf1\\ansi\\mac\\deff0\\deftab720{\\fonttbl;}{\\f0\\fnil \\froman \\fswiss "
    b"\\fmodern \\fscript \\fdecor MS Sans SerifSymbolArialTimes New RomanCourier"
    b"{\\colortbl\\red0\\green0\\blue0\r\n\\par \\pard\\plain\\f0\\fs20\\b\\i\\u\\tab\\tx")
_LZFU = 0x75465A4C
_MELA = 0x414C454D
_MAX_RTF = 64 * 1024 * 1024


def decompress_rtf(data: bytes) -> bytes:
    """The RTF of a PR_RTF_COMPRESSED value (MS-OXRTFCP: LZFu, or MELA = stored)."""
    if len(data) < 16:
        raise TnefError("compressed RTF shorter than its header")
    compressed_size, raw_size, kind, _ = struct.unpack_from("<IIII", data)
    body = data[16: 4 + compressed_size]
    if kind == _MELA:
        return body[:raw_size]
    if kind != _LZFU or raw_size > _MAX_RTF:
        raise TnefError("not LZFu-compressed RTF")
    window = bytearray(4096)
    window[: len(_RTF_PREBUFFER)] = _RTF_PREBUFFER
    write = len(_RTF_PREBUFFER)
    out = bytearray()
    position = 0
    while position < len(body) and len(out) < raw_size:
        control = body[position]
        position += 1
        for bit in range(8):
            if position >= len(body):
                break
            if not control >> bit & 1:
                out.append(body[position])
                window[write] = body[position]
                write = (write + 1) % 4096
                position += 1
                continue
            if position + 1 >= len(body):
                break
            token = body[position] << 8 | body[position + 1]
            position += 2
            offset, length = token >> 4, (token & 0xF) + 2
            if offset == write:
                return bytes(out[:raw_size])
            for step in range(length):
                byte = window[(offset + step) % 4096]
                out.append(byte)
                window[write] = byte
                write = (write + 1) % 4096
    return bytes(out[:raw_size])
