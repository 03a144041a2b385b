"""The operations page on the real RabbitMQ (a private vhost): queue backlog and dead letters
on the overview, the dead-letter page with reason, attempts and original headers, retry back
to the stage's queue and purge only with its confirmation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import Engine

from persist.database import create_engine_for, upgrade
from shared.dead_letters import DeadLetterQueue
from shared.schemas import Codec
from shared.secrets import Secret
from shared.settings import BrokerSettings, DatabaseSettings, Settings, WebSettings
from shared.transport import Broker, Envelope
from shared.web.app import create_app
from tests import documents
from tests.broker_fixtures import Vhost, drain_queue
from tests.test_web_app import csrf, text

pytestmark = pytest.mark.integration

TOKEN = "broker-test-admin-token-0001"
HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture
def settings(rabbit_vhost: Vhost, tmp_path: Path) -> Settings:
    return replace(Settings(), broker=BrokerSettings(url=rabbit_vhost.url, prefix="mail",
                                                     confirm_timeout=10),
                   database=DatabaseSettings(url=f"sqlite:///{tmp_path / 'm.db'}"),
                   web=WebSettings(admin_token=Secret(TOKEN)))


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = create_engine_for(settings.database.url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def app(settings: Settings, engine: Engine) -> Iterator[Flask]:
    app = create_app(settings, engine, sources=[])
    yield app
    app.extensions["mailroute"].close()


def dead_letter(stage: str, body: bytes, reason: str, attempts: int) -> Envelope:
    return Envelope(body, "mail", f"mail.{stage}.dead", {
        "x-mailroute-stage": stage, "x-mailroute-reason": reason,
        "x-mailroute-detail": "no such user", "x-mailroute-attempts": attempts,
        "x-mailroute-failed-at": datetime.now(UTC).isoformat(), "x-mailroute-trace": "t9"})


@pytest.fixture
def letters(settings: Settings) -> list[bytes]:
    """Two dead letters in route's dead-letter queue, one waiting message in parse's queue."""
    broker = Broker(settings.broker)
    broker.declare()
    codec = Codec()
    parsed = [documents.parsed(message_id=f"dead-{i}@example.org") for i in range(2)]
    parsed[1]["email"]["subject"] = HOSTILE
    bodies = [codec.encode("parsed", doc) for doc in parsed]
    publisher = broker.publisher()
    try:
        publisher.publish_envelopes(
            [dead_letter("route", b, "untrusted-forwarder", 3) for b in bodies]
            + [Envelope(codec.encode("raw", documents.raw()), "mail", "mail.parse", {})])
    finally:
        publisher.close()
    return bodies


def login(client: FlaskClient) -> None:
    token = csrf(text(client.get("/login")))
    assert client.post("/login", data={"token": TOKEN, "csrf_token": token}).status_code == 303


def rows(page: str) -> list[str]:
    return re.findall(r'<tr data-letter="([0-9a-f]+)">', page)


def test_the_overview_shows_backlog_and_dead_letters_per_queue(
        app: Flask, letters: list[bytes]) -> None:
    client = app.test_client()
    page = text(client.get("/"))
    parse = re.search(r'<tr data-queue="mail.parse">.*?</tr>', page, re.S)
    route = re.search(r'<tr data-queue="mail.route">.*?</tr>', page, re.S)
    assert parse and '<td class="ready">1</td>' in parse.group(0)
    assert route and '<td class="ready">0</td>' in route.group(0)
    assert re.search(r'<td class="dead"><a [^>]*>2</a></td>', route.group(0))
    queues = {q["name"]: q for q in client.get("/api/overview").get_json()["queues"]}
    assert (queues["mail.route"]["dead"], queues["mail.parse"]["ready"]) == (2, 1)


def test_dead_letters_are_listed_with_reason_attempts_and_headers_and_read_only(
        app: Flask, letters: list[bytes]) -> None:
    client = app.test_client()
    page = text(client.get("/dead"))
    section = re.search(r'<section class="stage-letters" data-stage="route".*?</section>',
                        page, re.S)
    assert section
    assert len(rows(section.group(0))) == 2
    assert section.group(0).count('<td class="attempts">3</td>') == 2
    assert "untrusted-forwarder" in section.group(0) and "no such user" in section.group(0)
    assert "<dt>From</dt><dd>ann@example.org</dd>" in section.group(0)
    assert "<dd>&lt;dead-0@example.org&gt;</dd>" in section.group(0)
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and HOSTILE not in page
    assert "action-retry" not in page and "action-purge" not in page
    assert len(rows(text(client.get("/dead")))) == 2  # looking takes nothing away


def test_retry_from_the_page_puts_a_dead_letter_back_and_purge_needs_its_confirmation(
        app: Flask, settings: Settings, letters: list[bytes]) -> None:
    client = app.test_client()
    login(client)
    page = text(client.get("/dead"))
    assert page.count('class="action-retry inline"') == 2
    assert page.count('class="action-purge"') == 1  # only route has dead letters
    first, second = rows(page)
    token = csrf(page)
    retried = text(client.post("/dead/route/retry", data={"csrf_token": token, "ids": first},
                               follow_redirects=True))
    assert 'class="flash flash-ok"' in retried and "1 dead letter(s) retried" in retried
    assert rows(retried) == [second]
    queue = DeadLetterQueue(settings.broker.url, Broker(settings.broker).topology, "route")
    assert [d.id for d in queue.browse()] == [second]
    back = drain_queue(settings.broker.url, "mail.route")
    assert len(back) == 1 and back[0][0] in letters

    again = text(client.post("/dead/route/retry", data={"csrf_token": token, "ids": first},
                             follow_redirects=True))
    assert 'class="flash flash-error"' in again and "not found" in again

    refused = text(client.post("/dead/route/purge", data={"csrf_token": token},
                               follow_redirects=True))
    assert 'class="flash flash-error"' in refused and "nothing purged" in refused
    assert rows(refused) == [second]
    purged = text(client.post("/dead/route/purge", data={"csrf_token": token,
                                                         "confirm": "yes"},
                              follow_redirects=True))
    assert 'class="flash flash-ok"' in purged and "1 dead letter(s) purged" in purged
    assert rows(purged) == [] and queue.browse() == []
    assert client.post("/dead/nowhere/purge", data={"csrf_token": token, "confirm": "yes"}
                       ).status_code == 404


def test_an_unreachable_broker_is_said_on_the_page_not_a_failure(
        engine: Engine, settings: Settings) -> None:
    closed = replace(settings, broker=replace(settings.broker,
                                              url="amqp://guest:guest@127.0.0.1:1/%2F"))
    client = create_app(closed, engine, sources=[]).test_client()
    for path in ("/", "/dead"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert "broker not reachable" in text(response)
        assert "guest:guest" not in text(response)
