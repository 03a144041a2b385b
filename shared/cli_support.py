"""What every ``mailroute`` command shares: the lazily loaded settings and the error exits.

Takes the ``--config`` path from the command line; gives the settings (loaded once, logging
configured), an upgraded database engine, and helpers that turn a configuration problem into
exit status 2 and an unreachable server into exit status 1, each with a one-line message.
Command groups live in their own ``shared/cli_*.py`` modules and are registered in
``shared/cli.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from shared.errors import TransientError
from shared.logs import configure_logging
from shared.settings import ConfigError, Settings, load_settings


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


def safe_url(url: str) -> str:
    """The URL without its password, for printing."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
