"""The outer headers that say how a message reached a forward mailbox, and who redirected it.

Takes a parsed message (``compat32``); :func:`envelope_headers` gives the raw values (unfolded,
decoded to safe text, in header order: topmost first) of the headers routing uses to decide
and check whose mail it was, plus ``received-count``; :func:`redirect_evidence` gives the
(header, address) that names the user who *redirected* (resent) the message, or None.
Pure, never raises.

Redirect headers, strongest first: ``Resent-From``/``Resent-Sender`` (RFC 5322 section 3.6.6,
written by the resending client or rule), ``X-Sieve-Redirected-From`` (Pigeonhole's redirect),
``X-Forwarded-For`` (Gmail's auto-forward: "user forward-address"), then a chain of
``Delivered-To`` headers (delivered to the user's mailbox first: the second from the top),
and ``X-Original-To`` naming someone other than the final recipient (an alias).
"""

from __future__ import annotations

from email.message import Message

from parse.headers import parse_addresses, raw_text, scrub, unfold

ENVELOPE_HEADERS = (
    "from", "sender", "resent-from", "resent-sender", "x-sieve-redirected-from",
    "x-forwarded-for", "x-forwarded-to", "delivered-to", "x-original-to", "auto-submitted",
    "x-mailroute-loop", "authentication-results", "arc-authentication-results",
)
STRONG_REDIRECT_HEADERS = ("resent-from", "resent-sender", "x-sieve-redirected-from")
_MAX_VALUES = 50
_MAX_VALUE_LENGTH = 2000


def envelope_headers(message: Message) -> dict[str, list[str]]:
    """Values of :data:`ENVELOPE_HEADERS` (at most 50 each, 2000 characters), topmost first."""
    found: dict[str, list[str]] = {}
    received = 0
    for name, value in message.raw_items():
        key = name.lower()
        if key == "received":
            received += 1
        elif key in ENVELOPE_HEADERS:
            values = found.setdefault(key, [])
            if len(values) < _MAX_VALUES:
                values.append(scrub(raw_text(unfold(value)))[:_MAX_VALUE_LENGTH])
    found["received-count"] = [str(received)]
    return found


def first_address(header: str, values: list[str]) -> str | None:
    """The first clear address of a header's first value (ambiguous ones are skipped)."""
    if header == "x-forwarded-for":
        values = [value.split()[0] for value in values[:1] if value.split()]
    for value in values[:1]:
        found = parse_addresses(header, [value], [])
        if found:
            return found[0]["address"]
    return None


def redirect_evidence(headers: dict[str, list[str]]) -> tuple[str, str] | None:
    """(header, address of the redirecting user), strongest header first, or None."""
    for header in (*STRONG_REDIRECT_HEADERS, "x-forwarded-for"):
        address = first_address(header, headers.get(header, []))
        if address is not None:
            return header, address
    delivered = [a for a in (first_address("delivered-to", [v])
                             for v in headers.get("delivered-to", [])) if a]
    distinct = list(dict.fromkeys(address.lower() for address in delivered))
    if len(distinct) >= 2:
        return "delivered-to", distinct[1]
    original = first_address("x-original-to", headers.get("x-original-to", []))
    if original is not None and distinct and original.lower() != distinct[0]:
        return "x-original-to", original.lower()
    return None
