"""Record creation rules: the first configured rule whose conditions hold decides the records.

Takes the rules of the settings (in order) and the :class:`RuleFacts` of one delivery (which
queue or user, sender known or not, subject and body, thread state, auto-reply); gives the
rule that fired, or None.  Its actions -- create a case, link to the thread's case, set a
priority or owner, suppress -- are applied by ``route.router`` and stored by persist with the
rule's name.  Patterns are searched case-insensitively; a body is searched in its first
:data:`BODY_SEARCH_CHARS` characters.  Pure; patterns were checked when the settings loaded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from shared.settings import RuleSettings

BODY_SEARCH_CHARS = 200_000
_AUTO_SUBJECT = re.compile(
    r"^\s*(automatic reply|auto(?:matic)?[- ]?(?:reply|response)|out of (?:the )?office"
    r"|abwesenheitsnotiz|automatische antwort|réponse automatique|respuesta automática)\b",
    re.IGNORECASE)


@dataclass(frozen=True)
class RuleFacts:
    principal_kind: str
    principal: str
    sender_known: bool | None
    subject: str
    body: str
    thread_state: str  # "new" or "existing"
    has_case: bool
    auto_reply: bool


def is_auto_reply(email: dict[str, Any]) -> bool:
    """RFC 3834 ``Auto-Submitted``, ``Precedence: auto_reply/bulk/junk``, or an
    out-of-office subject."""
    headers = email.get("headers") or {}
    if any(v.strip().lower().split(";")[0] not in ("", "no")
           for v in headers.get("auto-submitted", [])):
        return True
    if any(v.strip().lower() in ("auto_reply", "bulk", "junk")
           for v in headers.get("precedence", [])):
        return True
    return bool(_AUTO_SUBJECT.match(email.get("subject") or ""))


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def _matches(rule: RuleSettings, facts: RuleFacts) -> bool:
    when = rule.when
    for kind in ("queue", "user"):
        wanted = getattr(when, kind)
        if wanted is not None and (facts.principal_kind != kind
                                   or wanted not in ("*", facts.principal)):
            return False
    if when.sender == "known" and facts.sender_known is not True:
        return False
    if when.sender == "unknown" and facts.sender_known is True:
        return False
    if when.subject is not None and not _compiled(when.subject).search(facts.subject):
        return False
    if when.body is not None and not _compiled(when.body).search(
            facts.body[:BODY_SEARCH_CHARS]):
        return False
    thread = when.thread
    if thread == "new" and facts.thread_state != "new":
        return False
    if thread == "existing" and facts.thread_state != "existing":
        return False
    if thread == "with-case" and not facts.has_case:
        return False
    if thread == "without-case" and facts.has_case:
        return False
    return when.auto_reply is None or when.auto_reply == facts.auto_reply


def first_matching_rule(rules: Sequence[RuleSettings], facts: RuleFacts) -> RuleSettings | None:
    return next((rule for rule in rules if _matches(rule, facts)), None)
