"""``mailroute rules deploy | check | remove``: the forwarding rules in users' mailboxes.

Takes the settings (users and queues with ``forward`` and a ``rule``, the ``rule_servers``)
and ``--user`` names to limit the run; gives a table, user by user (user, server, outcome,
detail), on stdout, and a progress bar on stderr while it works.  Exit status 0 when all went
well; 1 when any user failed (deploy, remove) or, for check, any rule is missing or differs,
so that ``rules check`` can run from cron or a monitoring probe; 2 on a configuration problem.
Never prints a password: errors come from :class:`~ingest.forwarding_rules.RuleError`, whose
messages carry none.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from shared.cli_support import ConfigProblem, Context
from shared.settings import ConfigError

if TYPE_CHECKING:
    from ingest.rule_deploy import Action

DRY_RUN_OUTCOME = {"created": "would create", "changed": "would change",
                   "removed": "would remove"}

USER_OPTION = click.option(
    "--user", "users", multiple=True, metavar="NAME",
    help="Only this user or queue (repeatable). Default: every one with a rule.")


@click.group("rules")
def rules() -> None:
    """Forwarding rules in users' mailboxes, for users read through a forward mailbox.

    Each user or queue with "forward" and "rule: {server: NAME}" gets a rule that sends
    a copy of every incoming message to the forward mailbox: a Sieve script over ManageSieve
    (installed beside the user's own active script, never over it) or a Microsoft Graph
    message rule.  "deploy" writes what is missing or changed, "check" audits, "remove"
    takes mailroute's rules out and leaves the users' own as they were.
    """


@rules.command()
@click.option("--dry-run", is_flag=True, help="Inspect and show the plan; change nothing.")
@USER_OPTION
@click.pass_obj
def deploy(obj: Context, dry_run: bool, users: Sequence[str]) -> None:
    """Write each user's forwarding rule where it is missing or differs.

    Outcomes: created, present (already right, untouched), changed (was inactive, changed or
    forwarding elsewhere), failed (and why). Exit status 1 when any user failed.
    """
    _run(obj, "deploy", dry_run, users)


@rules.command()
@USER_OPTION
@click.pass_obj
def check(obj: Context, users: Sequence[str]) -> None:
    """Audit each user's forwarding rule without changing anything.

    Outcomes: present, missing, differs (inactive, changed, forwarding elsewhere, or the user
    activated another script), failed. Exit status 1 unless every rule is present.
    """
    _run(obj, "check", False, users)


@rules.command()
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
@USER_OPTION
@click.pass_obj
def remove(obj: Context, dry_run: bool, users: Sequence[str]) -> None:
    """Take mailroute's forwarding rules out, re-activating the users' own scripts.

    Outcomes: removed, absent (nothing of mailroute's was there), failed. Exit status 1 when
    any user failed.
    """
    _run(obj, "remove", dry_run, users)


def _run(obj: Context, action: Action, dry_run: bool, users: Sequence[str]) -> None:
    from ingest.forwarding_rules import rule_targets
    from ingest.rule_deploy import failed, run_rules

    settings = obj.load()
    try:
        targets = rule_targets(settings, frozenset(users))
    except ConfigError as exc:
        raise ConfigProblem(f"configuration: {exc}") from exc
    if not targets:
        click.echo("no user or queue has a forwarding rule (users.<name>.rule)")
        return
    with click.progressbar(length=len(targets), label=f"rules {action}", file=sys.stderr,
                           show_pos=True) as bar:
        reports = run_rules(action, targets, dry_run=dry_run,
                            on_report=lambda _report: bar.update(1))
    width = max(4, *(len(r.principal) for r in reports))
    server_width = max(6, *(len(r.server) for r in reports))
    click.echo(f"{'USER':<{width}}  {'SERVER':<{server_width}}  {'OUTCOME':<12}  DETAIL")
    for r in reports:
        outcome = DRY_RUN_OUTCOME.get(r.outcome, r.outcome) if r.dry_run else r.outcome
        click.echo(f"{r.principal:<{width}}  {r.server:<{server_width}}  {outcome:<12}  "
                   f"{r.detail}")
    counts = Counter(DRY_RUN_OUTCOME.get(r.outcome, r.outcome) if r.dry_run else r.outcome
                     for r in reports)
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    click.echo(f"{len(reports)} user(s): {summary}"
               + (" (dry run: nothing was changed)" if dry_run else ""))
    if failed(action, reports):
        raise SystemExit(1)
