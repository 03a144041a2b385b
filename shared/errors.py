"""The two kinds of failure a stage may raise, and nothing else.

A :class:`PermanentError` means the input itself is bad (it will fail the same way every time):
the runtime dead-letters it at once with ``reason``.  A :class:`TransientError` means the
world is not ready (a database or server down, a timeout): the runtime retries it with capped
backoff and dead-letters it only when the attempts are used up.  Any other exception escaping
a stage is treated as transient, so an unexpected bug cannot loop forever either.
"""

from __future__ import annotations


class PermanentError(Exception):
    """Bad input: dead-letter now. ``reason`` is a short stable slug, ``detail`` free text."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TransientError(Exception):
    """A passing failure: retry with backoff."""
