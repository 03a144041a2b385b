"""Routing: which users and queues receive a parsed email, whether each tracks it, how it
threads, and which records it makes.

Takes a parsed document (``shared.schemas.ParsedSchema``), the :class:`Directory`, a
:class:`~route.history.History` of stored mail and the settings; gives the routed fields:
``deliveries`` (one per user or queue, each with ``tracked``, ``untracked_reason`` and the
``rule`` that fired), ``correlation`` (``route.threading``), ``records`` (case action,
priority, owner, notes) and the email with its attachments screened
(``route.attachments``).  Pure apart from the read-only lookups.

The steps, each its own call: :func:`route` decides *who* (the owners of a direct mailbox,
or -- one separate call, ``route.forwarding.forwarded_delivery`` -- the trusted forwarder
of a forward envelope); then threading, tracking, rules and the attachment policy.  Fails
with ``PermanentError``: ``unassigned-mailbox`` (a direct mailbox nobody owns), and for a
forward mailbox's mail those of ``forwarded_delivery`` (``not-a-forward-mailbox``,
``mail-loop``, ``untrusted-forwarder``: no record is made).

A canary (mailroute's marked test message, :mod:`route.canary`) is routed like any mail to
find who forwarded it, then stops: its decision carries the canary id and the deliveries
(untracked, reason ``canary``) but no threading and no records; persist only marks it seen.
A malformed canary header is ``unknown-canary``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from route.attachments import screen_attachments
from route.canary import canary_id
from route.directory import Directory, Principal, strict_address
from route.forwarding import ForwardPolicy, forwarded_delivery, loop_reason
from route.history import BatchHistory, History, Lookups, NoHistory
from route.rules import RuleFacts, first_matching_rule, is_auto_reply
from route.threading import (
    Correlation,
    ThreadFacts,
    TrackingToken,
    correlate,
    lookups,
    thread_facts,
)
from route.tracking import SUPPRESSED, tracking_decision
from shared.errors import PermanentError
from shared.settings import RuleSettings, Settings

CANARY = "canary"  # the untracked_reason of a canary's delivery (never stored)
TimedFacts = tuple[ThreadFacts, datetime]  # what threading goes by, and when it was received


def route(parsed: dict[str, Any], directory: Directory,
          forwarding: ForwardPolicy | None = None) -> list[dict[str, Any]]:
    """Who receives the email: one delivery per user or queue, with the evidence."""
    source = parsed["source"]
    mailbox = source["mailbox"]
    if source["mailbox_kind"] == "forward" or parsed["envelope"]["kind"] != "direct":
        return [forwarded_delivery(parsed, directory, forwarding or ForwardPolicy())]
    loop = loop_reason({}, parsed["email"].get("headers") or {}, auto_submitted=False)
    if loop is not None:
        raise PermanentError("mail-loop", loop)
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


@dataclass(frozen=True)
class Decision:
    """The routed document's fields beyond those copied from the parsed one."""

    email: dict[str, Any]
    deliveries: list[dict[str, Any]]
    correlation: dict[str, Any]
    records: dict[str, Any]
    canary: str | None = None  # a canary's id: persist marks it seen, makes no records


class Router:
    """Everything route decides for one email; built once from the settings."""

    def __init__(self, settings: Settings, directory: Directory | None = None,
                 history: History | None = None,
                 forwarding: ForwardPolicy | None = None) -> None:
        self.settings = settings
        self.directory = directory or Directory(settings)
        self.forwarding = forwarding or ForwardPolicy(settings)
        self.history: History = history if history is not None else NoHistory()
        self.token = TrackingToken(settings.threading.token_format)
        self._principals = {(p.kind, p.name): p for p in self.directory.principals}

    def threading_facts(self, parsed: dict[str, Any]) -> TimedFacts:
        """What threading goes by in ``parsed`` (external participants only), and when it
        was received."""
        facts = thread_facts(parsed["email"], self.token)
        facts = dataclasses.replace(facts, participants=frozenset(
            a for a in facts.participants if not self.directory.is_internal(a)))
        return facts, parsed["source"].get("received_at") or datetime.now(UTC)

    def history_for(self, batch: list[dict[str, Any]],
                    facts: list[TimedFacts] | None = None) -> History:
        """The history to route ``batch`` with: one that has asked every threading lookup
        of the batch, and its senders' contacts, at once, when the history can and there
        is more than one to ask (one round trip in all instead of one per lookup: a single
        mail with a Thread-Index, a subject to match and a new sender made three, each
        waiting for the database, on a busy machine or across a network), else the history
        itself.  ``facts``: the batch's :meth:`threading_facts`, when the caller has them."""
        if not batch or not isinstance(self.history, BatchHistory):
            return self.history
        wanted = [lookups(thread, self.settings.threading, received_at)
                  for thread, received_at in facts or map(self.threading_facts, batch)]
        gathered = Lookups(
            email_ids=frozenset().union(*(w.email_ids for w in wanted)),
            message_ids=frozenset().union(*(w.message_ids for w in wanted)),
            thread_index_roots=frozenset().union(*(w.thread_index_roots for w in wanted)),
            subjects=frozenset().union(*(w.subjects for w in wanted)),
            parties=frozenset(address for parsed in batch
                              if (address := self._sender_to_look_up(parsed["email"]))))
        if len(batch) < 2 and gathered.statements() < 2:
            return self.history  # one lookup at most: asked alone, and only if needed
        return self.history.prefetched(gathered)

    def decide(self, parsed: dict[str, Any], history: History | None = None,
               facts: TimedFacts | None = None) -> Decision:
        """Route one email; ``history`` (default: the router's) answers the lookups;
        ``facts``: its :meth:`threading_facts`, when the caller has them."""
        history = history or self.history
        deliveries = route(parsed, self.directory, self.forwarding)
        email = parsed["email"]
        canary = canary_id(email, self.settings.canaries.sender)
        if canary is not None:
            # mailroute's own test message: who forwarded it is all that counts
            for delivery in deliveries:
                delivery.update(tracked=False, untracked_reason=CANARY)
            return Decision(email=email, deliveries=deliveries, correlation={}, records={},
                            canary=canary)
        thread, received_at = facts or self.threading_facts(parsed)
        correlation = correlate(thread, history, self.settings.threading, received_at)
        sender_known = self._sender_known(email, history)
        auto_reply = is_auto_reply(email)
        fired: list[tuple[dict[str, Any], RuleSettings]] = []
        for delivery in deliveries:
            principal = self._principals[(delivery["principal_kind"], delivery["principal"])]
            tracked, reason = tracking_decision(principal.track, sender_known, correlation)
            rule = first_matching_rule(self.settings.rules, RuleFacts(
                principal_kind=principal.kind, principal=principal.name,
                sender_known=sender_known, subject=email.get("subject") or "",
                body=email.get("text") or email.get("html") or "",
                thread_state="new" if correlation.parent is None else "existing",
                has_case=bool(correlation.parent and correlation.parent.case_id),
                auto_reply=auto_reply))
            if rule is not None:
                delivery["rule"] = rule.name
                if tracked and rule.then.suppress:
                    tracked, reason = False, SUPPRESSED
                if tracked:
                    fired.append((delivery, rule))
            delivery["tracked"] = tracked
            delivery["untracked_reason"] = reason
        attachments, notes = screen_attachments(list(email.get("attachments") or []),
                                                self.settings.attachments)
        if sender_known is None:
            notes.append("sender-missing-or-ambiguous")
        records = self._records(fired, correlation, email, notes, auto_reply)
        records["principals"] = self._principal_parties(email)
        return Decision(email={**email, "attachments": attachments}, deliveries=deliveries,
                        correlation=correlation.document(thread), records=records)

    def _principal_parties(self, email: dict[str, Any]) -> dict[str, str]:
        """The email's addresses that are users or queues (persist marks those parties)."""
        found: dict[str, str] = {}
        for key in ("from_", "to", "cc", "reply_to"):
            for item in email.get(key) or []:
                address = strict_address(item.get("address", ""))
                principal = self.directory.principal_by_address(address) if address else None
                if principal is not None and address is not None:
                    found[address] = principal.kind
        return found

    def _sender_known(self, email: dict[str, Any], history: History) -> bool | None:
        """True for a configured or stored contact/account; None if missing or ambiguous."""
        address = _sender_address(email)
        if address is None:
            return None
        if self.directory.configured_party(address) is not None:
            return True
        return history.party(address) is not None

    def _sender_to_look_up(self, email: dict[str, Any]) -> str | None:
        """The sender's address when only the history can tell whether it is known."""
        address = _sender_address(email)
        if address is None or self.directory.configured_party(address) is not None:
            return None
        return address

    def _records(self, fired: list[tuple[dict[str, Any], RuleSettings]],
                 correlation: Correlation, email: dict[str, Any], notes: list[str],
                 auto_reply: bool) -> dict[str, Any]:
        """The email's records from the first tracked delivery whose rule acts on cases."""
        records: dict[str, Any] = {"case": None, "case_id": None, "rule": None,
                                   "priority": None, "owner": None, "queue": None,
                                   "link_case": False, "auto_reply": auto_reply,
                                   "notes": notes, "title": (email.get("subject") or "").strip()}
        if fired:
            records["rule"] = fired[0][1].name
        thread_case = correlation.parent.case_id if correlation.parent else None
        for delivery, rule in fired:
            actions = rule.then
            if not (actions.create_case or actions.link_case or actions.priority
                    or actions.owner):
                continue
            records.update(rule=rule.name, priority=actions.priority, owner=actions.owner,
                           link_case=actions.link_case,
                           queue=delivery["principal"]
                           if delivery["principal_kind"] == "queue" else None)
            if actions.link_case and thread_case is not None:
                records.update(case="link", case_id=thread_case)
            elif actions.create_case:
                records["case"] = "create"
            break
        return records


def _sender_address(email: dict[str, Any]) -> str | None:
    """The first sender's strict address; None if missing or ambiguous."""
    senders = email.get("from_") or email.get("from") or []
    if not senders or any(d.startswith("ambiguous-address:from")
                          for d in email.get("defects") or []):
        return None
    return strict_address(senders[0].get("address", ""))
