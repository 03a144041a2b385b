"""Routing: which users and queues receive a parsed email, and the evidence for each.

Takes a parsed document (see ``shared.schemas.ParsedSchema``) and a :class:`Directory`; gives
the list of deliveries (``DeliverySchema`` dicts).  Pure.  Fails with ``PermanentError``:
``unassigned-mailbox`` (a direct mailbox nobody owns), and for a forward mailbox's mail
those of ``route.forwarding.forwarded_delivery`` (``not-a-forward-mailbox``, ``mail-loop``,
``untrusted-forwarder``: no record is made).
"""

from __future__ import annotations

from typing import Any

from route.directory import Directory, Principal
from route.forwarding import ForwardPolicy, forwarded_delivery
from shared.errors import PermanentError


def route(parsed: dict[str, Any], directory: Directory,
          forwarding: ForwardPolicy | None = None) -> list[dict[str, Any]]:
    source = parsed["source"]
    mailbox = source["mailbox"]
    if source["mailbox_kind"] == "forward" or parsed["envelope"]["kind"] != "direct":
        return [forwarded_delivery(parsed, directory, forwarding or ForwardPolicy())]
    owners = directory.owners_of_mailbox(mailbox)
    if not owners:
        raise PermanentError("unassigned-mailbox",
                             f"no user or queue is configured with mailbox {mailbox!r}")
    return [_delivery(p, mailbox, "direct", {"decided_by": "receiving-mailbox",
                                             "mailbox": mailbox})
            for p in owners]


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
