"""Forwarding rules in users' mailboxes: the plan of ``mailroute rules`` and its backends' contract.

Takes the settings (users and queues with ``forward`` and a ``rule``, the ``rule_servers``) and
a backend per rule server kind (ManageSieve in :mod:`ingest.sieve_rules`, Microsoft Graph in
:mod:`ingest.graph_rules`); gives one :class:`RuleReport` per user for ``deploy``, ``check``
and ``remove``: what was found, what was done, and why it failed.  A failure with one user
(refused login, server down, a script the server rejects) is that user's report, never the end
of the run; a configuration problem is a ``ConfigError`` before anything is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from shared.secrets import Secret
from shared.settings import ConfigError, RuleServerSettings, Settings

# What a backend finds in one mailbox.
RuleState = Literal[
    "present",   # mailroute's rule is there, active, forwarding to the right address
    "missing",   # no rule of mailroute's
    "differs",   # a rule of mailroute's, but inactive or forwarding elsewhere / changed
]
# What a report says was done (or, with --dry-run, would be done).
Outcome = Literal[
    "created", "present", "changed",   # deploy
    "missing", "differs",              # check (present too)
    "removed", "absent",               # remove
    "failed",                          # any: detail says why
]


@dataclass(frozen=True)
class RuleTarget:
    """One user's mailbox on a rule server, and where its rule must forward to."""

    principal: str          # the user's or queue's name
    address: str            # the user's own address
    login: str              # login (ManageSieve) or user id / UPN (Graph)
    password: Secret | None  # the user's own password when the server has no admin login
    forward_address: str    # the forward mailbox's address
    server: RuleServerSettings
    # With canaries on: their sender.  The rule sends canaries to the forward mailbox only,
    # so that they do not pile up in the user's own mailbox.
    canary_sender: str | None = None


@dataclass(frozen=True)
class Inspection:
    state: RuleState
    detail: str = ""


@dataclass(frozen=True)
class RuleReport:
    principal: str
    server: str
    outcome: Outcome
    detail: str = ""
    dry_run: bool = False


class RuleError(Exception):
    """One mailbox's rule could not be read or written; the message says why (no secrets)."""


class RuleBackend(Protocol):
    """One rule server's protocol.  Every method may raise :class:`RuleError`."""

    def inspect(self, target: RuleTarget) -> Inspection: ...

    def install(self, target: RuleTarget) -> None:
        """Write (or rewrite) mailroute's rule, beside the user's own rules, and activate it."""

    def remove(self, target: RuleTarget) -> bool:
        """Take mailroute's rule out, leaving the user's own rules as they were; False if absent."""


def rule_targets(settings: Settings, only: frozenset[str] = frozenset()) -> list[RuleTarget]:
    """Every user and queue with a ``rule`` (those named in ``only``, when given)."""
    principals = [p for p in (*settings.users, *settings.queues) if p.rule is not None]
    unknown = only - {p.name for p in principals}
    if unknown:
        raise ConfigError(f"no user or queue with a forwarding rule named "
                          f"{', '.join(sorted(unknown))}")
    targets = []
    for p in principals:
        if only and p.name not in only:
            continue
        assert p.rule is not None and p.forward is not None
        box = settings.mailbox(p.forward)
        forward_address = box.address or box.username
        if not forward_address or "@" not in forward_address:
            raise ConfigError(f"mailboxes.{box.name}.address: the forward mailbox needs its "
                              "address, which the forwarding rules forward to")
        targets.append(RuleTarget(
            principal=p.name, address=p.address, login=p.rule.username or p.address,
            password=p.rule.password, forward_address=forward_address,
            server=settings.rule_server(p.rule.server),
            canary_sender=settings.canaries.sender if settings.canaries.enabled else None))
    return targets
