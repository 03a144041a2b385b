"""``mailroute web``: serve the operations page; also started by ``mailroute run``.

Takes the settings (``web`` section; ``--host``/``--port`` override it) and the database;
serves :func:`shared.web.app.create_app` with waitress (a production WSGI server: a pool of
threads, no debugger, handles slow clients itself; werkzeug's own server is meant for
development) and prints ``mailroute web: http://HOST:PORT/`` once it listens (``--port 0``
takes a free port and prints it).  Runs until Ctrl-C or SIGTERM.  Exit status 2 on a bad
configuration, 1 when the database cannot be reached (after waiting ``retry.startup_wait``
seconds for one that is only down) or the address cannot be bound.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

import click

from shared.cli_support import Context, connect_patiently, open_engine, stop_on_signals
from shared.settings import Settings

log = logging.getLogger(__name__)

WEB_THREADS = 6  # a mailbox test may hold one for the server's timeout


class WebServer:
    """The operations page served by waitress in a daemon thread (``mailroute run``)."""

    def __init__(self, settings: Settings, engine: Any, host: str, port: int,
                 sources: Sequence[Any] | None = None) -> None:
        from waitress import create_server

        from shared.web.app import create_app

        self.app = create_app(settings, engine, sources)
        try:
            self._server: Any = create_server(self.app, host=host, port=port,
                                              threads=WEB_THREADS, ident="mailroute")
        except OSError as exc:
            raise click.ClickException(
                f"web: cannot listen on {host}:{port} ({exc.strerror}); set web.port "
                "(MAILROUTE_WEB__PORT; 0 for any free port) or web.enabled: false") from exc
        self.host = host
        self.port = int(self._server.effective_port)
        self._thread = threading.Thread(target=self._serve, name="web", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def _serve(self) -> None:
        try:
            self._server.run()
        except Exception:
            log.exception("web: the server stopped")

    def start(self) -> WebServer:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.run()

    def stop(self) -> None:
        self._server.close()
        self.app.extensions["mailroute"].close()


def _stop_serving(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@click.command("web")
@click.option("--host", help="Address to listen on (default: web.host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535),
              help="Port (default: web.port, 8025; 0 takes any free port).")
@click.pass_obj
def web(obj: Context, host: str | None, port: int | None) -> None:
    """Serve the operations page: flow, mailboxes, dead letters and emails.

    Read-only without a login; with web.admin_token set, logging in with it allows testing
    and enabling mailboxes and retrying and purging dead letters.  A database that is
    unreachable at start is waited for up to retry.startup_wait seconds.
    """
    settings = obj.load()
    # Handlers first: a SIGTERM while waiting for the database is a clean stop.
    with stop_on_signals() as stop:
        engine = connect_patiently("database", settings.database.url,
                                   lambda: open_engine(settings), settings.retry, stop)
        if engine is not None and not stop.is_set():
            _serve(settings, engine, host, port, stop)
    click.echo("mailroute web stopped")


def _serve(settings: Settings, engine: Any, host: str | None, port: int | None,
           stop: threading.Event) -> None:
    """Serve in this thread until SIGTERM or SIGINT (which then end waitress's loop)."""
    server = WebServer(settings, engine, host or settings.web.host,
                       settings.web.port if port is None else port)
    previous = {s: signal.signal(s, _stop_serving) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if stop.is_set():  # a signal before the handlers above
            return
        click.echo(f"mailroute web: {server.url}")
        if settings.web.admin_token is None:
            click.echo("web: read-only (no web.admin_token configured)")
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        server.stop()
