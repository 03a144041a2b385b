"""``mailroute replay``: re-feed a stage from the journal, by time range and filters.

Takes the stage, ``--since``/``--until`` (ISO 8601 times, UTC unless they say otherwise, or
relative: ``2h``, ``30m``, ``7d`` ago) and optional ``--mailbox``, ``--message-id``,
``--user`` filters; publishes the matching journal entries to the stage's queue with a
progress bar and prints what it did, or with ``--dry-run`` what persist would change.  The
read position is saved in the database after every confirmed batch: the same request again
(the same absolute times; an interrupted run prints its command) resumes, ``--restart``
starts over.  A range that retention has dropped is reported as a
gap.  Exit status 2 on a bad option or configuration, 1 when RabbitMQ or the database cannot
be reached or there is no journal, 130 when interrupted (run it again to resume).
"""

from __future__ import annotations

import re
import shlex
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from shared.cli_support import ConfigProblem, Context, connect_or_fail, open_engine
from shared.topology import STAGES, Topology

RELATIVE = re.compile(r"^(\d+)([smhdw])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(value: str, now: datetime, option: str) -> datetime:
    """An ISO 8601 time (naive means UTC), ``now``, or a duration ago such as ``2h``."""
    value = value.strip()
    if value == "now":
        return now
    relative = RELATIVE.match(value)
    if relative:
        return now - timedelta(**{UNITS[relative.group(2)]: int(relative.group(1))})
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time, 'now' or a duration "
                                 "such as 2h, 30m, 7d", param_hint=option) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@click.command()
@click.option("--stage", required=True, type=click.Choice(list(STAGES)),
              help="The stage whose input is replayed (its queue receives the messages).")
@click.option("--since", required=True,
              help="Start of the range: ISO 8601 (UTC if no offset) or a duration ago (2h, 7d).")
@click.option("--until", default="now", show_default=True, help="End of the range, same forms.")
@click.option("--mailbox", help="Only messages fetched from this mailbox.")
@click.option("--message-id", help="Only this Message-ID (with or without <>).")
@click.option("--user", help="Only messages delivered to this user or queue (name or address).")
@click.option("--dry-run", is_flag=True,
              help="Publish nothing; show per message what persist would change.")
@click.option("--restart", is_flag=True, help="Ignore a saved position and start over.")
@click.pass_obj
def replay(obj: Context, stage: str, since: str, until: str, mailbox: str | None,
           message_id: str | None, user: str | None, dry_run: bool, restart: bool) -> None:
    """Re-feed STAGE's input from the journal for a time range.

    Persist is idempotent, so replaying creates no duplicate records; use it after fixing a
    bug in parse or route, or to rebuild what a stage produced.  Needs RabbitMQ (the journal
    is a stream) and the database (the read position; the dry run's comparison).
    """
    from persist.replay_state import ReplayPositionStore
    from persist.store import EmailStore
    from shared.journal import JournalError, JournalReader
    from shared.replay import Replayer, ReplayRequest, Simulator
    from shared.transport import Broker

    now = datetime.now(UTC)
    request = ReplayRequest(stage, parse_time(since, now, "--since"),
                            parse_time(until, now, "--until"), mailbox, message_id, user)
    if request.since >= request.until:
        raise click.BadParameter("--since must be before --until", param_hint="--since")
    settings = obj.load()
    if settings.broker.url.startswith("memory://"):
        raise ConfigProblem("replay: the journal is a RabbitMQ stream; the in-process broker "
                            "(memory://) keeps none. Set broker.url to RabbitMQ.")
    engine = connect_or_fail("database", lambda: open_engine(settings))
    topology = Topology(settings.broker.prefix)
    reader = connect_or_fail("broker", lambda: JournalReader(settings.broker.url, topology))
    publisher = None if dry_run else Broker(settings.broker).publisher()
    replayer = Replayer(settings, reader, publisher, ReplayPositionStore(engine),
                        Simulator(settings, EmailStore(engine)))
    bar = _LazyBar(f"replaying {stage}")

    try:
        report = replayer.run(request, dry_run=dry_run, restart=restart, progress=bar.update)
    except KeyboardInterrupt:
        click.echo(f"\nreplay interrupted; its position is saved. Resume with:\n"
                   f"  {resume_command(request)}", err=True)
        raise SystemExit(130) from None
    except JournalError as exc:
        raise click.ClickException(f"journal: {exc}") from exc
    finally:
        bar.close()
        reader.close()
        if publisher is not None:
            publisher.close()
    _print_report(report, request, dry_run)


def resume_command(request: Any) -> str:
    """The command line that repeats ``request`` exactly (absolute times, same filters)."""
    parts = ["mailroute", "replay", "--stage", request.stage,
             "--since", request.since.isoformat(), "--until", request.until.isoformat()]
    for option, value in (("--mailbox", request.mailbox), ("--message-id", request.message_id),
                          ("--user", request.user)):
        if value:
            parts += [option, shlex.quote(value)]
    return " ".join(parts)


class _LazyBar:
    """A click progress bar on stderr, made once the total (in journal offsets) is known."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._bar: Any = None
        self._pos = 0

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = click.progressbar(length=total, label=self._label,
                                          file=sys.stderr)
            self._bar.__enter__()
        self._bar.update(max(0, done - self._pos))
        self._pos = max(self._pos, done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _print_report(report: Any, request: Any, dry_run: bool) -> None:
    if report.gap is not None:
        click.echo(report.gap.describe(), err=True)
    if report.already_done:
        click.echo(f"this replay already completed ({report.published} message(s) re-fed); "
                   "--restart runs it again")
        return
    if report.resumed_from is not None:
        click.echo(f"resumed at journal offset {report.resumed_from}")
    if dry_run:
        for line in report.lines:
            click.echo(line)
        summary = ", ".join(f"{n} {what}" for what, n in sorted(report.outcomes.items()))
        click.echo(f"dry run: {report.matched} of {report.scanned} journal entries match; "
                   f"{summary or 'nothing would change'}; nothing was published")
        return
    click.echo(f"replayed {report.published} message(s) to the {request.stage} queue "
               f"({report.scanned} journal entries read)")
    click.echo(f"to run this exact replay again: {resume_command(request)} --restart")
