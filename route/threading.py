"""Threading: which stored email (and so which thread and case) a new email continues.

Takes a parsed email, the :class:`~route.history.History` and the threading settings; gives a
:class:`Correlation` naming the method that linked it -- ``token`` (the tracking token in the
subject, e.g. ``[CRM:0001234]``, the id of the email replied to), ``in-reply-to``,
``references``, ``thread-index`` (Outlook's conversation root: the first 22 bytes of
``Thread-Index``), ``smart`` (same normalised subject within ``smart_match_days`` and a
shared participant) -- or ``none``.  Methods are tried in that order; the first that finds a
stored email wins.  Pure apart from the lookups; never raises on odd headers (a malformed
Thread-Index or token is ignored).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from route.directory import strict_address
from route.history import History, KnownEmail, Lookups, SubjectQuery
from shared.settings import ThreadingSettings

# Reply and forward prefixes in the languages Outlook and common clients write.
_PREFIX = re.compile(
    r"^\s*(?:(?:re|fw|fwd|aw|wg|sv|vs|antw|antwort|r|rif|tr|enc|res|odp|vl|ynt|ref)"
    r"(?:\[\d+\])?\s*[:\uff1a]\s*)+", re.IGNORECASE)
_LIST_TAG = re.compile(r"^\s*\[[^\]]{1,40}\]\s*")
THREAD_INDEX_HEADER_BYTES = 22  # FILETIME (6) + GUID (16); each reply appends 5 bytes


class TrackingToken:
    """The configurable token format, e.g. ``[CRM:{number:07d}]``, rendered and recognised."""

    def __init__(self, token_format: str) -> None:
        self.format = token_format
        before, _, rest = token_format.partition("{number")
        after = rest.partition("}")[2]
        self._pattern = re.compile(
            re.escape(before.replace("{{", "{").replace("}}", "}")) + r"\s*(\d{1,18})\s*"
            + re.escape(after.replace("{{", "{").replace("}}", "}")), re.IGNORECASE)

    def render(self, number: int) -> str:
        return self.format.format(number=number)

    def find(self, subject: str) -> int | None:
        match = self._pattern.search(subject)
        return int(match.group(1)) if match else None

    def strip(self, subject: str) -> str:
        return self._pattern.sub(" ", subject)


def normalise_subject(subject: str, token: TrackingToken) -> str:
    """The subject without tokens, reply/forward prefixes and list tags; case-folded."""
    text = token.strip(subject)
    while True:
        shorter = _LIST_TAG.sub("", _PREFIX.sub("", text))
        if shorter == text:
            break
        text = shorter
    return " ".join(text.split()).casefold()


def thread_index_root(values: list[str]) -> str | None:
    """The conversation root of an Outlook ``Thread-Index`` header, base64; None if malformed."""
    if not values:
        return None
    try:
        raw = base64.b64decode("".join(values[0].split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) < THREAD_INDEX_HEADER_BYTES or (len(raw) - THREAD_INDEX_HEADER_BYTES) % 5:
        return None
    return base64.b64encode(raw[:THREAD_INDEX_HEADER_BYTES]).decode("ascii")


def participants(email: dict[str, Any]) -> frozenset[str]:
    found = set()
    for key in ("from_", "to", "cc"):
        for item in email.get(key) or []:
            if (address := strict_address(item.get("address", ""))) is not None:
                found.add(address)
    return frozenset(found)


@dataclass(frozen=True)
class ThreadFacts:
    """What an email offers for threading, computed once."""

    token: int | None
    in_reply_to: str | None
    references: tuple[str, ...]
    thread_index_root: str | None
    subject_key: str
    participants: frozenset[str]

    @property
    def candidates(self) -> list[str]:
        """Message-IDs this email answers, the direct parent first."""
        ids = [self.in_reply_to] if self.in_reply_to else []
        ids += [m for m in reversed(self.references) if m not in ids]
        return ids


def thread_facts(email: dict[str, Any], token: TrackingToken) -> ThreadFacts:
    subject = email.get("subject") or ""
    headers = email.get("headers") or {}
    return ThreadFacts(
        token=token.find(subject),
        in_reply_to=email.get("in_reply_to"),
        references=tuple(email.get("references") or ()),
        thread_index_root=thread_index_root(headers.get("thread-index", [])),
        subject_key=normalise_subject(subject, token),
        participants=participants(email),
    )


@dataclass(frozen=True)
class Correlation:
    method: str
    parent: KnownEmail | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def document(self, facts: ThreadFacts) -> dict[str, Any]:
        """The ``correlation`` of the routed document (persist stores it on the email)."""
        parent = self.parent
        return {
            "method": self.method,
            "parent_email_id": parent.email_id if parent else None,
            "parent_message_id": parent.message_id if parent else None,
            "thread_id": parent.thread_id if parent else None,
            "case_id": parent.case_id if parent else None,
            "parent_tracked": parent.tracked if parent else None,
            "candidates": facts.candidates,
            "thread_index_root": facts.thread_index_root,
            "subject_key": facts.subject_key,
            **self.detail,
        }


def correlate(facts: ThreadFacts, history: History, settings: ThreadingSettings,
              received_at: datetime) -> Correlation:
    """The first method that links this email to a stored one, or ``none``."""
    if facts.token is not None:
        known = history.by_email_id(facts.token)
        if known is not None:
            return Correlation("token", known, {"token": facts.token})
    if facts.in_reply_to:
        found = history.by_message_ids([facts.in_reply_to])
        if found:
            return Correlation("in-reply-to", found[0])
    references = [m for m in reversed(facts.references) if m != facts.in_reply_to]
    if references:
        found = history.by_message_ids(references)
        if found:
            return Correlation("references", found[0])
    if facts.thread_index_root:
        known = history.by_thread_index_root(facts.thread_index_root)
        if known is not None:
            return Correlation("thread-index", known)
    if settings.smart_match and facts.subject_key and facts.participants:
        since = received_at - timedelta(days=settings.smart_match_days)
        known = history.by_subject(facts.subject_key, facts.participants, since)
        if known is not None:
            return Correlation("smart", known)
    return Correlation("none")


def lookups(facts: ThreadFacts, settings: ThreadingSettings, received_at: datetime) -> Lookups:
    """Every lookup :func:`correlate` may make for these facts (it stops at the first hit)."""
    references = [m for m in facts.references if m != facts.in_reply_to]
    subjects: frozenset[SubjectQuery] = frozenset()
    if settings.smart_match and facts.subject_key and facts.participants:
        since = received_at - timedelta(days=settings.smart_match_days)
        subjects = frozenset({(facts.subject_key, facts.participants, since)})
    return Lookups(
        email_ids=frozenset({facts.token}) if facts.token is not None else frozenset(),
        message_ids=frozenset(references + ([facts.in_reply_to] if facts.in_reply_to else [])),
        thread_index_roots=frozenset({facts.thread_index_root})
        if facts.thread_index_root else frozenset(),
        subjects=subjects)
