"""Which mail is tracked, per user or queue: all, replies to tracked mail, mail from known
contacts or accounts, or none.

Takes the principal's ``track`` mode, whether the sender is known (None when the sender's
address is missing or ambiguous) and the email's :class:`~route.threading.Correlation`;
gives (tracked, reason).  Untracked mail is not dropped: its delivery is stored with
``tracked`` false and the reason, and the route stage counts it in
``mailroute_messages_untracked_total{stage="route",reason}``.  Pure.
"""

from __future__ import annotations

from route.threading import Correlation

NOT_TRACKED = "tracking-off"
NOT_A_REPLY = "not-a-reply-to-tracked-mail"
SENDER_UNKNOWN = "sender-not-a-contact"
SENDER_UNCLEAR = "sender-missing-or-ambiguous"
SUPPRESSED = "suppressed-by-rule"
REASONS = (NOT_TRACKED, NOT_A_REPLY, SENDER_UNKNOWN, SENDER_UNCLEAR, SUPPRESSED)


def tracking_decision(mode: str, sender_known: bool | None,
                      correlation: Correlation) -> tuple[bool, str | None]:
    if mode == "all":
        return True, None
    if mode == "none":
        return False, NOT_TRACKED
    if mode == "replies":
        parent = correlation.parent
        if parent is not None and parent.tracked:
            return True, None
        return False, NOT_A_REPLY
    if mode == "contacts":
        if sender_known is None:
            return False, SENDER_UNCLEAR
        return (True, None) if sender_known else (False, SENDER_UNKNOWN)
    raise ValueError(f"unknown tracking mode {mode!r}")
