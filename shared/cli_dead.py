"""``mailroute dead``: the dead letters of each stage: list, show, retry, purge.

Takes a stage (or every stage, for ``list``) and dead-letter ids as ``list`` prints them;
shows the reason, attempt count, time and the original message; ``retry`` puts messages back
at the stage they failed in (after you fixed the cause), ``purge`` drops them (asks first
unless ``--yes``).  Exit status 2 on a configuration problem (or the in-process broker, which
keeps no dead letters between runs), 1 when RabbitMQ cannot be reached.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import click

from shared.cli_support import ConfigProblem, Context, connect_or_fail
from shared.topology import STAGES, Topology

STAGE_CHOICE = click.Choice(list(STAGES))


def _queue(obj: Context, stage: str) -> Any:
    from shared.dead_letters import DeadLetterQueue

    settings = obj.load()
    if settings.broker.url.startswith("memory://"):
        raise ConfigProblem("dead: the in-process broker (memory://) keeps no dead letters "
                            "between runs; set broker.url to RabbitMQ")
    return DeadLetterQueue(settings.broker.url, Topology(settings.broker.prefix), stage)


@click.group()
def dead() -> None:
    """Dead letters per stage: list, show, retry, purge."""


@dead.command("list")
@click.option("--stage", type=STAGE_CHOICE, help="One stage (default: every stage).")
@click.option("--limit", default=1000, show_default=True, help="At most this many per stage.")
@click.pass_obj
def list_dead(obj: Context, stage: str | None, limit: int) -> None:
    """List dead letters: id, stage, time, reason, attempts, trace id, mailbox/uid, subject."""
    letters = []
    for name in [stage] if stage else list(STAGES):
        queue = _queue(obj, name)
        letters.extend(connect_or_fail("broker", functools.partial(queue.browse, limit)))
    click.echo(f"{'ID':<12} {'STAGE':<8} {'FAILED AT':<26} {'REASON':<26} {'TRIES':>5}  "
               f"{'TRACE':<32} MESSAGE")
    for d in letters:
        click.echo(f"{d.id:<12} {d.stage:<8} {d.failed_at[:26]:<26} {d.reason[:26]:<26} "
                   f"{d.attempts if d.attempts is not None else '-':>5}  "
                   f"{d.trace_id[:32]:<32} {d.summary()}")
    click.echo(f"{len(letters)} dead letter(s)")


@dead.command()
@click.argument("letter_id")
@click.option("--stage", type=STAGE_CHOICE, help="Where to look (default: every stage).")
@click.option("--full", is_flag=True, help="Do not shorten long values (bodies, raw mail).")
@click.pass_obj
def show(obj: Context, letter_id: str, stage: str | None, full: bool) -> None:
    """Show one dead letter: why it failed, and the original message."""
    for name in [stage] if stage else list(STAGES):
        queue = _queue(obj, name)
        letters = connect_or_fail("broker", functools.partial(queue.browse, 100_000))
        for d in letters:
            if d.id == letter_id:
                click.echo(f"id:        {d.id}\nstage:     {d.stage}\nreason:    {d.reason}\n"
                           f"detail:    {d.detail}\nattempts:  {d.attempts}\n"
                           f"failed at: {d.failed_at}\ntrace id:  {d.trace_id}\n"
                           f"message:")
                document = d.document()
                if document is None:
                    click.echo(d.body.decode("utf-8", "replace"))
                else:
                    click.echo(json.dumps(document if full else _shorten(document), indent=2,
                                          ensure_ascii=False))
                return
    raise click.ClickException(f"no dead letter with id {letter_id}")


def _shorten(value: Any, limit: int = 300) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... ({len(value)} characters; --full shows all)"
    if isinstance(value, dict):
        return {k: _shorten(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v, limit) for v in value]
    return value


@dead.command()
@click.option("--stage", type=STAGE_CHOICE, required=True)
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every dead letter of the stage.")
@click.pass_obj
def retry(obj: Context, stage: str, ids: tuple[str, ...], everything: bool) -> None:
    """Put dead letters (IDS, or --all) back into the queue of the stage they failed in."""
    if not ids and not everything:
        raise click.UsageError("give dead-letter ids (see `mailroute dead list`) or --all")
    queue = _queue(obj, stage)
    moved = connect_or_fail("broker", lambda: queue.retry(None if everything else ids))
    _report(moved, ids, "retried", f"to {queue.target}")


@dead.command()
@click.option("--stage", type=STAGE_CHOICE, required=True)
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every dead letter of the stage.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def purge(obj: Context, stage: str, ids: tuple[str, ...], everything: bool, yes: bool) -> None:
    """Drop dead letters (IDS, or --all) for good."""
    if not ids and not everything:
        raise click.UsageError("give dead-letter ids (see `mailroute dead list`) or --all")
    what = f"every dead letter of {stage}" if everything else f"{len(ids)} dead letter(s)"
    if not yes:
        click.confirm(f"drop {what}?", abort=True)
    queue = _queue(obj, stage)
    dropped = connect_or_fail("broker", lambda: queue.purge(None if everything else ids))
    _report(dropped, ids, "purged", "")


def _report(done: list[Any], ids: tuple[str, ...], verb: str, where: str) -> None:
    for d in done:
        click.echo(f"{verb} {d.id} ({d.reason}) {where}".rstrip())
    missing = sorted(set(ids) - {d.id for d in done})
    click.echo(f"{len(done)} dead letter(s) {verb}")
    if missing:
        raise click.ClickException(f"not found: {', '.join(missing)}")
