"""The ways reading a mailbox fails, as the ingest worker sees them.

Takes nothing; gives :class:`MailboxAuthError` (the server refused the credentials: permanent
for this mailbox until its configuration changes) and :class:`MailboxUnavailable` (network,
TLS, timeout or protocol trouble: a passing failure, the next poll tries again).  Messages
name the mailbox and the server's words, never a password.
"""

from __future__ import annotations

from shared.errors import TransientError


class MailboxError(Exception):
    """Reading one mailbox failed; the poll is recorded as failed."""


class MailboxAuthError(MailboxError):
    """The server refused the mailbox's credentials."""


class MailboxUnavailable(MailboxError, TransientError):
    """The mailbox could not be read now (connection, TLS, timeout, protocol error)."""


class MailboxDisabled(MailboxError):
    """The mailbox must stop being polled until an operator re-enables it (with the reason)."""
