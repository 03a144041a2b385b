"""What every ``mailroute`` command shares: the lazily loaded settings and the error exits.

Takes the ``--config`` path from the command line; gives the settings (loaded once, logging
configured), an upgraded database engine, and helpers that turn a configuration problem into
exit status 2 and an unreachable server into exit status 1, each with a one-line message.
:func:`connect_patiently` is how ``run``, ``web`` and ``worker`` start: a server that is only
unreachable (refused, timed out, starting up: :func:`unreachable_reason`) is waited for with
the ``retry`` backoff for up to ``retry.startup_wait`` seconds, one WARNING per attempt, until
the stop event (:func:`stop_on_signals`) is set; anything else (authentication, a missing
database, a bad URL, a migration it does not know) fails at once.  Command groups live in
their own ``shared/cli_*.py`` modules and are registered in ``shared/cli.py``.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from shared.errors import TransientError
from shared.logs import configure_logging
from shared.runtime import backoff_delay
from shared.settings import ConfigError, RetrySettings, Settings, load_settings

log = logging.getLogger("mailroute")
T = TypeVar("T")

# What psycopg/libpq, py-amqp and the socket layer say when a server is not there *yet*,
# lower case, with the short reason the start-up warning gives.  Only these are waited for;
# a server that answers "no" (wrong password, no such database or vhost, a TLS failure, a
# host name that does not exist) or a bad URL fails at once.
PASSING_FAILURES = (
    ("connection refused", "connection refused"),
    ("timeout expired", "timed out"),  # libpq's connect_timeout
    ("timed out", "timed out"),
    ("connection reset", "connection reset"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
    ("temporary failure in name resolution", "name server not answering"),
    ("closed the connection unexpectedly", "connection closed by the server"),  # libpq
    ("unexpectedly closed connection", "connection closed by the server"),  # py-amqp
    ("the database system is starting up", "server starting up"),
    ("the database system is not yet accepting connections", "server starting up"),
    ("the database system is in recovery mode", "server recovering"),
    ("the database system is shutting down", "server shutting down"),
    ("too many clients already", "too many connections"),
    ("remaining connection slots are reserved", "too many connections"),
    ("connection_forced", "broker shutting down"),
)


class ConfigProblem(click.ClickException):
    exit_code = 2


class MailrouteGroup(click.Group):
    """The command group: a database or connection failure that escapes a command becomes a
    one-line error (exit status 1), never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return super().invoke(ctx)
        except SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            raise click.ClickException(
                f"database: {type(cause).__name__}: {first_line} "
                "(is the schema current? mailroute db upgrade)") from exc
        except (ConnectionError, TransientError) as exc:
            # the stores report database trouble as TransientError("database unavailable: ...")
            raise click.ClickException(f"{exc} (is the server up and the schema current? "
                                       "mailroute db upgrade)") from exc


@dataclass
class Context:
    config: str | None
    settings: Settings | None = field(default=None)

    def load(self) -> Settings:
        if self.settings is None:
            try:
                self.settings = load_settings(self.config)
            except ConfigError as exc:
                raise ConfigProblem(f"configuration: {exc}") from exc
            configure_logging(self.settings.log_level, self.settings.log_format)
        return self.settings


def open_engine(settings: Settings) -> Any:
    """The database engine with every migration applied."""
    from persist.database import create_engine_for, upgrade

    engine = create_engine_for(settings.database.url)
    upgrade(engine)
    return engine


def connect_or_fail(what: str, action: Callable[[], Any]) -> Any:
    """Run ``action``; any failure becomes a one-line ``what: error`` and exit status 1."""
    try:
        return action()
    except Exception as exc:
        raise click.ClickException(f"{what}: {exc}") from exc


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from (not what it was raised while handling: an error
    raised after a refused connection is a different error)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's
        pending.extend((current.__cause__, orig if isinstance(orig, BaseException) else None))


def unreachable_reason(error: BaseException) -> str | None:
    """Why the server is unreachable, if ``error`` (or what it wraps) says only that; else
    None: an error waiting cannot fix."""
    for cause in _causes(error):
        text = str(cause).lower()
        for pattern, reason in PASSING_FAILURES:
            if pattern in text:
                return reason
    return None


def connect_patiently(what: str, url: str, action: Callable[[], T], retry: RetrySettings,
                      stop: threading.Event, clock: Callable[[], float] = time.monotonic,
                      rng: Callable[[], float] = random.random) -> T | None:
    """Run ``action`` until it works; None if ``stop`` was set while waiting to try again.

    A failure :func:`unreachable_reason` explains is retried after ``backoff_delay`` for up
    to ``retry.startup_wait`` seconds; any other failure, or the last one, is the one-line
    ``what: error`` with exit status 1 of :func:`connect_or_fail`.
    """
    deadline = clock() + retry.startup_wait
    attempt = 0
    while True:
        attempt += 1
        try:
            return action()
        except Exception as exc:
            reason = unreachable_reason(exc)
            remaining = deadline - clock()
            if reason is None or remaining <= 0:
                waited = f" (still unreachable after {retry.startup_wait:g}s, " \
                         "retry.startup_wait)" if reason and retry.startup_wait > 0 else ""
                raise click.ClickException(f"{what}: {exc}{waited}") from exc
            delay = min(backoff_delay(retry, attempt, rng), remaining)
            log.warning("%s %s unreachable (%s); retrying in %.1fs", what, safe_url(url),
                        reason, delay)
            if stop.wait(delay):
                log.info("stopped while waiting for the %s", what)
                return None


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event SIGTERM or SIGINT sets (a second one raises KeyboardInterrupt); the previous
    handlers are back afterwards."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("received %s: finishing the current batch, then stopping",
                 signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def safe_url(url: str) -> str:
    """The URL without its password, for printing."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
