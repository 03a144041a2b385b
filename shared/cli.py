"""The ``mailroute`` command: the entry point that loads the settings once and wires stages.

Takes the command line (and ``MAILROUTE_CONFIG`` / ``MAILROUTE_*`` from the environment); runs
all four stages in one process (``run``, with the operations page), one stage per process
(``worker STAGE``), the database migrations (``db upgrade``) or prints the fleet's state
(``status``); the operations page alone is ``web`` (shared/cli_web.py).  Fails with a
one-line error naming the problem and exit status 2 on a bad configuration, 1 when a server
it needs cannot be reached (``run``, ``worker`` and ``web`` first wait ``retry.startup_wait``
seconds for one that is only down); never with a traceback for those.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from shared.cli_canary import canary, canary_lines
from shared.cli_dead import dead
from shared.cli_directory import directory
from shared.cli_emails import emails
from shared.cli_mailbox import fleet_lines, mailbox, secret
from shared.cli_parse import parse_command
from shared.cli_replay import replay
from shared.cli_rules import rules
from shared.cli_support import (
    Context,
    MailrouteGroup,
    connect_or_fail,
    connect_patiently,
    open_engine,
    safe_url,
    stop_on_signals,
)
from shared.cli_web import WebServer, web
from shared.metrics import Metrics, MetricsServer
from shared.queue_metrics import watch_queue_depths
from shared.runtime import StageRunner
from shared.settings import Settings
from shared.topology import STAGES
from shared.transport import Broker

log = logging.getLogger("mailroute")

STAGE_PORT_OFFSET = {"ingest": 0, "parse": 1, "route": 2, "persist": 3}


@click.group(cls=MailrouteGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", envvar="MAILROUTE_CONFIG", type=click.Path(dir_okay=False),
              help="YAML configuration file (env MAILROUTE_CONFIG). Without it: embedded "
                   "defaults (memory broker, SQLite under ./var). Any key can be overridden "
                   "with MAILROUTE_SECTION__KEY, e.g. MAILROUTE_DATABASE__URL.")
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """mailroute: turn incoming email into records for the right user or queue.

    Mail flows ingest -> parse -> route -> persist through broker queues; each stage can run
    in its own process (``worker``) or all together (``run``).
    """
    ctx.obj = Context(config)


# -- building the stages -------------------------------------------------------------------
def _build_consumer_stage(name: str, settings: Settings, engine: Any,
                          metrics: Metrics | None = None) -> Any:
    if name == "parse":
        from parse.worker import ParseStage

        return ParseStage(settings.limits)
    if name == "route":
        from persist.history import SqlHistory
        from route.forwarding import ForwardPolicy
        from route.router import Router
        from route.worker import RouteStage

        return RouteStage(Router(settings, history=SqlHistory(engine),
                                 forwarding=ForwardPolicy(settings)), metrics=metrics)
    from persist.blobs import blob_store_for
    from persist.canaries import CanaryStore
    from persist.directory_store import DirectoryStore
    from persist.store import EmailStore
    from persist.worker import PersistStage

    DirectoryStore(engine).sync_config(settings)
    return PersistStage(EmailStore(
        engine, blobs=blob_store_for(settings.attachments),
        create_unknown_contacts=settings.directory.create_unknown_contacts),
        canaries=CanaryStore(engine), metrics=metrics)


def _ingest_target(settings: Settings, broker: Broker, engine: Any, metrics: Metrics,
                   stop: threading.Event) -> Callable[[], None]:
    from ingest.fleet import FleetPoller
    from persist.mailbox_leases import LeaseStore
    from persist.mailbox_state import MailboxStateStore

    poller = FleetPoller(settings, broker.publisher, MailboxStateStore(engine),
                         LeaseStore(engine), metrics)
    if not settings.canaries.enabled:
        return lambda: poller.run(stop)
    from ingest.canary import CanaryService
    from persist.canaries import CanaryStore

    canaries = CanaryService(settings, CanaryStore(engine), metrics)

    def poll_and_send_canaries() -> None:
        sender = threading.Thread(target=canaries.run, args=(stop,), name="canaries",
                                  daemon=True)
        sender.start()
        try:
            poller.run(stop)
        finally:
            stop.set()
            sender.join(timeout=60)

    return poll_and_send_canaries


def _metrics_server(settings: Settings, metrics: Metrics, offset: int,
                    readiness: Callable[[], list[bool]]) -> MetricsServer | None:
    base = settings.metrics.base_port
    if base < 0:
        return None
    port = 0 if base == 0 else base + offset
    try:
        server = MetricsServer(metrics, settings.metrics.host, port, readiness).start()
    except OSError as exc:
        raise click.ClickException(
            f"metrics: cannot listen on {settings.metrics.host}:{port} ({exc.strerror}); "
            "set metrics.base_port (MAILROUTE_METRICS__BASE_PORT), 0 for any free port"
        ) from exc
    click.echo(f"metrics: http://{server.host}:{server.port}/metrics "
               f"(health /healthz, readiness /readyz)")
    return server


def _run_threads(targets: dict[str, Callable[[], None]], stop: threading.Event) -> None:
    # What start-up made (modules, settings, the stages and their clients) lives as long as
    # the process: left to the collector, each full pass walked it all and stalled a worker
    # for 40-150 ms (the pipeline's p99 at 300 msg/s; bench/README.md).
    gc.freeze()
    threads = [threading.Thread(target=t, name=name, daemon=True)
               for name, t in targets.items()]
    for thread in threads:
        thread.start()
    try:
        while not stop.wait(0.5):
            dead = [t.name for t in threads if not t.is_alive()]
            if dead:
                log.error("stage thread(s) ended unexpectedly: %s; stopping", ", ".join(dead))
                stop.set()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


# -- commands ------------------------------------------------------------------------------
@main.command()
@click.pass_obj
def run(obj: Context) -> None:
    """Run all four stages in this process until Ctrl-C (the embedded default).

    Applies database migrations, declares the queues, polls every configured mailbox and
    prints a line whenever new records are created.  Serves the operations page too (its
    address is printed; web.enabled: false turns it off).  A PostgreSQL or RabbitMQ that is
    unreachable at start is waited for, as by ``worker``, up to retry.startup_wait seconds.
    """
    settings = obj.load()
    # Handlers first: a SIGTERM while connecting is a clean stop, not death by signal.
    with stop_on_signals() as stop:
        engine = connect_patiently("database", settings.database.url,
                                   lambda: open_engine(settings), settings.retry, stop)
        broker = Broker(settings.broker)
        if engine is not None:
            connect_patiently("broker", settings.broker.url, broker.declare, settings.retry,
                              stop)
        if not stop.is_set():
            _run_stages(settings, engine, broker, stop)
    click.echo("mailroute stopped")


def _run_stages(settings: Settings, engine: Any, broker: Broker,
                stop: threading.Event) -> None:
    """``run`` once its servers answer: every stage in a thread of this process."""
    metrics = Metrics()
    watch_queue_depths(metrics, settings.broker.url, settings.broker.prefix)
    runners: list[StageRunner] = []
    for name in STAGES:
        stage = _build_consumer_stage(name, settings, engine, metrics)
        runners.append(StageRunner(stage, settings, broker, metrics, stop))
    server = _metrics_server(settings, metrics, 0,
                             lambda: [r.is_ready for r in runners])
    page = _web_server(settings, engine, metrics)
    targets = {r.stage.name: r.run for r in runners}
    targets["ingest"] = _ingest_target(settings, broker, engine, metrics, stop)
    targets["report"] = _record_reporter(engine, stop)
    click.echo(f"mailroute running: broker {safe_url(settings.broker.url)}, database "
               f"{safe_url(settings.database.url)}, {len(settings.mailboxes)} mailbox(es): "
               f"{', '.join(b.name for b in settings.mailboxes) or 'none'}. Ctrl-C stops.")
    try:
        _run_threads(targets, stop)
    finally:
        if server:
            server.stop()
        if page:
            page.stop()


def _web_server(settings: Settings, engine: Any, metrics: Metrics) -> WebServer | None:
    """The operations page in this process, reading this process's own metrics."""
    if not settings.web.enabled:
        return None
    from shared.web.metrics_window import registry_source

    page = WebServer(settings, engine, settings.web.host, settings.web.port,
                     sources=[registry_source(metrics.registry)]).start()
    click.echo(f"mailroute web: {page.url}")
    return page


def _record_reporter(engine: Any, stop: threading.Event) -> Callable[[], None]:
    from persist.store import EmailStore

    store = EmailStore(engine)

    def report() -> None:
        last: dict[str, int] = {}
        while not stop.wait(1.0):
            try:
                counts = store.count_rows()
            except Exception:
                log.debug("record count failed", exc_info=True)
                continue
            if counts != last:
                click.echo("records: " + ", ".join(
                    f"{counts.get(k, 0)} {k}"
                    for k in ("emails", "deliveries", "queue_items", "attachments", "cases",
                              "contacts")))
                last = counts

    return report


@main.command()
@click.argument("stage", type=click.Choice(["ingest", *STAGES]))
@click.pass_obj
def worker(obj: Context, stage: str) -> None:
    """Run one STAGE in this process (start several for scale-out).

    Its metrics are served on metrics.base_port + 0/1/2/3 for ingest/parse/route/persist.
    A broker or database that is unreachable at start (refused, timed out, starting up) is
    waited for, up to retry.startup_wait seconds (not ready meanwhile); a server that refuses
    (wrong password, no such database) stops it at once.  SIGTERM finishes the current batch
    (or the waiting) and exits.
    """
    settings = obj.load()
    # Handlers first: a SIGTERM while connecting is a clean stop, not death by signal.
    with stop_on_signals() as stop:
        metrics = Metrics()
        # /healthz answers while the servers are waited for (a liveness probe must not kill
        # a patient worker); /readyz says not ready until the stage consumes.
        ready: list[Callable[[], bool]] = [lambda: False]
        server = _metrics_server(settings, metrics, STAGE_PORT_OFFSET[stage],
                                 lambda: [ready[0]()])
        try:
            broker = Broker(settings.broker)
            connect_patiently("broker", settings.broker.url, broker.declare, settings.retry,
                              stop)
            needs_db = stage in ("ingest", "route", "persist")  # route reads earlier mail
            engine = None
            if needs_db and not stop.is_set():
                engine = connect_patiently("database", settings.database.url,
                                           lambda: open_engine(settings), settings.retry, stop)
            if stop.is_set():
                return
            watch_queue_depths(metrics, settings.broker.url, settings.broker.prefix)
            if stage == "ingest":
                target = _ingest_target(settings, broker, engine, metrics, stop)
                ready[0] = lambda: True
            else:
                runner = StageRunner(_build_consumer_stage(stage, settings, engine, metrics),
                                     settings, broker, metrics, stop)
                target = runner.run
                ready[0] = lambda: runner.is_ready
            click.echo(f"mailroute worker {stage} running (pid {os.getpid()})")
            _run_threads({stage: target}, stop)
        finally:
            if server:
                server.stop()


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.pass_obj
def db_upgrade(obj: Context) -> None:
    """Apply every pending migration (safe to repeat)."""
    settings = obj.load()
    from persist.database import current_revision

    engine = connect_or_fail("database", lambda: open_engine(settings))
    click.echo(f"database {safe_url(settings.database.url)} at revision "
               f"{current_revision(engine)}")


@main.command()
@click.pass_obj
def status(obj: Context) -> None:
    """Show every mailbox with its last poll and outcome, the canaries, the queue depths."""
    settings = obj.load()
    from persist.mailbox_state import MailboxStateStore

    engine = connect_or_fail("database", lambda: open_engine(settings))
    for line in fleet_lines(settings, engine):
        click.echo(line)
    counts: dict[str, int] = {}
    for state in MailboxStateStore(engine).all_states():
        counts[state.status] = counts.get(state.status, 0) + 1
    click.echo(f"fleet: {len(settings.mailboxes)} mailbox(es); " + (", ".join(
        f"{n} {s}" for s, n in sorted(counts.items())) or "none polled yet"))
    lines = canary_lines(settings, engine)
    if lines:
        click.echo("")
        for line in lines:
            click.echo(line)
    broker = Broker(settings.broker)
    depths = connect_or_fail("broker", lambda: _queue_depths(broker))
    click.echo("")
    click.echo(f"{'QUEUE':<28} {'MESSAGES':>9} {'CONSUMERS':>9}")
    for name, (messages, consumers) in depths.items():
        click.echo(f"{name:<28} {messages:>9} {consumers:>9}")


def _queue_depths(broker: Broker) -> dict[str, tuple[int, int]]:
    depths = {}
    broker.declare()
    with broker.connect() as connection:
        channel = connection.channel()
        for stage in STAGES:
            for name in (broker.topology.input_queue(stage), broker.topology.dead_queue(stage)):
                _, messages, consumers = channel.queue_declare(queue=name, passive=True)
                depths[name] = (messages, consumers)
    return depths


# -- command groups from their own shared/cli_*.py modules (one add_command line each) ----
main.add_command(parse_command)
main.add_command(replay)
main.add_command(dead)
main.add_command(emails)
main.add_command(directory)
main.add_command(mailbox)
main.add_command(secret)
main.add_command(canary)
main.add_command(rules)
main.add_command(web)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

