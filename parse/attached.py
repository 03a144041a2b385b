"""The original messages one part of a forward envelope carries, in every form clients use.

Takes one leaf part of an envelope (see :func:`parse.mime.leaves`); gives the raw bytes of
each message it carries: a ``message/rfc822`` / ``message/global`` part, an ``.eml`` (or
anything that starts like a message) attached as ``application/octet-stream``, an Outlook
``.msg`` (converted by :mod:`parse.outlook`), or the ``.eml``/``.msg`` files and embedded
messages inside a TNEF ``winmail.dat`` (:mod:`parse.tnef`).  Anything else gives nothing.
Never raises: an attachment that should be a message but cannot be read adds a defect
(``msg-unreadable``, ``tnef-unreadable``, ``eml-attachment-not-a-message``).
"""

from __future__ import annotations

import re
from email.message import Message

from parse.headers import add_defect, unfold
from parse.mime import (
    INNER_MESSAGE_TYPES,
    TNEF_TYPES,
    disposition_of,
    message_part_bytes,
    payload_bytes,
    raw_filename,
    serialise,
)
from parse.outlook import OutlookError, is_outlook_message, msg_to_mime
from parse.structure import CarriedMessage
from parse.tnef import TnefError, embedded_message_to_mime, is_tnef, read_tnef

OUTLOOK_TYPES = ("application/vnd.ms-outlook", "application/x-msg")
_MESSAGE_HEADERS = re.compile(rb"^(?:from|date|message-id)[ \t]*:", re.IGNORECASE | re.MULTILINE)
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")


def attached_messages(part: Message, content_type: str, max_depth: int,
                      defects: list[str]) -> list[bytes]:
    """The raw bytes of every message ``part`` carries (empty when it carries none)."""
    if content_type in INNER_MESSAGE_TYPES:
        carried = carried_message(part, content_type)
        if carried is not None:
            # the original's bytes as carried: no re-serialising, line breaks as sent
            return [carried.source]
        payload = part.get_payload()
        encoding = unfold(str(part.get("content-transfer-encoding", ""))).lower()
        if (isinstance(payload, list) and len(payload) == 1 and isinstance(payload[0], Message)
                and encoding not in ("base64", "quoted-printable")):
            return [serialise(payload[0])]
        return [message_part_bytes(part, defects)]
    if content_type.startswith(("multipart/", "message/")):
        return []
    name = (raw_filename(part, defects) or "").strip().lower()
    if content_type in TNEF_TYPES or name == "winmail.dat":
        return _from_tnef(payload_bytes(part, defects), max_depth, defects)
    if content_type in OUTLOOK_TYPES or name.endswith(".msg"):
        return _from_msg(payload_bytes(part, defects), max_depth, defects)
    named_eml = name.endswith(".eml")
    if not named_eml and (content_type != "application/octet-stream"
                          or disposition_of(part) == "inline"):
        return []
    data = payload_bytes(part, defects)
    if is_outlook_message(data):
        return _from_msg(data, max_depth, defects)
    if looks_like_message(data, named=named_eml):
        return [data]
    if named_eml:
        add_defect(defects, "eml-attachment-not-a-message")
    return []


def carried_message(part: Message, content_type: str) -> CarriedMessage | None:
    """The message a message/rfc822 part carries as it is, when the fast parser read it.

    Its ``source`` is the original's text as carried; None for a transfer-encoded part or a
    part the feedparser read (the caller then works from bytes).
    """
    if content_type not in INNER_MESSAGE_TYPES:
        return None
    payload = part.get_payload()
    if not (isinstance(payload, list) and len(payload) == 1
            and isinstance(payload[0], CarriedMessage)):
        return None
    encoding = unfold(str(part.get("content-transfer-encoding", ""))).lower()
    return None if encoding in ("base64", "quoted-printable") else payload[0]


def _from_msg(data: bytes, max_depth: int, defects: list[str]) -> list[bytes]:
    if not is_outlook_message(data):
        # mbox tools name plain MIME files .msg too
        return [data] if looks_like_message(data, named=True) else []
    try:
        return [msg_to_mime(data, max_depth)]
    except OutlookError:
        add_defect(defects, "msg-unreadable")
        return []


def _from_tnef(data: bytes, max_depth: int, defects: list[str]) -> list[bytes]:
    if not is_tnef(data):
        add_defect(defects, "tnef-unreadable")
        return []
    try:
        tnef = read_tnef(data)
    except TnefError:
        add_defect(defects, "tnef-unreadable")
        return []
    for defect in tnef.defects:
        add_defect(defects, defect)
    found: list[bytes] = []
    for attachment in tnef.attachments:
        name = (attachment.name or "").strip().lower()
        if attachment.embedded_message and is_tnef(attachment.data):
            try:
                found.append(embedded_message_to_mime(read_tnef(attachment.data)))
            except Exception:  # a damaged embedded item: keep the others
                add_defect(defects, "tnef-unreadable")
        elif is_outlook_message(attachment.data):
            found.extend(_from_msg(attachment.data, max_depth, defects))
        elif name.endswith(".eml") and looks_like_message(attachment.data, named=True):
            found.append(attachment.data)
    return found


def looks_like_message(data: bytes, named: bool = False) -> bool:
    """Does ``data`` start with a header block holding two of From, Date and Message-ID?

    One is enough for a file whose name (``.eml``, ``.msg``) already says it is a message.
    """
    head = data[:65536].lstrip()
    if not _HEADER_LINE.match(head):
        return False
    end = re.search(rb"\r?\n\r?\n", head)
    block = head[: end.start()] if end else head
    return len(_MESSAGE_HEADERS.findall(block)) >= (1 if named else 2)
