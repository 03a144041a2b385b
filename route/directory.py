"""Who can receive mail: the users and queues of the configuration, looked up by address.

Takes the frozen settings; gives a :class:`Directory` answering "who owns this direct mailbox"
and "which principal with this address uses this forward mailbox".  Pure data, no I/O.
Addresses compare case-insensitively (:func:`normalise_address`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.settings import Settings

PrincipalKind = Literal["user", "queue"]


def normalise_address(address: str) -> str:
    """Lower-case, trimmed, without angle brackets; '' for anything that is not an address."""
    address = address.strip().strip("<>").strip()
    if address.count("@") != 1:
        return ""
    return address.lower()


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    name: str
    address: str
    mailbox: str | None
    forward: str | None


class Directory:
    def __init__(self, settings: Settings) -> None:
        groups: tuple[tuple[PrincipalKind, Any], ...] = (
            ("user", settings.users), ("queue", settings.queues))
        self._principals = tuple(
            Principal(kind, p.name, normalise_address(p.address), p.mailbox, p.forward)
            for kind, group in groups
            for p in group
        )
        self._forward_mailboxes = frozenset(b.name for b in settings.mailboxes if b.forward)

    def owners_of_mailbox(self, mailbox: str) -> list[Principal]:
        return [p for p in self._principals if p.mailbox == mailbox]

    def is_forward_mailbox(self, mailbox: str) -> bool:
        return mailbox in self._forward_mailboxes

    def forwarding_principal(self, forward_mailbox: str, address: str) -> Principal | None:
        wanted = normalise_address(address)
        for p in self._principals:
            if p.forward == forward_mailbox and wanted and p.address == wanted:
                return p
        return None
