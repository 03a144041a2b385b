"""Bytes for a message mailroute rebuilt itself (from TNEF or an Outlook ``.msg``).

Takes an ``EmailMessage`` built in memory; gives its bytes with multipart boundaries derived
from the content instead of the standard library's random ones, so the same input always
gives the same bytes and therefore the same attachment checksum and dedup key on every
redelivery.  Never fails on a message the standard library can serialise.
"""

from __future__ import annotations

import hashlib
from email.message import Message
from email.policy import SMTP


def stable_bytes(message: Message) -> bytes:
    """``message`` as bytes (SMTP policy) with content-derived boundaries."""
    _set_stable_boundaries(message)
    return message.as_bytes(policy=SMTP)


def _set_stable_boundaries(part: Message) -> bytes:
    """Set each multipart's boundary from its children's digests; return this part's digest."""
    digest = hashlib.sha256(part.get_content_type().encode())
    payload = part.get_payload()
    if isinstance(payload, list):
        for child in payload:
            if isinstance(child, Message):
                digest.update(_set_stable_boundaries(child))
        if part.get_content_maintype() == "multipart":
            part.set_boundary(f"=_mailroute_{digest.hexdigest()[:32]}")
    else:
        digest.update(str(payload).encode("utf-8", "surrogateescape"))
    return digest.digest()
