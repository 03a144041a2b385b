"""Canaries in the mail: is this email one of mailroute's marked test messages?

Takes a parsed email (``shared.schemas.EmailSchema`` dict, whose ``headers`` keep
``x-mailroute-canary``: see ``parse.extract.KEPT_HEADERS``); :func:`canary_id` gives the id
its ``X-Mailroute-Canary`` header carries, or None for ordinary mail.  Only mail from the
configured canary sender (``canaries.sender``) can be a canary: the header on anyone else's
mail is ignored, so nobody can keep their mail out of the records by adding it.  Pure.
Whether the id was really sent, and to whom, only persist can tell (``persist.canaries``):
route marks the routed document and makes no records for it.

Fails with ``PermanentError("unknown-canary")`` for a header that cannot be one of mailroute's
ids (empty, malformed, or several different values): such a message is dead-lettered with the
reason, never recorded and never dropped silently.
"""

from __future__ import annotations

import re
from typing import Any

from route.directory import normalise_address
from shared.errors import PermanentError

CANARY_HEADER = "X-Mailroute-Canary"
# secrets.token_urlsafe(16) gives 22 characters; room for longer ids, nothing else.
_CANARY_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


def canary_id(email: dict[str, Any], sender: str) -> str | None:
    """The canary id of ``email``, None when it carries no canary header or is not from
    ``sender`` (the canaries' From address)."""
    values = (email.get("headers") or {}).get(CANARY_HEADER.lower())
    if not values:
        return None
    senders = {normalise_address(a.get("address") or "")
               for a in email.get("from_") or email.get("from") or ()}
    if senders != {normalise_address(sender)}:
        return None
    found = {value.strip() for value in values}
    if len(found) != 1:
        raise PermanentError("unknown-canary",
                             f"{len(found)} different {CANARY_HEADER} values in one message")
    value = found.pop()
    if not _CANARY_ID.fullmatch(value):
        raise PermanentError("unknown-canary",
                             f"{CANARY_HEADER} {value[:80]!r} is not a canary id of mailroute's")
    return value
