"""Who can receive mail and who sends it: users, queues, contacts and accounts, by address.

Takes the frozen settings; gives a :class:`Directory` answering "who owns this direct
mailbox", "which principal with this address uses this forward mailbox" and "which configured
contact or account is this sender".  Contacts and accounts edited at runtime live in the
database and are looked up through ``route.history.History``; the configuration is read-only.
Pure data, no I/O.

Addresses compare case-insensitively (mailroute lower-cases the whole address: no mail
system it meets treats local parts case-sensitively), a ``+tag`` on the local part matches
the address without it, and an address that could be read two ways -- quotes, comments,
angle brackets, several ``@`` (CVE-2023-27043 in ``email.utils``) -- matches nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from shared.settings import Settings

PrincipalKind = Literal["user", "queue"]
PartyKind = Literal["contact", "account"]

# Characters that make an address mean different things to different parsers, and controls.
_AMBIGUOUS = re.compile(r'[\x00-\x20\x7f"()<>,;:\[\]\\]')


def strict_address(text: str) -> str | None:
    """The lower-cased address, or None when it is not exactly one unambiguous address."""
    address = text.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if address.count("@") != 1 or _AMBIGUOUS.search(address):
        return None
    local, domain = address.split("@")
    if not local or not domain or domain.startswith(".") or domain.endswith(".") \
            or ".." in domain:
        return None
    return f"{local}@{domain}".lower()


def normalise_address(address: str) -> str:
    """Lower-case, trimmed, without angle brackets; '' for anything not one clear address."""
    return strict_address(address) or ""


def base_address(address: str) -> str:
    """The address without its plus tag: ``ann+crm@example.org`` -> ``ann@example.org``."""
    local, _, domain = address.partition("@")
    return f"{local.split('+', 1)[0]}@{domain}" if "+" in local[1:] else address


def address_keys(address: str) -> tuple[str, ...]:
    """What to look an address up by, most exact first: itself, then without its plus tag."""
    base = base_address(address)
    return (address,) if base == address else (address, base)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    name: str
    address: str
    mailbox: str | None
    forward: str | None
    track: str = "all"


@dataclass(frozen=True)
class PartyMatch:
    """A sender or recipient recognised as a contact or an account (``source`` where from)."""

    kind: PartyKind
    name: str
    source: str


class Directory:
    def __init__(self, settings: Settings) -> None:
        groups: tuple[tuple[PrincipalKind, Any], ...] = (
            ("user", settings.users), ("queue", settings.queues))
        self._principals = tuple(
            Principal(kind, p.name, normalise_address(p.address), p.mailbox, p.forward,
                      p.track)
            for kind, group in groups
            for p in group
        )
        self._forward_mailboxes = frozenset(b.name for b in settings.mailboxes if b.forward)
        self._parties: dict[str, PartyMatch] = {}
        self._account_domains: dict[str, PartyMatch] = {}
        for account in settings.accounts:
            match = PartyMatch("account", account.name, "config")
            for address in account.addresses:
                if (key := strict_address(address)) is not None:
                    self._parties.setdefault(key, match)
            for domain in account.domains:
                self._account_domains.setdefault(domain.strip().lower(), match)
        for contact in settings.contacts:
            for address in contact.addresses:
                if (key := strict_address(address)) is not None:
                    self._parties[key] = PartyMatch("contact", contact.name, "config")

    @property
    def principals(self) -> tuple[Principal, ...]:
        return self._principals

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

    def configured_party(self, address: str) -> PartyMatch | None:
        """The configured contact or account of a strict address (see :func:`strict_address`)."""
        for key in address_keys(address):
            if key in self._parties:
                return self._parties[key]
        return self._account_domains.get(domain_of(address))

    def principal_by_address(self, address: str) -> Principal | None:
        keys = address_keys(address)
        return next((p for p in self._principals if p.address in keys), None)

    def is_internal(self, address: str) -> bool:
        return self.principal_by_address(address) is not None
