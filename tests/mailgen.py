"""Messages for tests, written here: plain mail, CRM mail and Outlook-style forward envelopes."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

ATTACHMENTS = tuple[tuple[str, bytes], ...]


def message(sender: str, to: list[str], subject: str, body: str,
            message_id: str | None = None, cc: list[str] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime(2026, 11, 2, 9, 30, tzinfo=UTC))
    msg["Message-ID"] = message_id or make_msgid(domain="example.org")
    msg.set_content(body)
    return msg.as_bytes(policy=SMTP)


def forward_envelope(forwarder: str, forward_mailbox: str, original: bytes) -> bytes:
    """What an Exchange rule "forward as attachment" sends: a note plus message/rfc822."""
    envelope = EmailMessage()
    envelope["From"] = forwarder
    envelope["To"] = forward_mailbox
    envelope["Subject"] = "FW: forwarded message"
    envelope["Date"] = format_datetime(datetime(2026, 11, 2, 9, 31, tzinfo=UTC))
    envelope["Message-ID"] = make_msgid(domain="corp.example.com")
    envelope.set_content("Forwarded by a server-side rule.")
    envelope.make_mixed()
    part = EmailMessage()
    part["Content-Type"] = "message/rfc822"
    part["Content-Disposition"] = 'attachment; filename="original.eml"'
    part.set_payload([email.message_from_bytes(original)])
    envelope.attach(part)
    return envelope.as_bytes(policy=SMTP)


def crm_mail(mid: str, sender: str = "carol@customer.example", subject: str = "Order 17",
             to: str = "support@corp.example", reply_to: str | None = None,
             attachments: ATTACHMENTS = (), body: str = "hello",
             headers: dict[str, str] | None = None) -> bytes:
    """Mail from a customer as the routing and records tests need it (Message-ID ``<mid>``)."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Fri, 27 Nov 2026 08:00:00 +0000"
    msg["Message-ID"] = f"<{mid}>"
    if reply_to:
        msg["In-Reply-To"] = f"<{reply_to}>"
        msg["References"] = f"<{reply_to}>"
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    for filename, content in attachments:
        msg.add_attachment(content, maintype="application", subtype="octet-stream",
                           filename=filename)
    return msg.as_bytes(policy=SMTP)
