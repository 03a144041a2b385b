"""Workers, ``run`` and ``web`` started while PostgreSQL is down wait for it
(``retry.startup_wait``).

The server is this module's own (tests/faults/private_postgres.py), stopped before the
processes start.  They must say, once per attempt, what they wait for; workers answer
``/healthz`` but not ``/readyz`` meanwhile; they work once the server is up (migrating a fresh
database and recording every message exactly once; ``run`` and ``web`` then serve); stop
cleanly on SIGTERM while waiting; and not wait at all for a database that does not exist.
"""

from __future__ import annotations

import re
import secrets
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from persist.database import create_engine_for
from tests.broker_fixtures import Vhost
from tests.dovecot import DovecotServer
from tests.faults.harness import Pipeline
from tests.faults.private_postgres import PrivatePostgres
from tests.processes import Workers, wait_for

pytestmark = pytest.mark.integration

WAITING = "unreachable (connection refused); retrying in"


@pytest.fixture
def database_url(private_postgres: PrivatePostgres) -> Iterator[str]:
    """A fresh, empty database on the private server, which the test then stops; the
    server is running again afterwards (the other tests of the module share it)."""
    url = private_postgres.create_database(f"startup_{secrets.token_hex(4)}")
    try:
        yield url
    finally:
        if not private_postgres.running():
            private_postgres.start()


def log_of(workers: Workers, stage: str) -> str:
    return workers.log_path(stage).read_text(errors="replace")


def probe(workers: Workers, stage: str, path: str) -> int:
    """The HTTP status of ``path`` on ``stage``'s metrics port."""
    port = workers.metrics_port(stage)
    assert port is not None, log_of(workers, stage)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return error.code


def wait_until_waiting(workers: Workers, stage: str) -> None:
    wait_for(lambda: WAITING in log_of(workers, stage), f"{stage} to wait for the database",
             timeout=60, on_timeout=workers.logs)


def lone_worker(root: Path, broker_url: str, database_url: str) -> Workers:
    config = root / "mailroute.yaml"
    config.write_text(yaml.safe_dump({
        "broker": {"url": broker_url, "prefix": "mail"},
        "database": {"url": database_url},
        "retry": {"initial_delay": 0.05, "max_delay": 1.0, "startup_wait": 600},
        "metrics": {"base_port": 0},
        "web": {"port": 0},
    }))
    return Workers(config, root)


def start_run_and_web(workers: Workers) -> None:
    """``mailroute run`` (no mailboxes) and ``mailroute web``, logging to run.log, web.log."""
    workers.start_command("run", "run")
    workers.start_command("web", "web")


def test_workers_started_before_postgres_wait_for_it_then_record_everything_once(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, database_url: str,
        private_postgres: PrivatePostgres) -> None:
    engine = create_engine_for(database_url)  # not migrated: the first worker up does that
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine)
    pipeline.send("alice", "latedb", range(30))
    pipeline.send("dave", "latedb", range(30, 40))
    private_postgres.stop()
    try:
        pipeline.start()
        for stage in ("ingest", "route", "persist"):
            wait_until_waiting(pipeline.workers, stage)
            assert probe(pipeline.workers, stage, "/healthz") == 200
            assert probe(pipeline.workers, stage, "/readyz") == 503
            assert f"worker {stage} running" not in log_of(pipeline.workers, stage)
        log = log_of(pipeline.workers, "persist")
        assert f"database postgresql+psycopg://postgres@127.0.0.1:{private_postgres.port}/" \
               in log, log
        private_postgres.start()
        for stage in ("ingest", "route", "persist"):
            wait_for(lambda s=stage: probe(pipeline.workers, s, "/readyz") == 200,  # type: ignore[misc]
                     f"{stage} to be ready", on_timeout=pipeline.workers.logs)
        pipeline.wait_persisted()
        pipeline.assert_exactly_once()
    finally:
        codes = pipeline.stop()
        engine.dispose()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    pipeline.assert_no_dead_letters()


def test_run_and_web_started_before_postgres_wait_for_it_then_serve(
        tmp_path: Path, rabbit_vhost: Vhost, database_url: str,
        private_postgres: PrivatePostgres) -> None:
    private_postgres.stop()
    workers = lone_worker(tmp_path, rabbit_vhost.url, database_url)
    start_run_and_web(workers)
    try:
        for name in ("run", "web"):
            wait_until_waiting(workers, name)
        assert "mailroute running" not in log_of(workers, "run")
        assert "mailroute web:" not in log_of(workers, "web")
        private_postgres.start()
        wait_for(lambda: "mailroute running: broker amqp://" in log_of(workers, "run"),
                 "run to start its stages", on_timeout=workers.logs)
        wait_for(lambda: "mailroute web: http://" in log_of(workers, "web"),
                 "web to serve", on_timeout=workers.logs)
        for name in ("run", "web"):  # run serves the page too
            found = re.search(r"mailroute web: (http://\S+)", log_of(workers, name))
            assert found, log_of(workers, name)
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(found.group(1) + "api/overview", timeout=30) as reply:
                assert reply.status == 200
    finally:
        codes = {name: workers.kill(name, signal.SIGTERM) for name in ("run", "web")}
    assert codes == {"run": 0, "web": 0}, workers.logs()
    assert log_of(workers, "run").splitlines()[-1] == "mailroute stopped"
    assert log_of(workers, "web").splitlines()[-1] == "mailroute web stopped"
    assert "Traceback" not in workers.logs()


def test_sigterm_while_waiting_for_the_database_is_a_clean_stop(
        tmp_path: Path, rabbit_vhost: Vhost, database_url: str,
        private_postgres: PrivatePostgres) -> None:
    private_postgres.stop()
    workers = lone_worker(tmp_path, rabbit_vhost.url, database_url)
    workers.start("persist")
    start_run_and_web(workers)
    names = ("persist", "run", "web")
    try:
        for name in names:
            wait_until_waiting(workers, name)
    finally:
        codes = {name: workers.kill(name, signal.SIGTERM) for name in names}
    for name in names:
        log = log_of(workers, name)
        assert codes[name] == 0, log
        assert "stopped while waiting for the database" in log
        assert "Error" not in log and "Traceback" not in log


def test_a_database_that_does_not_exist_fails_at_once(
        tmp_path: Path, rabbit_vhost: Vhost, private_postgres: PrivatePostgres) -> None:
    workers = lone_worker(tmp_path, rabbit_vhost.url,
                          private_postgres.url("mailroute_no_such_database"))
    workers.start("route")
    code = workers.wait_exit("route", timeout=120)
    log = log_of(workers, "route")
    assert code == 1, log
    assert log.splitlines()[-1].startswith("Error: database: "), log
    assert 'database "mailroute_no_such_database" does not exist' in log.splitlines()[-1]
    assert "retrying" not in log and "Traceback" not in log
