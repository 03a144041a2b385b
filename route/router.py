"""Routing: which users and queues receive a parsed email, and the evidence for each.

Takes a parsed document (see ``shared.schemas.ParsedSchema``) and a :class:`Directory`; gives
the list of deliveries (``DeliverySchema`` dicts).  Pure.  Fails with ``PermanentError``:
``unassigned-mailbox`` (a direct mailbox nobody owns), ``not-a-forward-mailbox`` (a wrapped
envelope from a mailbox not configured as a forward mailbox), ``untrusted-forwarder`` (the
envelope's sender is not a principal configured for this forward mailbox: a spoofing attempt
or a misconfiguration; no record is made).
"""

from __future__ import annotations

from typing import Any

from route.directory import Directory, Principal, normalise_address
from shared.errors import PermanentError


def route(parsed: dict[str, Any], directory: Directory) -> list[dict[str, Any]]:
    source = parsed["source"]
    mailbox = source["mailbox"]
    if source["mailbox_kind"] == "forward" or parsed["envelope"]["kind"] == "wrapped":
        return [_route_forwarded(parsed, directory, mailbox)]
    owners = directory.owners_of_mailbox(mailbox)
    if not owners:
        raise PermanentError("unassigned-mailbox",
                             f"no user or queue is configured with mailbox {mailbox!r}")
    return [_delivery(p, mailbox, "direct", {"decided_by": "receiving-mailbox",
                                             "mailbox": mailbox})
            for p in owners]


def _route_forwarded(parsed: dict[str, Any], directory: Directory,
                     mailbox: str) -> dict[str, Any]:
    if not directory.is_forward_mailbox(mailbox):
        raise PermanentError("not-a-forward-mailbox",
                             f"mailbox {mailbox!r} is not configured as a forward mailbox")
    forwarder = (parsed["envelope"].get("forwarder") or {}).get("address", "")
    principal = directory.forwarding_principal(mailbox, forwarder)
    if principal is None:
        raise PermanentError(
            "untrusted-forwarder",
            f"{forwarder or 'an envelope without a sender'} is not configured to forward "
            f"to mailbox {mailbox!r}")
    email = parsed["email"]
    inner = {normalise_address(a["address"]) for a in email.get("to", []) + email.get("cc", [])}
    inner |= {normalise_address(v) for v in email.get("headers", {}).get("delivered-to", [])}
    evidence = {
        "decided_by": "envelope-from",
        "mailbox": mailbox,
        "forwarder": forwarder,
        "inner_recipient_agrees": principal.address in inner,
        "outer_message_id": parsed["envelope"].get("outer_message_id"),
    }
    return _delivery(principal, mailbox, "forward", evidence)


def _delivery(principal: Principal, mailbox: str, method: str,
              evidence: dict[str, Any]) -> dict[str, Any]:
    return {
        "principal_kind": principal.kind,
        "principal": principal.name,
        "address": principal.address,
        "mailbox": mailbox,
        "method": method,
        "evidence": evidence,
    }
