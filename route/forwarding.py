"""Whose mail a forward mailbox's message was, checked, with the evidence kept.

Takes a parsed document from a forward mailbox (envelope kind ``wrapped`` or ``redirected``,
see ``parse.extract``), the :class:`~route.directory.Directory` and the
:class:`ForwardPolicy` built from the settings; :func:`forwarded_delivery` gives the one
delivery (``DeliverySchema`` dict) for the user or queue whose mailbox forwarded it, with an
``evidence`` dict: which header decided, which inner headers agreed or disagreed, and the
proof from a trusted ``Authentication-Results`` header when one is configured.  Pure.

Fails with ``PermanentError``: ``not-a-forward-mailbox``; ``mail-loop`` (mailroute's own
``X-Mailroute-Loop`` marker, an inner ``Auto-Submitted`` other than ``no`` (RFC 3834), or
more than 25 ``Received:`` headers); ``untrusted-forwarder`` (no forwarder, one that is not a
user or queue configured for this forward mailbox, or, when the mailbox requires proof, no
aligned DKIM/SPF pass or ARC pass from its authserv-id).  Nothing is recorded for these.

Only ``Authentication-Results`` (and ``ARC-Authentication-Results``) headers whose authserv-id
is the one configured count; the receiving server must remove any such header arriving from
outside (RFC 8601 section 5), so a forged one carrying another id is simply ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from route.directory import Directory, normalise_address
from shared.errors import PermanentError
from shared.settings import Settings

LOOP_MARKER = "x-mailroute-loop"
MAX_RECEIVED = 25
_COMMENT = re.compile(r"\([^()]*\)")
_PROPERTY = re.compile(r"""([A-Za-z0-9_./-]+)\s*=\s*("[^"]*"|[^\s;]+)""")
_ARC_INSTANCE = re.compile(r"^\s*i\s*=\s*\d+\s*;", re.IGNORECASE)
_MAX_COMMENT_PASSES = 8


@dataclass(frozen=True)
class MailboxTrust:
    """What one forward mailbox trusts."""

    own_addresses: frozenset[str] = frozenset()
    authserv_id: str | None = None
    require_proof: bool = False


class ForwardPolicy:
    """The trust settings of every forward mailbox, by mailbox name."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._trust: dict[str, MailboxTrust] = {}
        for box in settings.mailboxes if settings else ():
            if box.forward:
                own = {normalise_address(a) for a in (box.address, box.username) if a}
                self._trust[box.name] = MailboxTrust(
                    frozenset(a for a in own if a), box.authserv_id, box.require_proof)

    def trust(self, mailbox: str) -> MailboxTrust:
        return self._trust.get(mailbox, MailboxTrust())


def forwarded_delivery(parsed: dict[str, Any], directory: Directory,
                       policy: ForwardPolicy) -> dict[str, Any]:
    """The delivery for the principal that forwarded ``parsed``; see the module docstring."""
    mailbox = parsed["source"]["mailbox"]
    if not directory.is_forward_mailbox(mailbox):
        raise PermanentError("not-a-forward-mailbox",
                             f"mailbox {mailbox!r} is not configured as a forward mailbox")
    envelope, email = parsed["envelope"], parsed["email"]
    outer = envelope.get("headers") or {}
    inner = email.get("headers") or {}
    loop = loop_reason(outer, inner)
    if loop is not None:
        raise PermanentError("mail-loop", loop)
    trust = policy.trust(mailbox)
    forwarder = normalise_address((envelope.get("forwarder") or {}).get("address", ""))
    principal = None
    if forwarder and forwarder not in trust.own_addresses:
        principal = directory.forwarding_principal(mailbox, forwarder)
    if principal is None:
        raise PermanentError(
            "untrusted-forwarder",
            f"{forwarder or 'an envelope without a forwarder'} is not configured to forward "
            f"to mailbox {mailbox!r}")
    proof = find_proof(outer, principal.address, trust)
    if trust.require_proof and proof is None:
        raise PermanentError(
            "untrusted-forwarder",
            f"no aligned DKIM, SPF or ARC pass for {forwarder} in Authentication-Results "
            f"from {trust.authserv_id}")
    agreed, disagreed = cross_check(principal.address, envelope, email)
    evidence = {
        "decided_by": _decided_by(envelope),
        "envelope_kind": envelope.get("kind"),
        "mailbox": mailbox,
        "forwarder": forwarder,
        "agreed": agreed,
        "disagreed": disagreed,
        "inner_recipient_agrees": any(name.startswith("inner-") for name in agreed),
        "outer_message_id": envelope.get("outer_message_id"),
        "chain": [item.get("address", "") for item in envelope.get("chain") or []],
        "authserv_id": trust.authserv_id,
        "proof": proof,
    }
    return {
        "principal_kind": principal.kind,
        "principal": principal.name,
        "address": principal.address,
        "mailbox": mailbox,
        "method": "forward",
        "evidence": evidence,
    }


def _decided_by(envelope: dict[str, Any]) -> str:
    header = envelope.get("forwarder_header") or "from"
    return "envelope-from" if envelope.get("kind") == "wrapped" else f"envelope-{header}"


def loop_reason(outer: dict[str, list[str]], inner: dict[str, list[str]],
                *, auto_submitted: bool = True) -> str | None:
    """Why this message must not become a delivery again, or None.

    ``auto_submitted``: an original marked Auto-Submitted counts as a loop (forwarded mail:
    the forwarding rule must not feed automatic mail back); direct mail leaves auto-replies
    to the record rules (``suppress``), since a customer's out-of-office reply is mail too.
    """
    for where, headers in (("envelope", outer), ("message", inner)):
        if headers.get(LOOP_MARKER):
            return f"{where} carries mailroute's own {LOOP_MARKER} marker"
        received = _count(headers.get("received-count"))
        if received > MAX_RECEIVED:
            return f"{where} has {received} Received headers (more than {MAX_RECEIVED})"
    for value in inner.get("auto-submitted", []) if auto_submitted else []:
        keyword = value.split(";", 1)[0].strip().lower()
        if keyword and keyword != "no":
            return f"the original is Auto-Submitted: {keyword[:40]} (RFC 3834)"
    return None


def _count(values: list[str] | None) -> int:
    try:
        return int(values[0]) if values else 0
    except ValueError:
        return 0


def cross_check(address: str, envelope: dict[str, Any],
                email: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Which headers name ``address`` (agreed) and which name only others (disagreed)."""
    inner_headers = email.get("headers") or {}
    outer = envelope.get("headers") or {}
    sources: dict[str, list[str]] = {
        "inner-to": [a["address"] for a in email.get("to") or []],
        "inner-cc": [a["address"] for a in email.get("cc") or []],
        "inner-delivered-to": inner_headers.get("delivered-to", []),
        "inner-x-original-to": inner_headers.get("x-original-to", []),
    }
    if envelope.get("kind") == "redirected":
        for header in ("resent-from", "resent-sender", "x-sieve-redirected-from",
                       "x-forwarded-for", "x-original-to"):
            if header != envelope.get("forwarder_header"):
                sources[f"envelope-{header}"] = outer.get(header, [])
    else:
        sources["envelope-sender"] = outer.get("sender", [])
    agreed, disagreed = [], []
    for name, values in sources.items():
        found = {normalise_address(_bare(v)) for value in values for v in value.split(",")}
        found.discard("")
        if address in found:
            agreed.append(name)
        elif found:
            disagreed.append(name)
    return agreed, disagreed


def _bare(value: str) -> str:
    """The address inside ``Name <addr>``, or the first word (X-Forwarded-For: "a b")."""
    if "<" in value and ">" in value:
        return value[value.rfind("<") + 1: value.rfind(">")]
    words = value.split()
    return words[0] if words else ""


def find_proof(outer: dict[str, list[str]], address: str,
               trust: MailboxTrust) -> dict[str, str] | None:
    """An aligned DKIM or SPF pass, or an ARC pass, from the trusted authserv-id; or None."""
    if not trust.authserv_id:
        return None
    domain = address.rpartition("@")[2]
    wanted = trust.authserv_id.lower()
    for header in ("authentication-results", "arc-authentication-results"):
        for value in outer.get(header, []):
            if header == "arc-authentication-results":
                value = _ARC_INSTANCE.sub("", value, count=1)
            serv_id, results = parse_authentication_results(value)
            if serv_id != wanted:
                continue  # another server's (or a forged) header: ignored
            for method, result, props in results:
                if result != "pass":
                    continue
                if method == "arc":
                    return {"method": "arc", "header": header}
                aligned = (props.get("header.d") if method == "dkim" else
                           props.get("smtp.mailfrom", "").rpartition("@")[2]
                           if method == "spf" else None)
                if aligned and _aligned(aligned.lower(), domain):
                    return {"method": method, "domain": aligned.lower(), "header": header}
    return None


def _aligned(found: str, wanted: str) -> bool:
    """Relaxed alignment (RFC 7489): the same domain, or one a subdomain of the other."""
    return found == wanted or found.endswith("." + wanted) or wanted.endswith("." + found)


def parse_authentication_results(
        value: str) -> tuple[str, list[tuple[str, str, dict[str, str]]]]:
    """(authserv-id, [(method, result, {ptype.property: value})]) of one header value."""
    for _ in range(_MAX_COMMENT_PASSES):
        stripped = _COMMENT.sub(" ", value)
        if stripped == value:
            break
        value = stripped
    pieces = value.split(";")
    head = pieces[0].split()
    serv_id = head[0].lower() if head else ""
    results = []
    for piece in pieces[1:]:
        found = [(key.lower(), val.strip('"')) for key, val in _PROPERTY.findall(piece)]
        if not found:
            continue
        method = found[0][0].split("/", 1)[0]
        results.append((method, found[0][1].lower(), dict(found[1:])))
    return serv_id, results
