"""A worker's start: which failures are waited for, and the wait itself (shared/cli_support.py).

The classification is checked on errors the real servers give (a closed port, the shared
PostgreSQL and RabbitMQ asked for what they do not have) and, for states a test cannot
cheaply put a server in (starting up, shutting down, full), on the drivers' own exception
types with the servers' own words.  The wait loop runs on an injected clock and stop event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import click
import psycopg
import pytest
from amqp.exceptions import ConnectionForced

from persist.database import create_engine_for, upgrade
from shared.cli_support import connect_patiently, unreachable_reason
from shared.settings import BrokerSettings, RetrySettings
from shared.transport import Broker
from tests.db_fixtures import postgres_admin_url

CLOSED_PORT = 1  # nothing listens on tcpmux


def failure(action: Callable[[], object]) -> Exception:
    try:
        action()
    except Exception as exc:
        return exc
    raise AssertionError("expected a failure")


def database_failure(url: str) -> Exception:
    return failure(lambda: upgrade(create_engine_for(url)))


def broker_failure(url: str) -> Exception:
    return failure(Broker(BrokerSettings(url=url)).declare)


# -- classification ----------------------------------------------------------------------
def test_a_closed_port_is_waited_for_on_either_server() -> None:
    assert unreachable_reason(database_failure(
        f"postgresql+psycopg://postgres@127.0.0.1:{CLOSED_PORT}/x")) == "connection refused"
    assert unreachable_reason(broker_failure(
        f"amqp://guest:guest@127.0.0.1:{CLOSED_PORT}//")) == "connection refused"


@pytest.mark.integration
def test_a_server_that_answers_no_is_not_waited_for() -> None:
    admin = postgres_admin_url()
    for url in (admin.set(database="mailroute_no_such_database"),
                admin.set(username="mailroute_no_such_role")):
        error = database_failure(url.render_as_string(hide_password=False))
        assert unreachable_reason(error) is None, error
    for broker_url in ("amqp://guest:wrong-password@127.0.0.1:5672/%2F",
                       "amqp://guest:guest@127.0.0.1:5672/mailroute-no-such-vhost"):
        error = broker_failure(broker_url)
        assert unreachable_reason(error) is None, error


def test_bad_urls_and_unknown_hosts_are_not_waited_for() -> None:
    for url in ("not a url", "postgresql+nosuchdriver://x@y/z",
                "postgresql+psycopg://postgres@no-such-host.invalid:5432/x"):
        assert unreachable_reason(database_failure(url)) is None, url
    assert unreachable_reason(broker_failure("nosuchtransport://x")) is None
    assert unreachable_reason(broker_failure("amqp://guest:guest@no-such-host.invalid//")) \
        is None


@pytest.mark.parametrize(("error", "reason"), [
    (psycopg.OperationalError('connection failed: connection to server at "10.0.0.5", port '
                              "5432 failed: FATAL:  the database system is starting up"),
     "server starting up"),
    (psycopg.OperationalError("connection failed: FATAL:  the database system is shutting "
                              "down"), "server shutting down"),
    (psycopg.OperationalError("connection failed: FATAL:  sorry, too many clients already"),
     "too many connections"),
    (psycopg.OperationalError("connection timeout expired"), "timed out"),
    (psycopg.OperationalError("failed to resolve host 'db': [Errno -3] Temporary failure in "
                              "name resolution"), "name server not answering"),
    (psycopg.OperationalError("consuming input failed: server closed the connection "
                              "unexpectedly"), "connection closed by the server"),
    (TimeoutError("timed out"), "timed out"),  # what socket.timeout is
    (OSError("Server unexpectedly closed connection"), "connection closed by the server"),
    (ConnectionForced("CONNECTION_FORCED - broker forced connection closure with reason "
                      "'shutdown'"), "broker shutting down"),
    (psycopg.OperationalError("connection failed: FATAL:  password authentication failed "
                              'for user "mailroute"'), None),
    (psycopg.OperationalError("connection failed: SSL error: certificate verify failed"), None),
])
def test_passing_states_are_told_from_refusals(error: Exception, reason: str | None) -> None:
    assert unreachable_reason(error) == reason


def test_the_reason_is_found_under_the_wrappers() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as inner:
            raise RuntimeError("database unavailable") from inner
    except RuntimeError as outer:
        assert unreachable_reason(outer) == "connection refused"
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError:
            raise PermissionError("access denied") from None  # raised while handling it
    except PermissionError as other:
        assert unreachable_reason(other) is None


# -- the wait ------------------------------------------------------------------------------
class FakeTime(threading.Event):
    """A clock and a stop event in one: waiting moves the clock; ``stop_after`` waits stop."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.now = 1000.0
        self.waits: list[float] = []
        self.stop_after = stop_after

    def clock(self) -> float:
        return self.now

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        self.now += timeout
        if self.stop_after is not None and len(self.waits) >= self.stop_after:
            self.set()
        return self.is_set()


RETRY = RetrySettings(initial_delay=1.0, max_delay=8.0, startup_wait=20.0)
URL = "postgresql+psycopg://mailroute:s3cret@db.example.com:5432/mailroute"


class Refusing:
    """A connect that is refused ``times`` times, then gives ``then``."""

    def __init__(self, times: int, then: object = "engine") -> None:
        self.times = times
        self.then = then
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        if self.calls <= self.times:
            raise ConnectionRefusedError(111, "Connection refused")
        return self.then


def test_waits_with_the_retry_backoff_and_one_warning_per_attempt(
        caplog: pytest.LogCaptureFixture) -> None:
    time = FakeTime()
    with caplog.at_level(logging.WARNING, logger="mailroute"):
        got = connect_patiently("database", URL, Refusing(3), RETRY, time, time.clock,
                                rng=lambda: 1.0)
    assert got == "engine"
    assert time.waits == [1.0, 2.0, 4.0]
    assert [r.getMessage() for r in caplog.records] == [
        f"database postgresql+psycopg://mailroute:***@db.example.com:5432/mailroute "
        f"unreachable (connection refused); retrying in {d:.1f}s" for d in (1.0, 2.0, 4.0)]


def test_gives_up_after_startup_wait_with_the_error_of_the_last_attempt() -> None:
    time = FakeTime()
    with pytest.raises(click.ClickException) as raised:
        connect_patiently("database", URL, Refusing(100), RETRY, time, time.clock,
                          rng=lambda: 1.0)
    # 1 + 2 + 4 + 8 = 15 s, then the 5 s left: one last attempt at the deadline
    assert time.waits == [1.0, 2.0, 4.0, 8.0, 5.0]
    assert raised.value.exit_code == 1
    assert raised.value.message == ("database: [Errno 111] Connection refused (still "
                                    "unreachable after 20s, retry.startup_wait)")


def test_a_refusal_fails_at_once() -> None:
    time = FakeTime()

    def refuse() -> None:
        raise psycopg.OperationalError('connection failed: FATAL:  database "x" does not exist')

    with pytest.raises(click.ClickException) as raised:
        connect_patiently("database", URL, refuse, RETRY, time, time.clock)
    assert time.waits == []
    assert raised.value.message == 'database: connection failed: FATAL:  database "x" does ' \
                                   "not exist"


def test_startup_wait_0_fails_at_once_as_before() -> None:
    time = FakeTime()
    with pytest.raises(click.ClickException) as raised:
        connect_patiently("broker", "amqp://guest:guest@rabbit//", Refusing(1),
                          RetrySettings(startup_wait=0), time, time.clock)
    assert time.waits == []
    assert raised.value.message == "broker: [Errno 111] Connection refused"


def test_a_stop_while_waiting_ends_the_wait_without_another_attempt() -> None:
    time = FakeTime(stop_after=2)
    action = Refusing(100)
    assert connect_patiently("broker", "amqp://rabbit//", action, RETRY, time, time.clock,
                             rng=lambda: 1.0) is None
    assert (len(time.waits), action.calls) == (2, 2)  # no attempt after the stop
