"""The operations page through Flask's test client over a real SQLite database (no browser).

Records are made by route and persist (tests.test_records_store.Pipeline); the metrics come
from a real prometheus registry.  Checks every page's contract elements, search, an email's
deliveries with their evidence, the admin token (no forms and 403 without it, a wrong token
refused), CSRF, escaping of a hostile subject, an error page without a traceback, and that no
page shows the admin token or a mailbox password.  The broker parts are in
tests/test_web_broker.py.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import Engine

from persist.database import create_engine_for, upgrade
from persist.mailbox_leases import LeaseStore
from persist.mailbox_state import MailboxStateStore
from shared.metrics import Metrics
from shared.settings import Settings, load_settings
from shared.web.app import create_app
from shared.web.auth import LoginThrottle
from shared.web.metrics_window import registry_source
from tests.mailgen import crm_mail as mail
from tests.processes import REPO
from tests.test_records_store import Pipeline

pytest_plugins = ["tests.db_fixtures"]

ADMIN_TOKEN = "web-admin-token-0123456789"
MAILBOX_PASSWORD = "imap-password-for-ann-42"
HOSTILE = "<script>alert('owned')</script> & \"quotes\""
HOSTILE_FILENAME = "<b>x</b>/invoice\u202efdp.exe"  # a path, markup, right-to-left override


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mailroute.yaml"
    path.write_text(yaml.safe_dump({
        "database": {"url": f"sqlite:///{tmp_path / 'm.db'}"},
        "attachments": {"path": str(tmp_path / "blobs")},
        "metrics": {"base_port": -1},
        "web": {"admin_token": ADMIN_TOKEN},
        # nothing listens on port 1: a test of this mailbox fails at once
        "servers": [{"name": "mail", "host": "127.0.0.1", "port": 1, "tls": "none",
                     "timeout": 5}],
        "mailboxes": [{"name": "ann", "kind": "imap", "server": "mail", "username": "ann",
                       "password": MAILBOX_PASSWORD},
                      {"name": "support", "kind": "maildir", "path": "support"}],
        "users": [{"name": "ann", "address": "ann@corp.example", "mailbox": "ann"}],
        "queues": [{"name": "support", "address": "support@corp.example",
                    "mailbox": "support"}],
        "rules": [{"name": "support case", "when": {"queue": "support"},
                   "then": {"create_case": True, "priority": "high"}}],
    }))
    (tmp_path / "support" / "new").mkdir(parents=True)
    (tmp_path / "support" / "cur").mkdir()
    (tmp_path / "support" / "tmp").mkdir()
    return path


@pytest.fixture
def settings(config: Path) -> Settings:
    return load_settings(config)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = create_engine_for(settings.database.url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def emails(engine: Engine, settings: Settings) -> dict[str, int]:
    return make_emails(engine, settings)


def make_emails(engine: Engine, settings: Settings) -> dict[str, int]:
    """Three emails: one to the support queue, a reply to it for ann, a hostile subject."""
    run = Pipeline(engine, settings)
    first = run(mail("order-17@customer.example"), "support")
    reply = run(mail("reply-17@customer.example", subject="Re: Order 17",
                     reply_to="order-17@customer.example", to="ann@corp.example"), "ann")
    hostile = run(mail("evil@else.example", sender="mallory@else.example", subject=HOSTILE,
                       attachments=((HOSTILE_FILENAME, b"%PDF"),)), "support")
    return {"first": first, "reply": reply, "hostile": hostile}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def app(settings: Settings, engine: Engine, metrics: Metrics) -> Flask:
    return create_app(settings, engine, sources=[registry_source(metrics.registry)])


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, "no CSRF token in the page"
    return found.group(1)


def login(client: FlaskClient, token: str = ADMIN_TOKEN) -> Any:
    page = client.get("/login").get_data(as_text=True)
    return client.post("/login", data={"token": token, "csrf_token": csrf(page)})


def text(response: Any) -> str:
    return str(response.get_data(as_text=True))


# -- pages -------------------------------------------------------------------------------------

def test_every_page_renders_with_the_contract_elements(
        client: FlaskClient, emails: dict[str, int], metrics: Metrics) -> None:
    metrics.messages_in.labels(stage="parse").inc(7)
    metrics.mailbox_fetched.labels(mailbox="ann").inc(5)
    pages = {"/": "overview", "/mailboxes": "mailboxes", "/dead": "dead", "/emails": "emails",
             f"/emails/{emails['first']}": "email", "/login": "login"}
    for path, name in pages.items():
        response = client.get(path)
        assert response.status_code == 200, path
        page = text(response)
        assert f'data-page="{name}"' in page
        for nav in ("nav-overview", "nav-mailboxes", "nav-dead", "nav-emails"):
            assert f'id="{nav}"' in page, (path, nav)

    overview = text(client.get("/"))
    for stage in ("ingest", "parse", "route", "persist"):
        assert f'<tr data-stage="{stage}">' in overview
    for queue in ("mail.parse", "mail.route", "mail.persist"):
        assert f'<tr data-queue="{queue}">' in overview
    assert re.search(r'<tr data-stage="parse">.*?<td class="total">7</td>', overview, re.S)
    assert re.search(r'<tr data-stage="ingest">.*?<td class="total">5</td>', overview, re.S)
    assert '<span id="processed-total">3</span>' in overview
    for element in ('id="latency-p50"', 'id="latency-p99"', 'id="latency"', 'class="rate"',
                    'class="ready"', 'class="dead"', "overview.js"):
        assert element in overview

    mailboxes = text(client.get("/mailboxes"))
    assert 'id="mailboxes"' in mailboxes and 'id="filter-failing"' in mailboxes
    for name in ("ann", "support"):
        row = re.search(rf'<tr data-mailbox="{name}".*?</tr>', mailboxes, re.S)
        assert row, name
        for cell in ("status", "last-success", "last-error", "failures", "next-poll",
                     "fetched"):
            assert f'class="{cell}"' in row.group(0), (name, cell)

    listing = text(client.get("/emails"))
    assert 'id="search"' in listing and 'name="q"' in listing
    assert [int(i) for i in re.findall(r'<tr data-email="(\d+)">', listing)] == sorted(
        emails.values(), reverse=True)
    assert listing.count('class="email-link"') == 3

    dead = text(client.get("/dead"))
    for stage in ("parse", "route", "persist"):
        assert f'data-stage="{stage}"' in dead
    assert "memory://" in dead  # says why there are none, rather than an empty list

    api = client.get("/api/overview").get_json()
    assert api["stages"]["parse"]["total"] == 7 and api["persisted_total"] == 3
    assert [q["name"] for q in api["queues"]] == ["mail.parse", "mail.route", "mail.persist"]
    assert set(api["latency_ms"]) >= {"p50", "p99"} and "generated_at" in api


def test_the_overview_json_gives_rates_and_latency_from_the_workers_metrics(
        client: FlaskClient, metrics: Metrics) -> None:
    first = client.get("/api/overview").get_json()
    assert first["stages"]["route"]["per_minute"] is None  # one reading: no rate yet
    for seconds in (0.2, 0.3, 0.4, 0.45):
        metrics.end_to_end_seconds.observe(seconds)
    metrics.end_to_end_seconds.observe(20)
    latency = client.get("/api/overview").get_json()["latency_ms"]
    assert latency["count"] == 5
    assert 250 <= latency["p50"] <= 500 and 10_000 <= latency["p99"] <= 30_000


def test_search_by_address_subject_and_message_id(
        db_engine: Engine, settings: Settings) -> None:
    """On SQLite and on PostgreSQL (the search is new SQL)."""
    emails = make_emails(db_engine, settings)
    client = create_app(settings, db_engine, sources=[]).test_client()

    def found(query: str) -> list[int]:
        page = text(client.get("/emails", query_string={"q": query}))
        return sorted(int(i) for i in re.findall(r'<tr data-email="(\d+)">', page))

    assert found("mallory@else.example") == [emails["hostile"]]  # sender
    assert found("ANN@corp.example") == [emails["reply"]]  # recipient, any case
    assert found("Order 17") == sorted([emails["first"], emails["reply"]])  # subject
    assert found("reply-17@customer.example") == [emails["reply"]]  # Message-ID
    assert found("<order-17@customer.example>") == [emails["first"]]
    assert found("100%_") == []  # LIKE wildcards are searched for, not obeyed
    assert found("nothing like this") == []


def test_an_email_shows_its_deliveries_and_why(
        db_engine: Engine, settings: Settings) -> None:
    emails = make_emails(db_engine, settings)
    client = create_app(settings, db_engine, sources=[]).test_client()
    page = text(client.get(f"/emails/{emails['reply']}"))
    assert "Re: Order 17" in page and "reply-17@customer.example" in page
    (row,) = re.findall(r'<tr class="delivery">.*?</tr>', page, re.S)
    cells = dict(re.findall(r'<td class="([a-z-]+)">(.*?)</td>', row, re.S))
    assert cells["mailbox"].startswith("ann")
    assert "user ann" in cells["principal"] and "ann@corp.example" in cells["principal"]
    assert cells["method"] == "direct"
    assert "<dt>" in cells["evidence"]  # the evidence's keys and values
    assert cells["correlation"].startswith("in-reply-to")
    assert f"email {emails['first']}" in cells["correlation"]
    queue_page = text(client.get(f"/emails/{emails['first']}"))
    assert re.search(r'<td class="rule">support case</td>', queue_page)
    assert "case " in queue_page and "support case" in queue_page
    assert client.get("/emails/999999").status_code == 404


def test_a_hostile_subject_is_escaped_everywhere(
        client: FlaskClient, emails: dict[str, int]) -> None:
    for path in ("/emails", f"/emails/{emails['hostile']}",
                 "/emails?q=" + urllib.parse.quote("<script>")):
        page = text(client.get(path))
        assert "&lt;script&gt;alert(" in page, path
        assert "<script>alert" not in page, path
    response = client.get("/")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]


def test_a_hostile_attachment_name_is_shown_sanitised_and_its_declared_form_escaped(
        client: FlaskClient, emails: dict[str, int]) -> None:
    page = text(client.get(f"/emails/{emails['hostile']}"))
    assert "<li>invoicefdp.exe (declared " in page  # directories and the override removed
    assert "\\u202e" in page  # the declared name's override shown as an escape
    assert "\u202e" not in page and "<b>x</b>" not in page


# -- token, CSRF, actions --------------------------------------------------------------------

def test_without_a_login_the_page_is_read_only(client: FlaskClient, engine: Engine) -> None:
    LeaseStore(engine).ensure(["ann"])
    LeaseStore(engine).disable("ann", "login refused")
    for path in ("/mailboxes", "/dead"):
        page = text(client.get(path))
        for form in ("action-test", "action-enable", "action-retry", "action-purge"):
            assert form not in page, (path, form)
    token = csrf(text(client.get("/login")))  # a real CSRF token does not make an admin
    for path in ("/mailboxes/ann/enable", "/mailboxes/ann/test", "/dead/route/retry",
                 "/dead/route/purge"):
        response = client.post(path, data={"csrf_token": token, "confirm": "yes",
                                           "ids": "x"})
        assert response.status_code == 403, path
        assert "admin token" in text(response)
    lease = LeaseStore(engine).get("ann")
    assert lease is not None and lease.disabled_reason == "login refused"  # nothing done


def test_a_wrong_token_is_refused_and_the_right_one_allows_the_actions(
        client: FlaskClient) -> None:
    refused = login(client, "not-the-token-but-long-enough")
    assert refused.status_code == 403 and "wrong admin token" in text(refused)
    assert "action-enable" not in text(client.get("/mailboxes"))
    assert login(client, "").status_code == 403
    accepted = login(client)
    assert accepted.status_code == 303
    cookie = accepted.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = text(client.get("/mailboxes"))
    assert page.count('class="action-test inline"') == 2
    assert page.count('class="action-enable inline"') == 2
    assert 'class="test"' in page and 'class="enable"' in page
    logged_out = client.post("/logout", data={"csrf_token": csrf(page)})
    assert logged_out.status_code == 303
    assert "action-enable" not in text(client.get("/mailboxes"))


def test_repeated_wrong_tokens_lock_that_address_out_for_a_while(
        settings: Settings, engine: Engine) -> None:
    now = [1000.0]
    throttle = LoginThrottle(max_failures=3, window=60, clock=lambda: now[0])
    client = create_app(settings, engine, sources=[], throttle=throttle).test_client()
    for _ in range(3):
        assert login(client, "guess-guess-guess-guess").status_code == 403
    locked = login(client)  # even the right token, while locked out
    assert locked.status_code == 429 and locked.headers["Retry-After"] == "61"
    assert "too many wrong tokens from this address" in text(locked)
    assert "action-enable" not in text(client.get("/mailboxes"))
    now[0] += 30
    assert login(client).status_code == 429
    now[0] += 31  # the first failure has left the window
    assert login(client).status_code == 303
    assert "action-enable" in text(client.get("/mailboxes"))
    # a right token cleared the count: one more wrong one is not a lock-out
    assert login(client, "guess-guess-guess-guess").status_code == 403
    assert login(client).status_code == 303


def test_the_throttle_forgets_the_quietest_addresses_first() -> None:
    now = [0.0]
    throttle = LoginThrottle(max_failures=1, window=60, max_addresses=2, clock=lambda: now[0])
    for address in ("a", "b", "c"):
        throttle.failed(address)
        now[0] += 1
    assert throttle.wait_needed("a") == 0  # forgotten
    assert throttle.wait_needed("b") == 58 and throttle.wait_needed("c") == 59


def test_a_post_without_the_sessions_csrf_token_is_refused(
        client: FlaskClient, engine: Engine) -> None:
    assert login(client).status_code == 303
    LeaseStore(engine).ensure(["ann"])
    LeaseStore(engine).disable("ann", "login refused")
    for data in ({}, {"csrf_token": "forged-token"}):
        response = client.post("/mailboxes/ann/enable", data=data)
        assert response.status_code == 400
        assert "CSRF" in text(response)
    lease = LeaseStore(engine).get("ann")
    assert lease is not None and lease.disabled_reason == "login refused"
    # the login form itself needs one too (login CSRF)
    assert client.post("/login", data={"token": ADMIN_TOKEN}).status_code == 400


def test_enable_and_test_a_mailbox_from_the_page(
        client: FlaskClient, engine: Engine) -> None:
    leases, states = LeaseStore(engine), MailboxStateStore(engine)
    leases.ensure(["ann", "support"])
    states.record_poll("ann", "INBOX", ok=False, error="LOGIN failed: authentication failed")
    leases.disable("ann", "the server refused the login")
    assert login(client).status_code == 303

    failing = text(client.get("/mailboxes?failing=1"))
    assert re.findall(r'<tr data-mailbox="([^"]+)"', failing) == ["ann"]
    assert "the server refused the login" in failing

    token = csrf(text(client.get("/mailboxes")))
    tested = client.post("/mailboxes/ann/test", data={"csrf_token": token},
                         follow_redirects=True)
    assert 'class="flash flash-error"' in text(tested)
    assert "test failed: ann:" in text(tested)
    tested = client.post("/mailboxes/support/test", data={"csrf_token": token},
                         follow_redirects=True)
    assert 'class="flash flash-ok"' in text(tested) and "ok: support: Maildir" in text(tested)

    enabled = client.post("/mailboxes/ann/enable", data={"csrf_token": token},
                          follow_redirects=True)
    assert 'class="flash flash-ok"' in text(enabled)
    assert "ann: enabled (was disabled: the server refused the login)" in text(enabled)
    lease = leases.get("ann")
    assert lease is not None and lease.disabled_reason is None
    row = re.search(r'<tr data-mailbox="ann".*?</tr>', text(enabled), re.S)
    assert row and "disabled" not in row.group(0)
    assert client.post("/mailboxes/nobody/enable",
                       data={"csrf_token": token}).status_code == 404


def test_an_error_shows_the_error_page_without_a_traceback(
        client: FlaskClient, engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    with engine.begin() as connection:  # a schema damaged by hand
        connection.exec_driver_sql("DROP TABLE mailbox_leases")
    response = client.get("/mailboxes")
    page = text(response)
    assert response.status_code == 500
    assert 'data-page="error"' in page and "the error is in the server&#39;s log" in page
    assert "Traceback" not in page and "mailbox_leases" not in page
    assert "no such table: mailbox_leases" in caplog.text  # the operator finds it in the log
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and 'data-page="error"' in text(missing)


def test_no_page_shows_the_admin_token_or_a_password(
        client: FlaskClient, emails: dict[str, int], engine: Engine) -> None:
    MailboxStateStore(engine).record_poll("ann", "INBOX", ok=False, error="LOGIN failed")
    paths = ["/", "/api/overview", "/mailboxes", "/mailboxes?failing=1", "/dead", "/emails",
             f"/emails/{emails['first']}", "/login", "/nope"]
    seen = [text(client.get(p)) for p in paths]
    assert login(client).status_code == 303
    token = csrf(text(client.get("/mailboxes")))
    seen += [text(client.post("/mailboxes/ann/test", data={"csrf_token": token},
                              follow_redirects=True))]
    seen += [text(client.get(p)) for p in paths]
    for page in seen:
        assert ADMIN_TOKEN not in page and MAILBOX_PASSWORD not in page


# -- the command -----------------------------------------------------------------------------

def test_mailroute_web_serves_the_page_and_prints_its_address(config: Path,
                                                              engine: Engine) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "--config", str(config), "web", "--port", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.fullmatch(r"mailroute web: (http://127\.0\.0\.1:(\d+)/)\n", line)
        assert found, line
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(found.group(1) + "mailboxes", timeout=30) as response:
            page = response.read().decode()
        assert response.status == 200 and '<tr data-mailbox="ann"' in page
        assert response.headers["Server"] == "mailroute"
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "mailroute web stopped" in out and "Traceback" not in err


def test_forwarding_users_canaries_show_on_the_mailboxes_page(tmp_path: Path) -> None:
    """bob's canary came through his rule, carol's did not: carol is listed as failing."""
    from datetime import UTC, datetime, timedelta

    from ingest.canary import canary_targets, new_canary_id
    from persist.canaries import CanaryStore

    path = tmp_path / "canaries.yaml"
    path.write_text(yaml.safe_dump({
        "database": {"url": f"sqlite:///{tmp_path / 'c.db'}"},
        "metrics": {"base_port": -1},
        "mailboxes": [{"name": "forward", "kind": "maildir", "path": "fwd", "forward": True,
                       "address": "forward@corp.example"}],
        "users": [{"name": name, "address": f"{name}@corp.example", "forward": "forward"}
                  for name in ("bob", "carol")],
        "canaries": {"enabled": True, "deadline": 60, "delivery_url": "lmtp://127.0.0.1:24",
                     "sender": "canary@corp.example"},
    }))
    settings = load_settings(path)
    engine = create_engine_for(settings.database.url)
    upgrade(engine)
    now = [datetime(2026, 11, 27, 12, 0, tzinfo=UTC)]
    store = CanaryStore(engine, lambda: now[0])
    targets = canary_targets(settings)
    sent = {c.principal: c for c in store.start_round(targets, 3600, 60, new_canary_id,
                                                      force=True)}
    for canary in sent.values():
        store.mark_sent(canary.id)
    now[0] += timedelta(seconds=2)
    store.mark_seen(sent["bob"].id, "user", "bob")
    now[0] += timedelta(seconds=120)
    assert [c.principal for c in store.expire()] == ["carol"]

    client = create_app(settings, engine, sources=[]).test_client()
    page = text(client.get("/mailboxes"))
    rows = dict(re.findall(r'<tr data-principal="([^"]+)" class="canary-([a-z]+)"', page))
    assert rows == {"bob": "ok", "carol": "missing"}
    carol = re.search(r'<tr data-principal="carol".*?</tr>', page, re.S)
    assert carol and "not seen within 60 s" in carol.group(0)
    assert "mailroute rules check --user carol" in carol.group(0)
    assert "2.0 s" in page  # bob's round trip
    failing = text(client.get("/mailboxes?failing=1"))
    assert re.findall(r'<tr data-principal="([^"]+)"', failing) == ["carol"]
    engine.dispose()
