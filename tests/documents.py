"""Factories for stage documents that satisfy shared.schemas, for worker and runtime tests."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any


def source(mailbox: str = "alice", kind: str = "direct", uid: int = 1) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"mailbox": mailbox, "mailbox_kind": kind, "folder": "INBOX", "uidvalidity": 7,
            "uid": str(uid), "received_at": now, "fetched_at": now}


def raw(body: bytes = b"Subject: hi\r\n\r\nhello\r\n", **kw: Any) -> dict[str, Any]:
    return {"trace_id": uuid.uuid4().hex, "source": source(**kw), "raw": body}


def email(message_id: str = "m1@example.com", subject: str = "hi") -> dict[str, Any]:
    fingerprint = hashlib.sha256(subject.encode()).hexdigest()
    return {"message_id": message_id, "dedup_key": f"mid:{message_id}",
            "fingerprint": fingerprint, "subject": subject, "date": None,
            "from_": [{"name": "Ann", "address": "ann@example.org"}],
            "to": [{"name": "", "address": "alice@example.com"}], "cc": [], "reply_to": [],
            "in_reply_to": None, "references": [], "headers": {}, "text": "hello",
            "html": None, "attachments": [], "defects": [], "size": 30}


def parsed(trace_id: str | None = None, message_id: str = "m1@example.com",
           **kw: Any) -> dict[str, Any]:
    return {"trace_id": trace_id or uuid.uuid4().hex, "source": source(**kw),
            "envelope": {"kind": "direct", "forwarder": None, "outer_message_id": None,
                         "outer_subject": None, "index": 0, "count": 1, "defects": []},
            "email": email(message_id)}
