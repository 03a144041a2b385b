"""From raw message bytes to the emails routing sees: a pure function, no I/O.

Takes the raw bytes of one fetched message, the kind of mailbox it came from (``direct`` or
``forward``) and the limits; gives a :class:`ParseResult`: the envelope (how the mail reached
the mailbox) and the emails in it, each a dict shaped like ``shared.schemas.EmailSchema``
(addresses under the key ``from_``, the schema's attribute name).  A direct mailbox gives one
email, the message itself; a forward mailbox gives either one email per original attached
to the envelope (kind ``wrapped``: see :mod:`parse.attached` for the forms; envelopes inside
it opened to ``limits.forward_depth`` levels) or, for a redirected message (``Resent-*``,
``X-Sieve-Redirected-From``, ...; see :mod:`parse.envelope`), the message itself (kind
``redirected``).  Every envelope carries the raw headers routing needs to decide whose mail
it was.  ``ParseResult.items()`` pairs each email with its envelope (``index`` per email).

Fails only with :class:`~shared.errors.PermanentError`: ``message-too-large``,
``header-too-large``, ``too-many-parts``, ``nesting-too-deep`` (checked before parsing),
``parse-time-exceeded`` (``limits.parse_seconds``, checked between parts),
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
from email.feedparser import BytesFeedParser
from email.message import Message
from typing import Any

from parse.attached import attached_messages, carried_message
from parse.envelope import STRONG_REDIRECT_HEADERS, envelope_headers, redirect_evidence
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
from parse.limits import Budget, check_limits
from parse.mime import INNER_MESSAGE_TYPES, collect, disposition_of, leaves
from parse.structure import parse_structure
from shared.errors import PermanentError
from shared.settings import LimitSettings

# Raw header values handed on to routing (loop and forward detection, mailroute's canaries),
# lower-case names.
KEPT_HEADERS = (
    "auto-submitted", "delivered-to", "x-original-to", "x-forwarded-to", "resent-from",
    "resent-to", "precedence", "x-mailroute-loop", "list-id", "thread-index",
    "x-sieve-redirected-from", "resent-sender", "x-mailroute-canary",
)
_ADDRESS_HEADERS = {"from": "from_", "to": "to", "cc": "cc", "reply-to": "reply_to"}
_USED_HEADERS = frozenset(
    (*KEPT_HEADERS, *_ADDRESS_HEADERS, "subject", "date", "message-id", "in-reply-to",
     "references"))


@dataclass(frozen=True)
class ParseResult:
    """The envelope (``index`` 0, ``count`` = number of emails) and the emails it carried.

    ``chains`` holds, per email, the senders of the envelopes found inside the outer one
    (nested forwards, outermost first; empty when there were none).
    """

    envelope: dict[str, Any]
    emails: list[dict[str, Any]]
    chains: list[list[dict[str, str]]] | None = None

    def items(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(envelope with this email's ``index`` and ``chain``, email) for each email."""
        chains = self.chains or [[] for _ in self.emails]
        return [({**self.envelope, "index": index, "chain": chains[index]}, email)
                for index, email in enumerate(self.emails)]


def parse_raw(raw: bytes, mailbox_kind: str, limits: LimitSettings,
              budget: Budget | None = None) -> ParseResult:
    """Parse one fetched message; see the module docstring for what it gives and raises."""
    if mailbox_kind not in ("direct", "forward"):
        raise PermanentError("bad-mailbox-kind", repr(mailbox_kind)[:60])
    budget = budget or Budget(limits.parse_seconds)
    check_limits(raw, limits)
    try:
        message = _parse_bytes(raw)
        if mailbox_kind == "direct":
            return ParseResult(_direct_envelope(),
                               [build_email(message, len(raw), limits, budget)])
        return _open_forward(message, len(raw), limits, budget)
    except PermanentError:
        raise
    except MemoryError:
        raise
    except RecursionError:
        raise PermanentError("unparseable", "recursion limit reached") from None
    except Exception as exc:  # every parser failure is a named outcome
        raise PermanentError("unparseable", f"{type(exc).__name__}: {exc}"[:300]) from exc


def _direct_envelope() -> dict[str, Any]:
    return {"kind": "direct", "forwarder": None, "forwarder_header": None,
            "outer_message_id": None, "outer_subject": None, "index": 0, "count": 1,
            "headers": {}, "chain": [], "defects": []}


class _StructureUnfoldingCompat32(policy.Compat32):
    """compat32, except that Content-Transfer-Encoding is unfolded, and Content-Type when a
    line break falls inside a quoted string.

    compat32 keeps a folded ``boundary="simple\r\n boundary"`` as it is, so the parser looks
    for the wrong delimiter and loses every part (RFC 5322 unfolding removes the line break).
    A fold between parameters is harmless and kept, so an attached message is serialised
    with its headers as they were sent.
    """

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        name, value = super().header_source_parse(sourcelines)
        key = name.lower()
        if key == "content-transfer-encoding" or (key == "content-type"
                                                  and _FOLD_IN_QUOTES.search(value)):
            value = _FOLDING.sub("", value)
        return name, value


_FOLDING = re.compile(r"\r?\n(?=[ \t])")
# A fold after an odd number of quotes: inside a quoted string.
_FOLD_IN_QUOTES = re.compile(r'^(?:[^"]*"[^"]*")*[^"]*"[^"]*?\r?\n[ \t]')
_PARSE_POLICY = _StructureUnfoldingCompat32()
_FEED_BYTES = 256 * 1024


def _parse_bytes(raw: bytes) -> Message:
    # compat32 keeps header values as raw strings: the structure costs little, and only the
    # headers used are decoded (PERFORMANCE.md: policy.default spends 87% on headers).
    # Well-formed messages are split by regular expressions (the same tree, several times
    # cheaper); the feedparser takes the rest and records their defects.
    message = parse_structure(raw, _PARSE_POLICY)
    if message is not None:
        return message
    # Fed in slices, as BytesParser would be given a file: the whole message as one str, and
    # that str split into lines at once, cost several times its size (issue 8).  The
    # feedparser keeps a line cut between two slices (even inside a CRLF) for the next one.
    parser = BytesFeedParser(policy=_PARSE_POLICY)
    view = memoryview(raw)
    for offset in range(0, len(raw), _FEED_BYTES):
        parser.feed(bytes(view[offset:offset + _FEED_BYTES]))
    return parser.close()


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


def build_email(message: Message, size: int, limits: LimitSettings,
                budget: Budget | None = None) -> dict[str, Any]:
    """The EmailSchema-shaped dict of one parsed message of ``size`` bytes."""
    if budget is not None:
        budget.check()
    defects: list[str] = []
    used, received = _used_headers(message, limits)
    subject_values = used.get("subject")
    email: dict[str, Any] = {
        "message_id": parse_message_id(used.get("message-id", [])),
        "subject": (decode_words(subject_values[0], defects, keep_end=True)
                    if subject_values else ""),
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
    content = collect(message, limits.max_depth, defects, budget)
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


def _open_forward(outer: Message, size: int, limits: LimitSettings,
                  budget: Budget) -> ParseResult:
    """The envelope of a forward mailbox's message, and the originals it carries."""
    defects: list[str] = []
    headers = envelope_headers(outer)
    used, _ = _used_headers(outer, limits)
    senders = parse_addresses("from", used.get("from", []), defects)
    subject_values = used.get("subject")
    envelope: dict[str, Any] = {
        "kind": "wrapped",
        "forwarder": senders[0] if senders else None,
        "forwarder_header": "from",
        "outer_message_id": parse_message_id(used.get("message-id", [])),
        "outer_subject": (decode_words(subject_values[0], defects, keep_end=True)
                          if subject_values else None),
        "index": 0,
        "headers": headers,
        "defects": defects,
    }
    redirect = redirect_evidence(headers)
    originals: list[_Original] = []
    if redirect is None or redirect[0] not in STRONG_REDIRECT_HEADERS:
        originals = _originals(outer, limits, budget, defects, level=1)
    if originals:
        emails = [build_email(message or _parse_bytes(bytes(data)), len(data), limits, budget)
                  for data, _, message in originals]
        chains = [chain for _, chain, _ in originals]
        if not senders:
            add_defect(defects, "no-forwarder")
    elif redirect is not None:
        header, address = redirect
        envelope.update(kind="redirected", forwarder_header=header,
                        forwarder={"name": "", "address": address})
        emails = [build_email(outer, size, limits, budget)]
        chains = [[]]
    else:
        raise PermanentError("invalid-forward-mail-item",
                             "no message attached to the forward envelope and no sign of a "
                             "redirect")
    envelope["count"] = len(emails)
    return ParseResult(envelope, emails, chains)


# An original's raw bytes (a view into the envelope when the message is given), the chain of
# inner forwarders, and the message already parsed from those bytes (None: parse them).
_Original = tuple[bytes | memoryview, list[dict[str, str]], Message | None]


def _originals(message: Message, limits: LimitSettings, budget: Budget, defects: list[str],
               level: int) -> list[_Original]:
    """Each original in ``message`` (see :data:`_Original`).

    An original that is itself a forward envelope (a note and attached messages only, from a
    clear sender) is opened in turn while ``level`` < ``limits.forward_depth``.  An original
    the fast structure parser already read inside the envelope is not parsed again.
    """
    found: list[_Original] = []
    for leaf in leaves(message, limits.max_depth, defects, budget):
        carried = carried_message(leaf.part, leaf.content_type)
        # an original the fast parser read is looked at where it lies, not copied out
        carried_data: list[bytes | memoryview] = [carried.source_view] if carried else []
        for data in carried_data or attached_messages(leaf.part, leaf.content_type,
                                                      limits.max_depth, defects):
            budget.check()
            check_limits(data, limits, base_depth=leaf.depth)
            if level < limits.forward_depth:
                inner = carried or _parse_bytes(bytes(data))
                forwarder = _envelope_sender(inner, limits, budget)
                if forwarder is not None:
                    nested = _originals(inner, limits, budget, defects, level + 1)
                    if nested:
                        add_defect(defects, "nested-forward-unwrapped")
                        found.extend((raw, [forwarder, *chain], parsed)
                                     for raw, chain, parsed in nested)
                        continue
            found.append((data, [], carried))
    return found


def _envelope_sender(message: Message, limits: LimitSettings,
                     budget: Budget) -> dict[str, str] | None:
    """The sender of ``message`` if it is shaped like a forward envelope, else None."""
    scratch: list[str] = []
    parts = leaves(message, limits.max_depth, scratch, budget)
    bodies = [leaf for leaf in parts if leaf.content_type in ("text/plain", "text/html")
              and disposition_of(leaf.part) != "attachment"]
    carried = [leaf for leaf in parts if leaf.content_type in INNER_MESSAGE_TYPES]
    if not carried or len(bodies) + len(carried) != len(parts):
        return None
    used, _ = _used_headers(message, limits)
    senders = parse_addresses("from", used.get("from", []), scratch)
    return senders[0] if len(senders) == 1 else None
