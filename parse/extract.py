"""From raw message bytes to the emails routing sees: a pure function, no I/O.

Takes the raw bytes of one fetched message, the kind of mailbox it came from (``direct`` or
``forward``) and the limits; gives a :class:`ParseResult`: the envelope (how the mail reached
the mailbox) and the emails in it, each a dict shaped like ``shared.schemas.EmailSchema``
(addresses under the key ``from_``, the schema's attribute name).  A direct mailbox gives one
email, the message itself; a forward mailbox gives one email per message attached to the
envelope (``message/rfc822`` / ``message/global`` parts of the envelope's own MIME tree, or an
``.eml`` attached as ``application/octet-stream``).  ``ParseResult.items()`` pairs each email
with its envelope (``index`` set per email).

Fails only with :class:`~shared.errors.PermanentError`: ``message-too-large``,
``header-too-large``, ``too-many-parts``, ``nesting-too-deep`` (checked before parsing),
``invalid-forward-mail-item`` (a forward mailbox's message holding no original), or
``unparseable`` (any other failure of the parser).  Damage short of that (broken base64,
unknown charsets, ambiguous addresses) is repaired or dropped and listed in ``defects``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC
from email import policy
from email.message import Message
from email.parser import BytesParser
from typing import Any

from parse.headers import (
    add_defect,
    decode_words,
    parse_addresses,
    parse_date,
    parse_message_id,
    parse_references,
    raw_text,
    scrub,
    unfold,
)
from parse.limits import check_limits
from parse.mime import (
    INNER_MESSAGE_TYPES,
    collect,
    disposition_of,
    leaves,
    message_part_bytes,
    payload_bytes,
    raw_filename,
    serialise,
)
from shared.errors import PermanentError
from shared.settings import LimitSettings

# Raw header values handed on to routing (loop and forward detection), lower-case names.
KEPT_HEADERS = (
    "auto-submitted", "delivered-to", "x-original-to", "x-forwarded-to", "resent-from",
    "resent-to", "precedence", "x-mailroute-loop", "list-id", "thread-index",
)
_ADDRESS_HEADERS = {"from": "from_", "to": "to", "cc": "cc", "reply-to": "reply_to"}
_USED_HEADERS = frozenset(
    (*KEPT_HEADERS, *_ADDRESS_HEADERS, "subject", "date", "message-id", "in-reply-to",
     "references"))
_MESSAGE_HEADERS = re.compile(
    rb"^(?:from|date|message-id)[ \t]*:", re.IGNORECASE | re.MULTILINE)
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")


@dataclass(frozen=True)
class ParseResult:
    """The envelope (``index`` 0, ``count`` = number of emails) and the emails it carried."""

    envelope: dict[str, Any]
    emails: list[dict[str, Any]]

    def items(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(envelope with this email's ``index``, email) for each email, in order."""
        return [({**self.envelope, "index": index}, email)
                for index, email in enumerate(self.emails)]


def parse_raw(raw: bytes, mailbox_kind: str, limits: LimitSettings) -> ParseResult:
    """Parse one fetched message; see the module docstring for what it gives and raises."""
    if mailbox_kind not in ("direct", "forward"):
        raise PermanentError("bad-mailbox-kind", repr(mailbox_kind)[:60])
    check_limits(raw, limits)
    try:
        message = _parse_bytes(raw)
        if mailbox_kind == "direct":
            return ParseResult(_direct_envelope(), [build_email(message, len(raw), limits)])
        return _unwrap_forward(message, limits)
    except PermanentError:
        raise
    except MemoryError:
        raise
    except RecursionError:
        raise PermanentError("unparseable", "recursion limit reached") from None
    except Exception as exc:  # every parser failure is a named outcome
        raise PermanentError("unparseable", f"{type(exc).__name__}: {exc}"[:300]) from exc


def _direct_envelope() -> dict[str, Any]:
    return {"kind": "direct", "forwarder": None, "outer_message_id": None,
            "outer_subject": None, "index": 0, "count": 1, "defects": []}


class _StructureUnfoldingCompat32(policy.Compat32):
    """compat32, except that the headers the parser splits parts by are unfolded.

    compat32 keeps a folded ``boundary="simple\r\n boundary"`` as it is, so the parser looks
    for the wrong delimiter and loses every part (RFC 5322 unfolding removes the line break).
    """

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        name, value = super().header_source_parse(sourcelines)
        if name.lower() in _STRUCTURE_HEADERS:
            value = _FOLDING.sub("", value)
        return name, value


_STRUCTURE_HEADERS = frozenset(("content-type", "content-transfer-encoding"))
_FOLDING = re.compile(r"\r?\n(?=[ \t])")
_PARSE_POLICY = _StructureUnfoldingCompat32()


def _parse_bytes(raw: bytes) -> Message:
    # compat32 keeps header values as raw strings: the structure costs little, and only the
    # headers used are decoded (PERFORMANCE.md: policy.default spends 87% on headers).
    return BytesParser(policy=_PARSE_POLICY).parsebytes(raw)


def _used_headers(message: Message, limits: LimitSettings) -> tuple[dict[str, list[str]], int]:
    """Raw values of the headers we use, and the number of Received headers."""
    used: dict[str, list[str]] = {}
    received = 0
    total = 0
    for name, value in message.raw_items():
        key = name.lower()
        total += len(name) + len(value)
        if key == "received":
            received += 1
        elif key in _USED_HEADERS:
            used.setdefault(key, []).append(value)
    if total > limits.max_header_bytes:
        raise PermanentError("header-too-large", f"{total} bytes > {limits.max_header_bytes}")
    return used, received


def build_email(message: Message, size: int, limits: LimitSettings) -> dict[str, Any]:
    """The EmailSchema-shaped dict of one parsed message of ``size`` bytes."""
    defects: list[str] = []
    used, received = _used_headers(message, limits)
    subject_values = used.get("subject")
    email: dict[str, Any] = {
        "message_id": parse_message_id(used.get("message-id", [])),
        "subject": decode_words(subject_values[0], defects) if subject_values else "",
        "date": parse_date(used.get("date", []), defects),
    }
    for header, key in _ADDRESS_HEADERS.items():
        email[key] = parse_addresses(header, used.get(header, []), defects)
    email["in_reply_to"] = parse_message_id(used.get("in-reply-to", []))
    email["references"] = parse_references(used.get("references", []))
    headers = {name: [scrub(raw_text(unfold(value))) for value in used[name]]
               for name in KEPT_HEADERS if name in used}
    headers["received-count"] = [str(received)]
    email["headers"] = headers
    content = collect(message, limits.max_depth, defects)
    email["text"] = content.text
    email["html"] = content.html
    email["attachments"] = content.attachments
    email["defects"] = defects
    email["size"] = size
    email["fingerprint"] = fingerprint(email)
    email["dedup_key"] = (f"mid:{email['message_id']}" if email["message_id"]
                          else f"fp:{email['fingerprint']}")
    return email


def fingerprint(email: dict[str, Any]) -> str:
    """sha256 of what identifies a message without a Message-ID, whitespace-normalised."""
    date = email["date"]
    body = email["text"] if email["text"] is not None else (email["html"] or "")
    fields = [
        ",".join(item["address"].lower() for item in email["from_"]),
        ",".join(item["address"].lower() for item in email["to"]),
        ",".join(item["address"].lower() for item in email["cc"]),
        date.astimezone(UTC).isoformat() if date else "",
        " ".join(email["subject"].split()),
        " ".join(body.split()),
    ]
    return hashlib.sha256("\n".join(fields).encode("utf-8", "replace")).hexdigest()


def _unwrap_forward(outer: Message, limits: LimitSettings) -> ParseResult:
    envelope_defects: list[str] = []
    used, _ = _used_headers(outer, limits)
    senders = parse_addresses("from", used.get("from", []), envelope_defects)
    subject_values = used.get("subject")
    emails: list[dict[str, Any]] = []
    for leaf in leaves(outer, limits.max_depth, envelope_defects):
        inner = _inner_message(leaf.part, leaf.content_type, leaf.depth, limits,
                               envelope_defects)
        if inner is not None:
            message, size = inner
            emails.append(build_email(message, size, limits))
    if not emails:
        raise PermanentError("invalid-forward-mail-item",
                             "no message attached to the forward envelope")
    envelope = {
        "kind": "wrapped",
        "forwarder": senders[0] if senders else None,
        "outer_message_id": parse_message_id(used.get("message-id", [])),
        "outer_subject": decode_words(subject_values[0], envelope_defects)
        if subject_values else None,
        "index": 0,
        "count": len(emails),
        "defects": envelope_defects,
    }
    if not senders:
        add_defect(envelope_defects, "no-forwarder")
    return ParseResult(envelope, emails)


def _inner_message(part: Message, content_type: str, depth: int, limits: LimitSettings,
                   defects: list[str]) -> tuple[Message, int] | None:
    """The original carried by one leaf of a forward envelope, with its size; or None."""
    if content_type in INNER_MESSAGE_TYPES:
        payload = part.get_payload()
        encoding = unfold(str(part.get("content-transfer-encoding", ""))).lower()
        if (isinstance(payload, list) and len(payload) == 1 and isinstance(payload[0], Message)
                and encoding not in ("base64", "quoted-printable")):
            return payload[0], len(serialise(payload[0]))
        data = message_part_bytes(part, defects)
    elif content_type.startswith(("multipart/", "message/")):
        return None
    else:
        name = raw_filename(part, defects)
        named_eml = name is not None and name.strip().lower().endswith(".eml")
        if not named_eml and (content_type != "application/octet-stream"
                              or disposition_of(part) == "inline"):
            return None
        data = payload_bytes(part, defects)
        if not _looks_like_message(data):
            if named_eml:
                add_defect(defects, "eml-attachment-not-a-message")
            return None
    check_limits(data, limits, base_depth=depth)
    return _parse_bytes(data), len(data)


def _looks_like_message(data: bytes) -> bool:
    """Does ``data`` start with a header block holding From, Date or Message-ID?"""
    head = data[:65536].lstrip()
    if not _HEADER_LINE.match(head):
        return False
    end = re.search(rb"\r?\n\r?\n", head)
    block = head[: end.start()] if end else head
    return len(_MESSAGE_HEADERS.findall(block)) >= 2
