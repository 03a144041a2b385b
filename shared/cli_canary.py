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
    from ingest.canary import canary_targets, format_time
    from persist.canaries import CanaryStore

    targets = canary_targets(settings)
    states = CanaryStore(engine).states([t.key for t in targets])
    lines = [f"{'CANARY FOR':<24} {'STATE':<8} {'LAST SENT':<20} {'LAST SEEN':<20} "
             f"{'ROUND TRIP':>10}  DETAIL"]
    bad = 0
    for target in targets:
        state = states[target.key]
        who = f"{target.principal_kind} {target.principal}"
        if state.latest is None:
            lines.append(f"{who:<24} {'-':<8} {'-':<20} {'-':<20} {'-':>10}  never")
            continue
        if state.state in ("missing", "failed"):
            bad += 1
        seen = state.last_seen
        roundtrip = f"{seen.roundtrip:.1f}s" if seen and seen.roundtrip is not None else "-"
        detail = _detail(state.state, state.verdict.detail if state.verdict else None,
                         settings.canaries.deadline)
        lines.append(f"{who:<24} {state.state:<8} {format_time(state.latest.sent_at):<20} "
                     f"{format_time(seen.seen_at if seen else None):<20} {roundtrip:>10}  "
                     f"{detail}")
    return lines, bad, any(state.latest is not None for state in states.values())


def _detail(state: str, detail: str | None, deadline: float) -> str:
    if state == "missing":
        return f"not seen within {deadline:.0f} s: check the forwarding rule"
    if state == "failed":
        return f"not sent: {detail or 'unknown error'}"[:160]
    if state == "waiting":
        return "first canary on its way"
    return ""
