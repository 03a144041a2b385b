"""The operations page as a Flask application: overview, mailboxes, dead letters, emails.

Takes the settings, a migrated database engine and the workers' metric sources
(:func:`metric_sources`: the configured ``web.metrics_urls``, else the workers' default
ports, or an in-process registry under ``mailroute run``); gives a Flask app
(:func:`create_app`) that holds no state of its own: every page reads the database, the
broker and the metrics when it is asked for (:mod:`shared.web.data`), and the actions
(:mod:`shared.web.actions`) do what the CLI commands do.

Pages are server-rendered Jinja2 (autoescaped: subjects and addresses are hostile input); the
overview's numbers are refreshed by a small script polling ``/api/overview``.  Read-only
without a login; a login with ``web.admin_token`` allows the actions.  Every POST carries the
session's CSRF token (400 without it); an action without a login is 403.  Errors show an
error page, never a traceback (the exception goes to the log).  The element ids and classes
are the contract with the browser tests (``var/web-contract.md``; README "Operations page").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import (
    Flask,
    abort,
    flash,
    get_flashed_messages,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from shared.settings import Settings
from shared.topology import STAGES
from shared.web import actions, auth
from shared.web.data import DEAD_LETTERS_SHOWN, PageData, evidence_lines, original_headers
from shared.web.metrics_window import MetricsWindow, Source, url_source

log = logging.getLogger(__name__)

SESSION_HOURS = 8
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                           "frame-ancestors 'none'; base-uri 'none'")
WORKER_PORT_OFFSETS = (0, 1, 2, 3)  # ingest, parse, route, persist (shared/cli.py)


def metric_sources(settings: Settings) -> list[Source]:
    """The configured ``web.metrics_urls``, else each worker kind's default /metrics URL
    (none when metrics.base_port is 0, any free port, or negative, disabled)."""
    urls: Sequence[str] = settings.web.metrics_urls
    if not urls and settings.metrics.base_port > 0:
        host = settings.metrics.host if settings.metrics.host not in ("0.0.0.0", "::") \
            else "127.0.0.1"
        urls = [f"http://{host}:{settings.metrics.base_port + offset}/metrics"
                for offset in WORKER_PORT_OFFSETS]
    return [url_source(url) for url in urls]


def create_app(settings: Settings, engine: Any,
               sources: Sequence[Source] | None = None,
               throttle: auth.LoginThrottle | None = None) -> Flask:
    """The operations page over ``engine`` and the broker of ``settings``; ``sources`` are
    the workers' metrics (default: :func:`metric_sources`); ``throttle`` limits wrong admin
    tokens per client address (default: 5 in 5 minutes)."""
    throttle = throttle or auth.LoginThrottle()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=auth.session_key(settings.web.admin_token),
        SESSION_COOKIE_NAME="mailroute_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
        MAX_CONTENT_LENGTH=64 * 1024,
        TEMPLATES_AUTO_RELOAD=False,
    )
    data = PageData(settings, engine,
                    MetricsWindow(metric_sources(settings) if sources is None else sources))
    app.extensions["mailroute"] = data
    admin_possible = settings.web.admin_token is not None

    @app.context_processor
    def page_globals() -> dict[str, Any]:
        return {"is_admin": auth.is_admin(session), "admin_possible": admin_possible,
                "csrf_token": lambda: auth.csrf_token(session),
                "when": _when, "ago": _ago, "evidence_lines": evidence_lines,
                "original_headers": original_headers}

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        if request.endpoint != "static":
            response.headers["Cache-Control"] = "no-store"
        return response

    def require_csrf() -> None:
        if not auth.csrf_valid(session, request.form.get(auth.CSRF_FIELD)):
            abort(400, "the form's CSRF token is missing or does not match this session "
                       "(reload the page and try again)")

    def require_admin() -> None:
        if not auth.is_admin(session):
            abort(403, "an admin token is needed for this action: log in first"
                  if admin_possible else "actions are off: no web.admin_token is configured")
        require_csrf()

    def report(outcome: actions.Outcome) -> None:
        flash(outcome.message, "ok" if outcome.ok else "error")

    # -- pages -----------------------------------------------------------------------------
    @app.get("/")
    def overview() -> str:
        flow, backlog, stored = data.overview()
        return render_template("overview.html", page="overview", flow=flow, backlog=backlog,
                               stored=stored)

    @app.get("/api/overview")
    def overview_json() -> Response:
        flow, backlog, stored = data.overview()
        return jsonify({
            "stages": {name: {"per_minute": None if s.per_minute is None
                              else round(s.per_minute, 1), "total": s.total}
                       for name, s in flow.stages.items()},
            "queues": [{"name": q.name, "stage": q.stage, "ready": q.ready, "dead": q.dead,
                        "consumers": q.consumers} for q in backlog.rows],
            "queues_error": backlog.error,
            "latency_ms": {"p50": flow.latency_p50_ms, "p99": flow.latency_p99_ms,
                           "window": flow.latency_window, "count": flow.latency_count},
            "persisted_total": stored["total"],
            "persisted_last_minute": stored["last_minute"],
            "persisted_last_hour": stored["last_hour"],
            "metrics_sources": {"up": flow.sources_up, "of": flow.sources},
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        })

    @app.get("/mailboxes")
    def mailboxes() -> str:
        failing = request.args.get("failing") == "1"
        return render_template("mailboxes.html", page="mailboxes", failing=failing,
                               rows=data.mailboxes(failing_only=failing),
                               canaries=data.canaries(failing_only=failing))

    @app.post("/mailboxes/<path:name>/test")
    def mailbox_test(name: str) -> Response:
        require_admin()
        report(actions.mailbox_test(settings, _mailbox(settings, name)))
        return redirect(url_for("mailboxes"), 303)

    @app.post("/mailboxes/<path:name>/enable")
    def mailbox_enable(name: str) -> Response:
        require_admin()
        report(actions.mailbox_enable(settings, engine, _mailbox(settings, name)))
        return redirect(url_for("mailboxes"), 303)

    @app.get("/dead")
    def dead() -> str:
        return render_template("dead.html", page="dead", stages=data.dead_letters(),
                               shown_limit=DEAD_LETTERS_SHOWN)

    @app.post("/dead/<stage>/retry")
    def dead_retry(stage: str) -> Response:
        require_admin()
        _stage(stage)
        report(actions.retry_dead_letters(data, stage, request.form.getlist("ids")))
        return redirect(url_for("dead"), 303)

    @app.post("/dead/<stage>/purge")
    def dead_purge(stage: str) -> Response:
        require_admin()
        _stage(stage)
        ids = request.form.getlist("ids")
        if request.form.get("confirm") != "yes":
            report(actions.Outcome(False, f"nothing purged: tick the confirmation to drop "
                                          f"{'these' if ids else 'every'} dead letter(s) of "
                                          f"{stage}"))
            return redirect(url_for("dead"), 303)
        report(actions.purge_dead_letters(data, stage, ids or None))
        return redirect(url_for("dead"), 303)

    @app.get("/emails")
    def emails() -> str:
        query = request.args.get("q", "")[:500]
        return render_template("emails.html", page="emails", q=query,
                               rows=data.emails(query))

    @app.get("/emails/<int:email_id>")
    def email(email_id: int) -> str:
        found = data.email(email_id)
        if found is None:
            abort(404, f"no email with id {email_id}")
        return render_template("email.html", page="email", **found)

    # -- login -----------------------------------------------------------------------------
    @app.get("/login")
    def login_form() -> str:
        return render_template("login.html", page="login")

    @app.post("/login")
    def login() -> Response | tuple[str, int, dict[str, str]] | tuple[str, int]:
        require_csrf()
        client = request.remote_addr or "-"
        wait = throttle.wait_needed(client)
        if wait > 0:
            log.warning("web: logins from %s refused for %.0f s after repeated wrong admin "
                        "tokens", client, wait)
            flash(f"too many wrong tokens from this address: try again in {wait:.0f} s",
                  "error")
            return (render_template("login.html", page="login"), 429,
                    {"Retry-After": str(int(wait) + 1)})
        if not auth.token_matches(settings.web.admin_token, request.form.get("token", "")):
            log.warning("web: a login with a wrong admin token from %s", client)
            if admin_possible:
                throttle.failed(client)
            flash("wrong admin token" if admin_possible
                  else "no web.admin_token is configured: the page is read-only", "error")
            return render_template("login.html", page="login"), 403
        throttle.succeeded(client)
        session.clear()  # a fresh session (and CSRF token) for the admin
        session["admin"] = True
        session.permanent = True
        flash("logged in: actions are on", "ok")
        return redirect(url_for("overview"), 303)

    @app.route("/logout", methods=["GET", "POST"])
    def logout() -> Response:
        session.clear()
        flash("logged out", "ok")
        return redirect(url_for("overview"), 303)

    # -- errors ----------------------------------------------------------------------------
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[str, int]:
        return render_template("error.html", page="error", code=exc.code or 500,
                               title=exc.name, message=exc.description), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[str, int]:
        log.error("web: %s %s failed: %s: %s", request.method, request.path,
                  type(exc).__name__, _first_line(exc), exc_info=exc)
        return render_template(
            "error.html", page="error", code=500, title="Internal error",
            message="The page could not be made; the error is in the server's log. "
                    "Is the database reachable and the schema current "
                    "(mailroute db upgrade)?"), 500

    app.jinja_env.globals["get_flashed_messages"] = get_flashed_messages
    app.jinja_env.globals["STAGES"] = STAGES
    return app


def _mailbox(settings: Settings, name: str) -> Any:
    for box in settings.mailboxes:
        if box.name == name:
            return box
    abort(404, f"no mailbox named {name!r} in the configuration")


def _stage(stage: str) -> None:
    if stage not in STAGES:
        abort(404, f"no stage {stage!r} (stages with dead letters: {', '.join(STAGES)})")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "now"
    if seconds < 120:
        return f"in {seconds:.0f}s"
    return f"in {seconds / 60:.0f} min"
