"""Benchmark mail, written here: realistic 4 KB messages, HTML mail and forward envelopes.

Takes a seeded ``random.Random`` so runs are repeatable; gives raw RFC 5322 bytes built with
``email.message.EmailMessage``: :func:`plain_mail` (headers as a mail server leaves them, a
text body, a unique Message-ID, about ``size`` bytes), :func:`html_mail` (text and HTML
alternatives) and :func:`forward_envelope` (an Exchange "forward as attachment" note wrapping
a message as ``message/rfc822``, built the way ``tests/mailgen.py`` builds it).  Never fails.
"""

from __future__ import annotations

import random
import secrets
import textwrap
import unicodedata
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from tests import mailgen

WORDS = (
    "the", "order", "invoice", "please", "find", "attached", "regarding", "our", "meeting",
    "next", "week", "about", "project", "update", "status", "quarterly", "report", "customer",
    "account", "payment", "received", "thanks", "for", "your", "quick", "reply", "we", "will",
    "review", "and", "get", "back", "to", "you", "shortly", "schedule", "delivery",
    "shipment", "contract", "renewal", "question", "support", "ticket", "issue", "resolved",
    "pending", "approval", "budget", "team",
)
NAMES = ("Anna Schmidt", "Ben Okafor", "Chloé Martin", "Dmitri Ivanov", "Eva Nováková",
         "Farid Haddad", "Grace Lee", "Hiro Tanaka")
RECIPIENT = "bench@corp.example.com"


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
    return " ".join(words).capitalize() + "."


def _paragraphs(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        paragraph = textwrap.fill(" ".join(_sentence(rng) for _ in range(rng.randint(2, 5))),
                                  width=72)
        out.append(paragraph)
        length += len(paragraph) + 2
    return "\n\n".join(out)[:size].rstrip() + "\n"


def _headers(msg: EmailMessage, rng: random.Random, message_id: str, sent: datetime) -> None:
    name = rng.choice(NAMES)
    first = unicodedata.normalize("NFKD", name.split()[0].lower())
    local = first.encode("ascii", "ignore").decode()
    relay = f"mx{rng.randint(1, 4)}.example.net"
    msg["Return-Path"] = f"<{local}@example.net>"
    msg["Received"] = (f"from {relay} ({relay} [203.0.113.{rng.randint(1, 254)}]) by "
                       f"mail.corp.example.com (Postfix) with ESMTPS id {secrets.token_hex(5)} "
                       f"for <{RECIPIENT}>; {format_datetime(sent + timedelta(seconds=2))}")
    msg["Received"] = (f"from [192.0.2.{rng.randint(1, 254)}] by {relay} with ESMTPSA id "
                       f"{secrets.token_hex(6)}; {format_datetime(sent + timedelta(seconds=1))}")
    msg["From"] = f"{name} <{local}@example.net>"
    msg["To"] = f"Bench User <{RECIPIENT}>"
    msg["Cc"] = f"{rng.choice(NAMES)} <team@example.net>"
    msg["Subject"] = "Re: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
    msg["Date"] = format_datetime(sent)
    msg["Message-ID"] = message_id
    msg["X-Mailer"] = "Microsoft Outlook 16.0"
    msg["Thread-Index"] = secrets.token_urlsafe(22)


def plain_mail(rng: random.Random, message_id: str, size: int = 4096) -> bytes:
    """A text/plain message of about ``size`` bytes (within a few bytes)."""
    sent = datetime(2026, 11, 2, 9, 0, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 86400))
    body_size = size - 800
    for _ in range(3):
        msg = EmailMessage()
        _headers(msg, rng, message_id, sent)
        msg.set_content(_paragraphs(random.Random(rng.random()), body_size))
        raw = msg.as_bytes(policy=SMTP)
        if abs(len(raw) - size) < 16:
            break
        body_size += size - len(raw)
    return raw


def attachment_mail(rng: random.Random, message_id: str,
                    sizes: tuple[int, ...] = (1_000_000, 200_000)) -> bytes:
    """A short text body and one attachment of each size (a PDF, then images; random bytes,
    so base64 as every mail client writes it: 76-character lines)."""
    sent = datetime(2026, 11, 2, 9, 0, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 86400))
    msg = EmailMessage()
    _headers(msg, rng, message_id, sent)
    msg.set_content(_paragraphs(rng, 800))
    for number, size in enumerate(sizes):
        kind, extension = ("application", "pdf") if number == 0 else ("image", "png")
        msg.add_attachment(rng.randbytes(size), maintype=kind, subtype=extension,
                           filename=f"file-{number}.{extension}")
    return msg.as_bytes(policy=SMTP)


def html_mail(rng: random.Random, message_id: str, size: int = 20_000) -> bytes:
    """multipart/alternative: a text body and the same text as HTML, about ``size`` bytes."""
    sent = datetime(2026, 11, 2, 9, 0, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 86400))
    text = _paragraphs(rng, size * 2 // 5)
    paragraphs = "".join(f'<p style="margin:0 0 12px 0;font-family:Calibri">{p}</p>\n'
                         for p in text.split("\n\n"))
    html = (f"<html><head><meta charset=\"utf-8\"></head><body><div>{paragraphs}</div>"
            f"<div style=\"color:#888\">-- <br>{rng.choice(NAMES)}</div></body></html>\n")
    msg = EmailMessage()
    _headers(msg, rng, message_id, sent)
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return msg.as_bytes(policy=SMTP)


def forward_envelope(rng: random.Random, original: bytes, forwarder: str,
                     forward_mailbox: str = "forward@corp.example.com") -> bytes:
    """What an Exchange rule "forward as attachment" sends (the tests' own builder)."""
    return mailgen.forward_envelope(forwarder, forward_mailbox, original)
