"""``mailroute rules deploy | check | remove``: one report per user, over the rule backends.

Takes the :class:`~ingest.forwarding_rules.RuleTarget` s (from
:func:`~ingest.forwarding_rules.rule_targets`), an action, ``dry_run`` and a backend factory
(by default :func:`open_backend`: ManageSieve, or Microsoft Graph imported lazily); gives one
:class:`~ingest.forwarding_rules.RuleReport` per target, in order, passing each to
``on_report`` as it is made (for a progress bar).  Deploy inspects first and writes only what
is missing or differs; ``dry_run`` inspects and says what it would do, writing nothing.  A
failure with one user - a :class:`~ingest.forwarding_rules.RuleError`, a backend that cannot
be opened, even a bug in a backend - is that user's ``failed`` report and the run goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from ingest.forwarding_rules import RuleBackend, RuleError, RuleReport, RuleTarget
from shared.settings import RuleServerSettings

Action = Literal["deploy", "check", "remove"]
BackendFactory = Callable[[RuleServerSettings], Any]  # -> a RuleBackend with close()

log = logging.getLogger(__name__)


def open_backend(server: RuleServerSettings) -> RuleBackend:
    """The backend for a rule server's kind; RuleError when it is not available."""
    if server.kind == "managesieve":
        from ingest.sieve_rules import ManageSieveBackend

        return ManageSieveBackend(server)
    if server.kind == "graph":
        try:
            from ingest.graph_rules import GraphBackend  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise RuleError("graph backend not available") from exc
        backend: RuleBackend = GraphBackend(server)
        return backend
    raise RuleError(f"rule server {server.name!r}: unknown kind {server.kind!r}")


def run_rules(action: Action, targets: Sequence[RuleTarget], *, dry_run: bool = False,
              backend_for: BackendFactory = open_backend,
              on_report: Callable[[RuleReport], None] | None = None) -> list[RuleReport]:
    """Deploy, check or remove each target's rule; never raises for one user's failure."""
    backends: dict[str, Any] = {}  # server name -> backend, or the RuleError opening it
    reports = []
    try:
        for target in targets:
            report = _one(action, target, dry_run, backends, backend_for)
            reports.append(report)
            if on_report is not None:
                on_report(report)
    finally:
        for backend in backends.values():
            if not isinstance(backend, RuleError):
                _close(backend)
    return reports


def failed(action: Action, reports: Iterable[RuleReport]) -> bool:
    """True when the run should exit non-zero: a failure, or for check a rule not present."""
    bad = {"failed"} if action != "check" else {"failed", "missing", "differs"}
    return any(r.outcome in bad for r in reports)


def _one(action: Action, target: RuleTarget, dry_run: bool, backends: dict[str, Any],
         backend_for: BackendFactory) -> RuleReport:
    server = target.server.name

    def report(outcome: Any, detail: str = "") -> RuleReport:
        return RuleReport(principal=target.principal, server=server, outcome=outcome,
                          detail=detail, dry_run=dry_run and outcome not in ("failed",))

    try:
        if server not in backends:
            try:
                backends[server] = backend_for(target.server)
            except RuleError as exc:
                backends[server] = exc
        backend = backends[server]
        if isinstance(backend, RuleError):
            return report("failed", str(backend))
        return _act(action, backend, target, dry_run, report)
    except RuleError as exc:
        return report("failed", str(exc))
    except Exception as exc:  # a backend's bug must not end the run for the other users
        log.exception("rules %s: %s on %s failed unexpectedly", action, target.principal,
                      server)
        return report("failed", f"unexpected {type(exc).__name__}: {exc}")


def _act(action: Action, backend: Any, target: RuleTarget, dry_run: bool,
         report: Callable[..., RuleReport]) -> RuleReport:
    if action == "check":
        found = backend.inspect(target)
        return report(found.state, found.detail)
    if action == "deploy":
        found = backend.inspect(target)
        if found.state == "present":
            return report("present", found.detail)
        outcome = "created" if found.state == "missing" else "changed"
        detail = f"was: {found.detail}" if found.state == "differs" else ""
        if not dry_run:
            backend.install(target)
        return report(outcome, detail or f"forwards to {target.forward_address}")
    if dry_run:
        found = backend.inspect(target)
        if found.state == "missing":
            return report("absent", found.detail)
        return report("removed", found.detail)
    return report("removed") if backend.remove(target) else report("absent")


def _close(backend: Any) -> None:
    close = getattr(backend, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:  # closing is best effort; the reports are already made
        log.warning("rules: closing a rule backend failed", exc_info=True)
