"""``mailroute canary ...``: send canaries now and show whether each user's last one arrived.

Takes the settings (``--config``: ``canaries`` and the users and queues with ``forward``) and
the database; gives ``canary send [--user NAME]...`` (a canary to each now, printing its id)
and ``canary status`` (per user: state, last sent, last seen, round trip), plus
:func:`canary_lines` for ``mailroute status``.  Exit status 1 when a canary could not be sent
(``send``) or any user's canary is missing or failed (``status``), 2 on a configuration
problem (no ``delivery_url``, a name that does not forward); never prints a secret.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from shared.cli_support import ConfigProblem, Context, connect_or_fail, open_engine
from shared.settings import ConfigError, Settings


@click.group("canary")
def canary() -> None:
    """Canaries: marked test messages that check each user's forwarding rule.

    A canary is sent (over canaries.delivery_url) to every user and queue whose mail comes
    through a forward mailbox, and must come back through that forward mailbox within
    canaries.deadline seconds.  With canaries.enabled, `worker ingest` (and `run`) sends one
    per user every canaries.interval seconds and raises the user's alert (log line, metric
    mailroute_canary_missing) when one does not arrive.  Canaries never become records.
    """


@canary.command("send")
@click.option("--user", "users", multiple=True, metavar="NAME",
              help="Only this user or queue (repeat for several). Default: every one with "
                   "a forward mailbox.")
@click.pass_obj
def send(obj: Context, users: tuple[str, ...]) -> None:
    """Send a canary now (due or not) and print its id; exit 1 if any could not be sent.

    Whether it arrives shows later in `mailroute canary status` (the pipeline must be
    running to see it arrive).
    """
    from ingest.canary import CanaryService
    from persist.canaries import CanaryStore

    settings = obj.load()
    engine = connect_or_fail("database", lambda: open_engine(settings))
    service = CanaryService(settings, CanaryStore(engine))
    try:
        sent = service.send_now(frozenset(users))
    except ConfigError as exc:
        raise ConfigProblem(f"configuration: {exc}") from exc
    if not sent:
        click.echo("no user or queue has a forward mailbox: nothing to send")
    for item in sent:
        who = f"{item.principal_kind} {item.principal}"
        if item.outcome == "failed":
            click.echo(f"{item.id}  {who:<24} FAILED: {item.detail}")
        else:
            click.echo(f"{item.id}  {who:<24} sent to <{item.address}>, expected in forward "
                       f"mailbox {item.forward_mailbox} by "
                       f"{item.deadline_at.strftime('%H:%M:%S')} UTC")
    if any(item.outcome == "failed" for item in sent):
        sys.exit(1)


@canary.command("status")
@click.pass_obj
def status(obj: Context) -> None:
    """Each forwarding user's canaries: ok, missing, failed or waiting, last sent, last
    seen and round trip; exit 1 when any is missing or failed."""
    settings = obj.load()
    engine = connect_or_fail("database", lambda: open_engine(settings))
    lines, bad, _ = _table(settings, engine)
    for line in lines:
        click.echo(line)
    if bad:
        click.echo(f"{bad} user(s)/queue(s) whose canary did not come through: check their "
                   "forwarding rules (`mailroute rules check`)")
        sys.exit(1)


def canary_lines(settings: Settings, engine: Any) -> list[str]:
    """The canary table for ``mailroute status`` (empty when canaries are off and unused)."""
    lines, _, any_sent = _table(settings, engine)
    return lines if settings.canaries.enabled or any_sent else []


def _table(settings: Settings, engine: Any) -> tuple[list[str], int, bool]:
    """The lines, how many principals are missing or failed, whether any canary exists."""
    from ingest.canary import format_time
    from shared.fleet_ops import CANARY_FAILING, canary_rows

    rows = canary_rows(settings, engine)
    lines = [f"{'CANARY FOR':<24} {'STATE':<8} {'LAST SENT':<20} {'LAST SEEN':<20} "
             f"{'ROUND TRIP':>10}  DETAIL"]
    for row in rows:
        who = f"{row.principal_kind} {row.principal}"
        if row.state == "never":
            lines.append(f"{who:<24} {'-':<8} {'-':<20} {'-':<20} {'-':>10}  never")
            continue
        roundtrip = f"{row.roundtrip:.1f}s" if row.roundtrip is not None else "-"
        lines.append(f"{who:<24} {row.state:<8} {format_time(row.last_sent_at):<20} "
                     f"{format_time(row.last_seen_at):<20} {roundtrip:>10}  {row.detail}")
    bad = sum(row.state in CANARY_FAILING for row in rows)
    return lines, bad, any(row.state != "never" for row in rows)
