"""Outlook ``.msg`` files (OLE2 compound documents) turned back into RFC 5322 messages.

Takes the bytes of a ``.msg``; gives the bytes of an equivalent MIME message: the original
transport headers when Outlook kept them (a received message), else headers rebuilt from the
MAPI properties (subject, sender, recipients, date, Message-ID), then the text and HTML
bodies and the attachments (an attached ``.msg`` becomes a ``message/rfc822`` part, to
``max_depth`` levels).  Reads the container with olefile (BSD-2-Clause); extract-msg, the
usual choice, is GPL-3.0 and so is not used.  Fails only with :class:`OutlookError` (not an
OLE file, or not a message inside), never with another exception.
"""

from __future__ import annotations

import re
import struct
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, formataddr

import olefile

from parse.headers import utf8_or_cp1252
from parse.rebuilt import stable_bytes

OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_RECIPIENT_TYPES = {1: "To", 2: "Cc"}
_DROPPED_TRANSPORT_HEADERS = frozenset((
    "content-type", "content-transfer-encoding", "mime-version", "content-disposition"))
_UNSAFE_HEADER_TEXT = re.compile(r"[\r\n\x00]+")
# MAPI property ids.
PR_SUBJECT = 0x0037
PR_CLIENT_SUBMIT_TIME = 0x0039
PR_SENT_REPRESENTING_NAME = 0x0042
PR_SENT_REPRESENTING_EMAIL = 0x0065
PR_TRANSPORT_MESSAGE_HEADERS = 0x007D
PR_RECIPIENT_TYPE = 0x0C15
PR_SENDER_NAME = 0x0C1A
PR_SENDER_EMAIL = 0x0C1F
PR_MESSAGE_DELIVERY_TIME = 0x0E06
PR_BODY = 0x1000
PR_BODY_HTML = 0x1013
PR_INTERNET_MESSAGE_ID = 0x1035
PR_IN_REPLY_TO = 0x1042
PR_DISPLAY_NAME = 0x3001
PR_EMAIL_ADDRESS = 0x3003
PR_ATTACH_DATA = 0x3701
PR_ATTACH_FILENAME = 0x3704
PR_ATTACH_LONG_FILENAME = 0x3707
PR_ATTACH_MIME_TAG = 0x370E
PR_SMTP_ADDRESS = 0x39FE
PR_SENDER_SMTP_ADDRESS = 0x5D01
PR_SENT_REPRESENTING_SMTP = 0x5D02


class OutlookError(ValueError):
    """Not an Outlook message."""


def is_outlook_message(data: bytes) -> bool:
    return data.startswith(OLE_MAGIC)


def msg_to_mime(data: bytes, max_depth: int = 5) -> bytes:
    """The MIME bytes of the Outlook message ``data``; OutlookError when it is not one."""
    if not is_outlook_message(data):
        raise OutlookError("not an OLE2 compound document")
    try:
        with olefile.OleFileIO(data) as ole:
            root = _Storage(ole, [])
            if not root.has_properties():
                raise OutlookError("no message properties (not a message, or damaged)")
            message = _build(root, max_depth)
        return stable_bytes(message)
    except OutlookError:
        raise
    except Exception as exc:  # olefile raises many kinds on damaged containers
        raise OutlookError(f"{type(exc).__name__}: {exc}"[:200]) from exc


class _Storage:
    """One storage of the compound file (the message, a recipient, an attachment)."""

    def __init__(self, ole: olefile.OleFileIO, path: list[str], header: int = 32) -> None:
        self.ole = ole
        self.path = path
        self.header = header
        self._streams: dict[int, tuple[int, list[str]]] = {}
        self.children: list[str] = []
        depth = len(path)
        for entry in ole.listdir(streams=True, storages=True):
            if entry[:depth] != path or len(entry) <= depth:
                continue
            name = entry[depth]
            if len(entry) == depth + 1 and name.startswith("__substg1.0_") and len(name) == 20:
                try:
                    prop_id, prop_type = int(name[12:16], 16), int(name[16:20], 16)
                except ValueError:
                    continue
                self._streams.setdefault(prop_id, (prop_type, [*path, name]))
            elif (name.startswith(("__recip_version1.0_", "__attach_version1.0_"))
                  and name not in self.children):
                self.children.append(name)
        self._fixed = self._fixed_properties()

    def has_properties(self) -> bool:
        return bool(self._streams)

    def text(self, prop_id: int) -> str | None:
        found = self._streams.get(prop_id)
        if found is None:
            return None
        prop_type, path = found
        raw = self.ole.openstream(path).read()
        if prop_type == 0x001F:
            return raw.decode("utf-16-le", "replace").rstrip("\x00")
        if prop_type == 0x001E:
            return utf8_or_cp1252(raw.rstrip(b"\x00"))
        if prop_type == 0x0102:
            return utf8_or_cp1252(raw)
        return None

    def binary(self, prop_id: int) -> bytes | None:
        found = self._streams.get(prop_id)
        if found is None or found[0] != 0x0102:
            return None
        return bytes(self.ole.openstream(found[1]).read())

    def storage_of(self, prop_id: int) -> list[str] | None:
        """The path of a property stored as a sub-storage (an embedded message)."""
        name = f"__substg1.0_{prop_id:04X}000D"
        path = [*self.path, name]
        return path if self.ole.exists("/".join(path)) else None

    def fixed(self, prop_id: int) -> bytes | None:
        return self._fixed.get(prop_id)

    def _fixed_properties(self) -> dict[int, bytes]:
        path = "/".join([*self.path, "__properties_version1.0"])
        if not self.ole.exists(path):
            return {}
        raw = self.ole.openstream(path).read()
        found: dict[int, bytes] = {}
        for offset in range(self.header, len(raw) - 15, 16):
            _, prop_id = struct.unpack_from("<HH", raw, offset)
            found.setdefault(prop_id, raw[offset + 8: offset + 16])
        return found

    def child(self, name: str) -> _Storage:
        return _Storage(self.ole, [*self.path, name], header=8)


def _build(storage: _Storage, depth_left: int) -> EmailMessage:
    message = EmailMessage()
    headers = storage.text(PR_TRANSPORT_MESSAGE_HEADERS)
    if headers and ":" in headers:
        _copy_transport_headers(message, headers)
    else:
        _rebuild_headers(message, storage)
    text = storage.text(PR_BODY)
    html_bytes = storage.binary(PR_BODY_HTML)
    html = utf8_or_cp1252(html_bytes) if html_bytes is not None else storage.text(PR_BODY_HTML)
    if text is not None:
        message.set_content(text)
        if html:
            message.add_alternative(html, subtype="html")
    elif html:
        message.set_content(html, subtype="html")
    else:
        message.set_content("")
    for name in storage.children:
        if name.startswith("__attach_version1.0_"):
            _attach(message, storage.child(name), depth_left)
    return message


def _copy_transport_headers(message: EmailMessage, headers: str) -> None:
    name = None
    value: list[str] = []
    for line in [*headers.splitlines(), ""]:
        if line[:1] in (" ", "\t") and name is not None:
            value.append(line.strip())
            continue
        if name is not None and name.lower() not in _DROPPED_TRANSPORT_HEADERS:
            _set_header(message, name, " ".join(value))
        name, value = None, []
        if ":" in line:
            head, _, rest = line.partition(":")
            if head and " " not in head.strip():
                name, value = head.strip(), [rest.strip()]


def _rebuild_headers(message: EmailMessage, storage: _Storage) -> None:
    sender = (storage.text(PR_SENDER_SMTP_ADDRESS) or storage.text(PR_SENT_REPRESENTING_SMTP)
              or _smtp_only(storage.text(PR_SENDER_EMAIL))
              or _smtp_only(storage.text(PR_SENT_REPRESENTING_EMAIL)))
    name = storage.text(PR_SENDER_NAME) or storage.text(PR_SENT_REPRESENTING_NAME) or ""
    if sender:
        _set_header(message, "From", formataddr((name, sender)))
    recipients: dict[str, list[str]] = {}
    for child in storage.children:
        if child.startswith("__recip_version1.0_"):
            recipient = storage.child(child)
            address = (recipient.text(PR_SMTP_ADDRESS)
                       or _smtp_only(recipient.text(PR_EMAIL_ADDRESS)))
            kind_raw = recipient.fixed(PR_RECIPIENT_TYPE)
            kind = struct.unpack_from("<i", kind_raw)[0] if kind_raw else 1
            if address and kind in _RECIPIENT_TYPES:
                display = recipient.text(PR_DISPLAY_NAME) or ""
                recipients.setdefault(_RECIPIENT_TYPES[kind], []).append(
                    formataddr((display if display != address else "", address)))
    for header, values in recipients.items():
        _set_header(message, header, ", ".join(values))
    _set_header(message, "Subject", storage.text(PR_SUBJECT) or "")
    sent = _filetime(storage.fixed(PR_CLIENT_SUBMIT_TIME) or storage.fixed(
        PR_MESSAGE_DELIVERY_TIME))
    if sent is not None:
        _set_header(message, "Date", format_datetime(sent))
    for prop_id, header in ((PR_INTERNET_MESSAGE_ID, "Message-ID"),
                            (PR_IN_REPLY_TO, "In-Reply-To")):
        value = storage.text(prop_id)
        if value:
            _set_header(message, header, value)


def _attach(message: EmailMessage, attachment: _Storage, depth_left: int) -> None:
    name = (attachment.text(PR_ATTACH_LONG_FILENAME) or attachment.text(PR_ATTACH_FILENAME)
            or attachment.text(PR_DISPLAY_NAME))
    embedded = attachment.storage_of(PR_ATTACH_DATA)
    if embedded is not None:
        if depth_left <= 0:
            return
        inner = _build(_Storage(attachment.ole, embedded, header=24), depth_left - 1)
        part = EmailMessage()
        part.set_content(inner)
        part["Content-Disposition"] = "attachment"
        if message.get_content_type() != "multipart/mixed":
            message.make_mixed()
        message.attach(part)
        return
    data = attachment.binary(PR_ATTACH_DATA) or b""
    mime = attachment.text(PR_ATTACH_MIME_TAG) or "application/octet-stream"
    maintype, _, subtype = mime.strip().lower().partition("/")
    if not maintype or not subtype or maintype in ("multipart", "message", "text"):
        maintype, subtype = "application", "octet-stream"
    message.add_attachment(data, maintype=maintype, subtype=subtype,
                           filename=_UNSAFE_HEADER_TEXT.sub(" ", name or "attachment"))


def _set_header(message: EmailMessage, name: str, value: str) -> None:
    value = _UNSAFE_HEADER_TEXT.sub(" ", value).strip()
    try:
        message[name] = value
    except Exception:  # a value the header policy refuses: keep the message without it
        return


def _smtp_only(address: str | None) -> str | None:
    """An address if it is an SMTP one (Exchange gives X.500 names like /O=ORG/OU=...)."""
    if address and "@" in address and not address.startswith("/"):
        return address
    return None


def _filetime(raw: bytes | None) -> datetime | None:
    if not raw or len(raw) < 8:
        return None
    (ticks,) = struct.unpack_from("<Q", raw)
    if not ticks:
        return None
    try:
        return datetime(1601, 1, 1, tzinfo=UTC) + timedelta(microseconds=ticks // 10)
    except OverflowError:
        return None

